"""PostgreSQL 15 from Debian's binaries, for the team stack: a data folder, password login, loopback only.

PostgreSQL refuses to run as root; run as root, every binary runs as `os_user` (a system user, created when
missing) through `runuser`, which then owns the folder. That user must be able to reach the folder: every
folder above it needs the x bit for others (a 0700 temporary folder does not do).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Any

PG_BIN = Path(os.environ.get("VLMOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresError(RuntimeError):
    """PostgreSQL is missing, or did not start; the message says what to install or where the log is."""


class Postgres:
    """One PostgreSQL cluster: data in `folder/data`, its socket in `folder`, its log at `log`."""

    def __init__(self, folder: Path, host: str, port: int, user: str, password: str, os_user: str, log: Path):
        self.folder = folder
        self.data = folder / "data"
        self.host, self.port, self.user, self.password = host, port, user, password
        self.os_user = os_user
        self.log = log

    def start(self, timeout: float) -> None:
        """initdb on first use (password login only: SCRAM, also over the socket), then pg_ctl start."""
        if not (PG_BIN / "initdb").is_file():
            raise PostgresError(
                f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): apt-get install postgresql-15 "
                "(make stack-up does it when run as root), or set VLMOPS_PG_BIN to its bin folder"
            )
        self.folder.mkdir(exist_ok=True)
        owner = _os_user(self.os_user) if os.geteuid() == 0 else None
        if owner is not None:
            _check_reachable(self.folder, owner)
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.log.touch()
            os.chown(self.log, owner.pw_uid, owner.pw_gid)
        self.folder.chmod(0o700)
        if not (self.data / "PG_VERSION").is_file():
            pwfile = self.folder / "initial-password"
            pwfile.write_text(self.password + "\n")
            if owner is not None:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            try:
                self._run(
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                )
            finally:
                pwfile.unlink()
        options = f"-h {self.host} -p {self.port} -k {self.folder}"
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-o", options)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise PostgresError(
                    f"PostgreSQL did not accept connections in {timeout:.0f} s; log {self.log}:\n{tail}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        """A fast shutdown (open sessions are ended, nothing is lost), when it runs."""
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=3,
        )

    def healthy(self) -> bool:
        import psycopg2

        try:
            connection = self.connect()
        except psycopg2.OperationalError:
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        finally:
            connection.close()

    def create_databases(self, names: tuple[str, ...]) -> None:
        """Each database that does not exist yet."""
        connection = self.connect()
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for name in names:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def _run(self, binary: str, *args: str) -> None:
        command = [str(PG_BIN / binary), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.os_user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PostgresError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _os_user(name: str) -> pwd.struct_passwd:
    """The system user that runs PostgreSQL when we are root; created when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _check_reachable(folder: Path, user: pwd.struct_passwd) -> None:
    """Every folder above `folder` must let `user` through (the x bit for others, or its own)."""
    for parent in folder.parents:
        info = parent.stat()
        if info.st_uid != user.pw_uid and not info.st_mode & 0o001:
            raise PostgresError(
                f"{parent} is closed to other users (mode {oct(info.st_mode & 0o777)}), so PostgreSQL, running as "
                f"{user.pw_name}, cannot reach {folder}: set VLMOPS_STACK_DIR to a folder under an open path "
                f"(or chmod o+x {parent})"
            )

"""A TCP proxy on loopback in front of a real server, which a test takes away at a chosen point of a job and brings
back: `fail_at(marker)` stops it when a request carrying `marker` arrives (that request is not passed on, the
connections open are cut, and new ones are refused, as by a server that went down), `start()` brings it back on the
same port. The outage is the proxy's; the server behind it keeps its data."""

from __future__ import annotations

import select
import socket
import threading
from contextlib import suppress

WAIT_S = 0.1
"""How long the threads wait on their sockets before they look whether the proxy was stopped."""


class OutageProxy:
    """A proxy to 127.0.0.1:`target_port` at `url`; started on creation."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0  # a free one, kept from the first start on
        self.stops = 0
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()  # a start waits for a stop under way to end
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._accepting: threading.Thread | None = None
        self.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def fail_at(self, marker: bytes) -> None:
        """Stop when a request carrying `marker` arrives (once)."""
        self._marker = marker

    def start(self) -> None:
        with self._stop_lock:
            listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again at once
            listener.settimeout(WAIT_S)
            self.port = listener.getsockname()[1]
            self._stopping.clear()
            self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
            self._accepting.start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones. Counted in `stops` first: a client that sees its connection
        cut may look at `stops` before the cutting thread has closed the other sockets."""
        with self._stop_lock:
            self.stops += 1
            self._stopping.set()
            if self._accepting is not None:
                self._accepting.join()  # the listener is closed once it returns
            with self._lock:
                open_sockets, self._open = self._open, set()
            for sock in open_sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the relay's select, and the client sees the cut
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while not self._stopping.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                if self._stopping.is_set():  # stopped while it waited: refused as the ones after it
                    client.close()
                    return
                server = socket.create_connection(("127.0.0.1", self.target_port))
                with self._lock:
                    self._open |= {client, server}
                threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        with client, server, suppress(OSError, ValueError):  # ends when a side closes, or `stop` cuts both
            while not self._stopping.is_set():
                ready, _, _ = select.select([client, server], [], [], WAIT_S)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and self._marker is not None and self._marker in data:
                        self._marker = None
                        self.stop()  # the request is not passed on: the client sees its connection cut
                        return
                    (server if sock is client else client).sendall(data)

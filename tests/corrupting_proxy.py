"""A TCP proxy on loopback that damages what a server sends back: every copy of `marker` in the replies reaches the
client with its first byte changed, as a flipped bit on the way would. Requests go through untouched, so a signed S3
request still verifies: a download through the proxy arrives damaged, the same download straight from the server
whole."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

FLUSH_S = 0.02
"""How long a reply's last bytes (which could begin a marker that the next read completes) wait for more."""


@contextmanager
def corrupting_proxy(target_port: int, marker: bytes) -> Iterator[str]:
    """Yield the URL (http://127.0.0.1:PORT) of a proxy to 127.0.0.1:`target_port` that damages `marker` in replies."""
    damaged = bytes([marker[0] ^ 0xFF]) + marker[1:]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def relay(client: socket.socket, server: socket.socket) -> None:
        held = b""  # the tail of a reply, sent once more of it arrives or none does for FLUSH_S
        # A side that closes or resets ends the connection, as it would without the proxy.
        with client, server, suppress(OSError):
            while not stop.is_set():
                ready, _, _ = select.select([client, server], [], [], FLUSH_S)
                if not ready and held:
                    client.sendall(held)
                    held = b""
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        client.sendall(held)
                        return
                    if sock is client:
                        server.sendall(data)
                        continue
                    data = (held + data).replace(marker, damaged)
                    cut = max(len(data) - len(marker) + 1, 0)
                    client.sendall(data[:cut])
                    held = data[cut:]

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", target_port))
            threading.Thread(target=relay, args=(client, server), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()

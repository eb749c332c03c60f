"""A loopback TCP relay that can blackhole its connections, as a partitioned network does.

``blackhole()`` keeps every connection open but stops moving bytes either way (what arrives
is read and dropped), so the peers see silence rather than a reset: the fault a dropped-packet
partition gives. ``restore()`` ends the blackholed connections (their TCP sessions would not
survive a real partition either) and relays new ones normally again.

One thread, ``select`` with a short timeout, stopped by ``close()``: every loop is bounded.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import Self

_CHUNK = 65536


class Relay:
    """Relays connections on ``127.0.0.1:<port>`` to ``(host, port)``."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.0)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._dark = False
        self._restoring = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> Self:
        """Begin relaying."""
        self._thread.start()
        return self

    def blackhole(self) -> None:
        """From now on, move no byte in either direction (connections stay open)."""
        with self._lock:
            self._dark = True

    def restore(self) -> None:
        """Close the connections that went dark and relay normally again."""
        with self._lock:
            self._restoring = True
            self._dark = False

    def close(self) -> None:
        """Stop the thread and close everything."""
        self._stopping.set()
        self._thread.join(5)
        for sock in list(self._peers):
            sock.close()
        self._listener.close()
        self._selector.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _drop_all(self) -> None:
        for sock in list(self._peers):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._peers.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._restoring:
                    self._restoring = False
                    self._drop_all()
                dark = self._dark
            for key, _events in self._selector.select(timeout=0.05):
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                    continue
                assert isinstance(sock, socket.socket)
                self._move(sock, dark)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = self._listener.accept()
            try:
                server = socket.create_connection(self._target, timeout=2)
            except OSError:
                client.close()
                return
            for one, other in ((client, server), (server, client)):
                one.settimeout(0.0)
                self._peers[one] = other
                self._selector.register(one, selectors.EVENT_READ, None)

    def _move(self, sock: socket.socket, dark: bool) -> None:
        other = self._peers.get(sock)
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or other is None:
            for end in (sock, other):
                if end is not None and end in self._peers:
                    self._selector.unregister(end)
                    del self._peers[end]
                    end.close()
            return
        if dark:
            return  # dropped, as by a partition
        with contextlib.suppress(OSError):
            other.settimeout(None)
            other.sendall(data)
            other.settimeout(0.0)

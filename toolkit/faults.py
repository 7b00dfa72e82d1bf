"""Fault injection helpers for scenarios and tests: a TCP proxy that can cut a connection for real."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

PG_COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"
"""A ``COMMIT`` as libpq sends it (a simple Query message): see :meth:`TcpProxy.lose_next_reply`."""


class TcpProxy:
    """A loopback TCP proxy to one server; :meth:`cut` drops every connection and refuses new ones.

    Used where the real server is shared and must not be stopped: clients talk
    to the proxy, and cutting it looks to them exactly like the server going away.
    """

    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.port = listen_port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._open = threading.Event()
        self.stalled = threading.Event()
        """While set, bytes are held back and nothing is closed: a silent network."""
        self._lose: bytes | None = None

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        """A proxy to the host and port of a URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user + '@' if user else ''}127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def start(self) -> TcpProxy:
        """Listen (on the same port again after a :meth:`cut`)."""
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        self._open.set()
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()
        return self

    restore = start

    def cut(self) -> None:
        """Close the listener and every proxied connection."""
        self._open.clear()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()

    stop = cut

    def lose_next_reply(self, message: bytes = PG_COMMIT) -> None:
        """Lose the answer to the next client message that contains ``message``.

        The message reaches the server, which carries it out and answers; the
        answer is dropped and that connection is cut, so the client sees the
        connection fail *after* the server acted (a reply lost after a COMMIT).
        One-shot: other connections and later messages pass untouched.
        """
        with self._lock:
            self._lose = message

    @property
    def losing(self) -> bool:
        """Whether :meth:`lose_next_reply` is armed and has not lost a reply yet."""
        with self._lock:
            return self._lose is not None

    def _losing(self, chunk: bytes) -> bool:
        """Whether ``chunk`` (client to server) is the armed message; disarms when it is."""
        with self._lock:
            if self._lose is None or self._lose not in chunk:
                return False
            self._lose = None
            return True

    def _accept(self, lst: socket.socket) -> None:
        while self._open.is_set():
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            lost = threading.Event()  # set: the server's next answer on this pair is dropped
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up, lost), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool,
              lost: threading.Event) -> None:
        try:
            while chunk := src.recv(65536):
                while self.stalled.is_set():
                    time.sleep(0.01)
                if upstream and self._lose is not None and self._losing(chunk):
                    lost.set()  # before the server can answer
                elif not upstream and lost.is_set():
                    break  # the answer is dropped; both sockets are shut below
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

"""A TCP relay: exposes a loopback-only service on another address, and can cut it to play an outage.

The lab's services listen on 127.0.0.1; a test host on a private bridge reaches one through a relay bound
to the bridge's admin-side address::

    with TcpRelay(("127.0.0.1", bao_port), listen_host=network.gateway) as relay:
        url = f"https://{relay.host}:{relay.port}"     # what the test host dials

Bytes pass through untouched: TLS stays end to end between the client and the service, so the client
verifies the service's own certificate (with a TLS server name of the service when the relay's address is
not in it). `down()` closes the listener and every open connection (clients then see connection refused,
as when the network to the service is gone); `up()` listens again on the same port.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import threading
from types import TracebackType


class TcpRelay:
    def __init__(self, upstream: tuple[str, int], *, listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.upstream = upstream
        self.host = listen_host
        self.port = listen_port  # 0: a free port, chosen on the first up()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, self.port))
        server.listen(64)
        self.port = int(server.getsockname()[1])
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True, name=f"relay:{self.port}").start()

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
            server.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = down

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the service is down: the client sees the connection closed
                continue
            with self._lock:
                self._conns.update((client, upstream))
            done = threading.Semaphore(0)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst, done), daemon=True).start()
            threading.Thread(target=self._reap, args=(client, upstream, done), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the end of the stream on
            done.release()

    def _reap(self, client: socket.socket, upstream: socket.socket, done: threading.Semaphore) -> None:
        """Close a connection's two sockets once both directions have ended."""
        done.acquire()
        done.acquire()
        with self._lock:
            self._conns.difference_update((client, upstream))
        client.close()
        upstream.close()


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    """`python -m appliance.hosts.relay LISTEN UPSTREAM`: relay until SIGTERM (the lab runs one per service
    that its core node must reach)."""
    parser = argparse.ArgumentParser(prog="python -m appliance.hosts.relay", description=main.__doc__)
    parser.add_argument("listen", type=_endpoint, help="HOST:PORT to listen on (the bridge's admin-side address)")
    parser.add_argument("upstream", type=_endpoint, help="HOST:PORT of the service (on loopback)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with TcpRelay(args.upstream, listen_host=args.listen[0], listen_port=args.listen[1]) as relay:
        print(f"relaying {relay.host}:{relay.port} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()

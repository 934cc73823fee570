"""Real servers that fail on purpose, for tests/faults: an ``mlflow server`` that can be killed and
started again on the same port and store, and an HTTP proxy that goes down when it sees a chosen
request (as a load balancer in front of a backend that died does). Everything binds 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from orchestration_testing import BIN, OFFLINE_ENV, free_port, start, wait_http


class MlflowServer:
    """``mlflow server`` on a fixed port with a SQLite store and served artifacts under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, **OFFLINE_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = start(args, self.root / "server.log", env)
        wait_http(f"{self.url}/health", 90, self.proc)

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed server: no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class FailingProxy:
    """Forwards HTTP requests to ``upstream``; from the first request for which ``trigger(method,
    path)`` is true until ``restore()``, answers every request 502 without forwarding it."""

    def __init__(self, upstream: str, trigger: Callable[[str, str], bool]) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.trigger, self.down, self.tripped = trigger, False, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self._body()
                if not proxy.down and proxy.trigger(self.command, self.path):
                    proxy.down, proxy.tripped = True, proxy.tripped + 1
                if proxy.down:
                    self._answer(502, {"Content-Type": "text/plain"}, b"upstream is down")
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                skip = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                hop = ("transfer-encoding", "connection", "content-length")
                self._answer(resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in hop}, data)
                conn.close()

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # requests streams a file of unknown size (an empty one) chunked
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def _answer(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format, *args):  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def restore(self) -> None:
        self.down = False
        self.trigger = lambda method, path: False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpForwarder:
    """A TCP port that forwards to ``upstream_port``; ``stop()`` closes it (connections are refused,
    as when the server behind an address is down) and ``start()`` opens the same port again, while
    the server behind it keeps its state (moto's S3 lives in memory: restarting it would empty it)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.port = upstream_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of its thread (Linux)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:  # closed by stop()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

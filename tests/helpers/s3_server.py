"""A real S3-protocol server for the object-storage tests (moto's standalone server on
127.0.0.1), and a TCP relay in front of it that records every HTTP request line it forwards
and can stall an upload halfway (so a client can be killed mid-upload for real).

The relay is the oracle of "a warm hit reads one small ref and no blob": it counts requests on
the wire, whatever the client library does."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from typing import Dict, Iterator, List, Optional

__all__ = ["Relay", "aws_env", "free_port", "start_moto"]

_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (/\S*) HTTP/1\.1\r\n")


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[Dict[str, str]]:
    """Test credentials and ``AWS_ENDPOINT_URL_S3=endpoint`` in ``os.environ`` (so this
    process's clients and its children reach the server), restored on the way out."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _forget_s3_clients()
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_s3_clients()


def _forget_s3_clients() -> None:
    """fsspec keeps one S3FileSystem per set of options for the process, and one made under
    another endpoint (another test module's server) would be handed out again."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """moto's threaded S3 server on a free port of 127.0.0.1: (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


class Relay:
    """Forwards 127.0.0.1:<port> to ``target`` (host, port), recording request lines.

    ``stall(pattern)``: the next request whose line matches ``pattern`` (bytes regex) is
    forwarded up to its headers and ``keep`` body bytes, then the rest is held back forever;
    ``stalled`` is set then. The client is left waiting for an answer that never comes."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.requests: List[str] = []
        self.stalled = threading.Event()
        self._stall: Optional[re.Pattern] = None
        self._keep = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self, pattern: bytes, keep: int = 64) -> None:
        with self._lock:
            self._stall, self._keep = re.compile(pattern), keep
            self.stalled.clear()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        held = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if held:
                    continue  # swallowed: the upload never completes
                if outbound:
                    with self._lock:
                        for match in _REQUEST_LINE.finditer(data):
                            self.requests.append(f"{match.group(1).decode()} {match.group(2).decode()}")
                        stall = self._stall
                        hit = stall.search(data) if stall is not None else None
                        if hit is not None:
                            self._stall = None
                    if hit is not None:
                        end = data.find(b"\r\n\r\n", hit.start())
                        cut = len(data) if end < 0 else min(len(data), end + 4 + self._keep)
                        dst.sendall(data[:cut])
                        held = True
                        self.stalled.set()
                        continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()

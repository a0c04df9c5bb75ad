"""Upstreams that misbehave on the wire, for the fault tests (issue 12).

tests/fakeprovider.py is a well-behaved OpenAI; this is a raw TCP server on
127.0.0.1 that reads one HTTP/1.1 request and answers with whatever bytes the
current ``mode`` makes, including shapes no HTTP framework would send:

    garbage       200 SSE whose events are not JSON (binary, truncated, wrong types)
    big_line      200 SSE: one event per size in ``big_lines``, each a single ``data:``
                  line of that many bytes, then a normal completed response with usage
    huge_headers  200 JSON with ``header_bytes`` of response headers
    slow_headers  accepts, reads the request, then says nothing for ``hang`` seconds

    with Misbehaving("garbage") as up:
        up.base_url                    # http://127.0.0.1:PORT/v1
        up.requests                    # request heads received (bytes)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

USAGE = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 250, "output_tokens_details": {"reasoning_tokens": 0},
         "total_tokens": 1250}


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def completed(model: str = "gpt-5.5") -> bytes:
    resp = {"id": "resp_mis", "object": "response", "model": model, "status": "completed",
            "output": [], "usage": USAGE}
    return sse({"type": "response.completed", "response": resp})


GARBAGE = (
    b"event: response.created\ndata: {not json at all\n\n"
    b"data: \xff\xfe\x00\x01 binary \x80\x81\n\n"
    b"event: response.completed\ndata: [1, 2, 3]\n\n"
    b'event: response.completed\ndata: {"type": "response.completed", "response": 7}\n\n'
    b'data: {"type": "response.output_text.delta", "delta": {"nested": [[[[]]]]}}\n\n'
    b"event: \ndata:\n\n: comment only\n\n"
    b'data: {"type": "response.completed", "response": {"usage": "lots"}}\n\n'
    b"\n\n\n\r\r\n\x00"
)


class Misbehaving:
    def __init__(self, mode: str = "garbage") -> None:
        self.mode = mode
        self.big_lines = [10 * 1024 * 1024]
        self.header_bytes = 1024 * 1024
        self.hang = 30.0
        self.requests: list[bytes] = []
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Misbehaving:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.settimeout(0.2)
        self._sock, self.port = sock, sock.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True, name=f"misbehaving:{self.port}")
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _read_request(self, conn: socket.socket) -> bytes:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            got = conn.recv(65536)
            if not got:
                return data
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            got = conn.recv(65536)
            if not got:
                break
            body += got
        self.requests.append(head)
        return head

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not self._read_request(conn):
                    return
                getattr(self, "_" + self.mode)(conn)
            except OSError:
                pass  # the gateway hung up (as it should, for some modes)

    @staticmethod
    def _sse_head(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"connection: close\r\n\r\n")

    def _garbage(self, conn: socket.socket) -> None:
        self._sse_head(conn)
        for i in range(0, len(GARBAGE), 7):  # odd chunk boundaries
            conn.sendall(GARBAGE[i:i + 7])

    def _big_line(self, conn: socket.socket) -> None:
        self._sse_head(conn)
        block = b"x" * 65536
        for size in self.big_lines:
            conn.sendall(b"event: response.output_text.delta\ndata: ")
            for _ in range(size // len(block)):
                conn.sendall(block)
            conn.sendall(b"\n\n")
        conn.sendall(completed())

    def _huge_headers(self, conn: socket.socket) -> None:
        body = json.dumps({"id": "resp_mis", "object": "response", "status": "completed",
                           "model": "gpt-5.5", "output": [], "usage": USAGE}).encode()
        filler = b"".join(b"x-filler-%d: %s\r\n" % (i, b"y" * 1000)
                          for i in range(self.header_bytes // 1020))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + filler
                     + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)

    def _slow_headers(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.hang
        while time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)

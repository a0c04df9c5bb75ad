"""Run tests/fakeprovider.py with TCP_NODELAY on its accepted connections.

fakeprovider binds ``socket.socket(AF_INET, SOCK_STREAM)`` (protocol 0) and hands it to
uvicorn; asyncio only sets TCP_NODELAY on transports whose socket reports
``proto == IPPROTO_TCP``, so connections accepted from it keep Nagle's algorithm. On a
keep-alive connection every response after the first then waits ~40 ms for the
client's delayed ACK (header and body go out as separate writes). This launcher
creates that listening socket with ``IPPROTO_TCP`` and otherwise runs the fake's own
``main()`` unchanged, with the same flags.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fakeprovider


class _TCPSocket(socket.socket):
    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: int | None = None) -> None:
        if (fileno is None and family == socket.AF_INET and type == socket.SOCK_STREAM
                and proto in (-1, 0)):
            proto = socket.IPPROTO_TCP
        super().__init__(family, type, proto, fileno)


class _SocketModule:
    """fakeprovider's view of the socket module: same, except socket() above."""

    def __getattr__(self, name: str) -> object:
        return getattr(socket, name)

    socket = _TCPSocket


fakeprovider.socket = _SocketModule()  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(fakeprovider.main())

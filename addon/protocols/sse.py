"""Incremental Server-Sent-Events splitter for the stream tap.

It runs on mitmproxy's single event loop for every network chunk of every
stream, so the per-chunk work is kept to C-level byte searches: one
``bytes.split`` finds every event boundary in a chunk, lines are normalised to
``\\n`` only when the chunk holds a ``\\r``, only the unfinished tail is kept
(in a ``bytearray``, searched only where new bytes arrived), and events a
caller does not want are dropped by their ``event:`` name before their data is
copied out.
"""

from __future__ import annotations

from collections.abc import Container

Event = tuple[bytes | None, bytes]
"""(event name or None when the block has no ``event:`` line, data lines joined by ``\\n``)."""

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""Events larger than this are dropped unread (and counted) so one runaway
event cannot make the gateway buffer an unbounded amount of memory."""

_BOM = b"\xef\xbb\xbf"


class SSEScanner:
    """Split a byte stream into SSE events, whatever the chunk boundaries.

    ``only``: when given, events whose ``event:`` name is not in it are counted
    but not returned (their data is never sliced out); events without a name
    are always returned, since only their data can tell what they are.
    """

    __slots__ = (
        "_buf",
        "_cr",
        "_head",
        "_skipping",
        "_started",
        "events",
        "max_event_bytes",
        "only",
        "oversized",
    )

    def __init__(
        self, only: Container[bytes] | None = None, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        self.only = only
        self.max_event_bytes = max_event_bytes
        self.events = 0
        """Events seen (returned or filtered out by ``only``)."""
        self.oversized = 0
        """Events dropped for exceeding ``max_event_bytes``."""
        self._buf = bytearray()
        self._cr = False  # chunk ended in "\r": it may pair with a "\n" in the next one
        self._skipping = False  # inside an oversized event: discard up to its blank line
        self._started = False
        self._head = b""  # first bytes held back while they may be a split BOM

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume one network chunk; return the events it completed."""
        if not chunk:
            return []
        if not self._started:
            chunk, self._head = self._head + chunk, b""
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk  # maybe a BOM split across chunks: wait for more
                return []
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[Event] = []
        buf = self._buf
        pos = 0
        first: bytes | None = None
        if self._skipping:
            if buf and chunk.startswith(b"\n"):
                pos = 1
            else:
                end = chunk.find(b"\n\n")
                if end == -1:
                    buf[:] = b"\n" if chunk.endswith(b"\n") else b""
                    return out
                pos = end + 2
            buf.clear()
            self._skipping = False
        elif buf:
            # Finish the event the tail started, searching only the new bytes.
            n = len(buf)
            buf += chunk
            end = buf.find(b"\n\n", n - 1)
            if end == -1:
                if len(buf) > self.max_event_bytes:
                    self._drop_tail()
                return out
            with memoryview(buf) as view:
                first = bytes(view[:end])
            buf.clear()
            pos = end + 2 - n
        # One C-level split finds every boundary; the last piece is the unfinished tail.
        parts = (chunk[pos:] if pos else chunk).split(b"\n\n")
        tail = parts.pop()
        if first is not None:
            parts.insert(0, first)
        if parts:
            self._dispatch(parts, out)
        if tail:
            buf += tail
            if len(buf) > self.max_event_bytes:
                self._drop_tail()
        return out

    def close(self) -> list[Event]:
        """End of stream: return a final event that lacked its blank line."""
        out: list[Event] = []
        if not self._skipping and self._buf:
            self._dispatch([bytes(self._buf).rstrip(b"\n")], out)
        self._buf.clear()
        self._cr = False
        self._skipping = False
        return out

    def _drop_tail(self) -> None:
        self.oversized += 1
        self._skipping = True
        self._buf[:] = b"\n" if self._buf.endswith(b"\n") else b""

    def _dispatch(self, blocks: list[bytes], out: list[Event]) -> None:
        """Parse event blocks (no blank line inside) and append the wanted ones to ``out``."""
        only = self.only
        limit = self.max_event_bytes
        seen = 0
        for block in blocks:
            if not block:
                continue  # extra blank line
            if len(block) > limit:
                self.oversized += 1
                continue
            # Fast paths: the shapes real providers send, one ``event:`` and one
            # ``data:`` line (Responses, Anthropic) or a lone ``data:`` line (Chat).
            if block.startswith(b"event:"):
                nl = block.find(b"\n")
                if nl != -1:
                    name = block[7:nl] if block[6] == 32 else block[6:nl]
                    if only is not None and name and name not in only:
                        seen += 1
                        continue
                    if block.startswith(b"data:", nl + 1) and block.find(b"\n", nl + 1) == -1:
                        seen += 1
                        start = nl + 7 if block[nl + 6 : nl + 7] == b" " else nl + 6
                        out.append((name or None, block[start:]))
                        continue
            elif block.startswith(b"data:") and b"\n" not in block:
                seen += 1
                out.append((None, block[6:] if block[5:6] == b" " else block[5:]))
                continue
            seen += self._dispatch_slow(block, out)
        self.events += seen

    def _dispatch_slow(self, block: bytes, out: list[Event]) -> int:
        """Any other block shape, per the SSE spec; returns 1 if it was an event."""
        name: bytes | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if not line or line[0] == 58:  # blank or ":" comment
                continue
            colon = line.find(b":")
            if colon == -1:
                field, value = line, b""
            else:
                field = line[:colon]
                skip = 2 if line[colon + 1 : colon + 2] == b" " else 1
                value = line[colon + skip :]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value or None
            # "id", "retry" and unknown fields carry nothing we need.
        if not data:
            return 0  # per the SSE spec a block without data dispatches nothing
        if name is None or self.only is None or name in self.only:
            out.append((name, data[0] if len(data) == 1 else b"\n".join(data)))
        return 1

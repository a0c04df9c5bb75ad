"""SSEScanner: same events whatever the chunk boundaries and line endings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_egress.addon.protocols.sse import SSEScanner

Event = tuple[bytes | None, bytes]

# Field values never hold CR or LF (those end a line); anything else goes,
# including colons and leading spaces (only the first space is eaten).
_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_name = _value.filter(lambda b: b != b"" and not b.startswith(b" "))


@st.composite
def _events(draw: st.DrawFn) -> tuple[list[Event], list[list[bytes]]]:
    """Expected events and, for each, its lines (with noise lines mixed in)."""
    expected: list[Event] = []
    blocks: list[list[bytes]] = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.none() | _name)
        data = draw(st.lists(_value, min_size=1, max_size=4))
        lines: list[bytes] = []
        if draw(st.booleans()):
            lines.append(b": keep-alive " + draw(_value))
        if name is not None:
            lines.append(b"event: " + name)
        for d in data:
            lines.append(b"data: " + d)
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from([b"id: 7", b"retry: 1000", b":", b"id"])))
        blocks.append(lines)
        expected.append((name, b"\n".join(data)))
    return expected, blocks


def _serialise(blocks: list[list[bytes]], eol: bytes, extra_blank: bool) -> bytes:
    sep = eol + eol + (eol if extra_blank else b"")
    return b"".join(eol.join(lines) + sep for lines in blocks)


def _feed_split(raw: bytes, cuts: list[int], scanner: SSEScanner | None = None) -> list[Event]:
    sc = scanner or SSEScanner()
    out: list[Event] = []
    prev = 0
    for cut in [*sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]:
        out += sc.feed(raw[prev:cut])
        prev = cut
    return out + sc.close()


@settings(max_examples=300)
@given(
    _events(),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=30),
)
def test_any_split_gives_same_events(
    case: tuple[list[Event], list[list[bytes]]], eol: bytes, extra_blank: bool, cuts: list[int]
) -> None:
    expected, blocks = case
    raw = _serialise(blocks, eol, extra_blank)
    whole = SSEScanner()
    assert whole.feed(raw) + whole.close() == expected
    assert _feed_split(raw, cuts) == expected


@given(st.lists(st.integers(0, 400), max_size=20))
def test_byte_by_byte_and_random_splits_crlf(cuts: list[int]) -> None:
    raw = b"event: a\r\ndata: 1\r\n\r\n: ping\r\n\r\ndata: x\r\ndata: y\r\n\r\n"
    expected: list[Event] = [(b"a", b"1"), (None, b"x\ny")]
    assert _feed_split(raw, cuts) == expected
    assert _feed_split(raw, list(range(len(raw)))) == expected


def test_comments_id_retry_ignored_and_no_data_no_event() -> None:
    sc = SSEScanner()
    raw = b": hello\n\nid: 1\nretry: 5\n\nevent: only-name\n\nevent: e\nid: 2\ndata: d\n\n"
    assert sc.feed(raw) == [(b"e", b"d")]
    assert sc.events == 1


def test_multiline_data_and_field_without_space() -> None:
    sc = SSEScanner()
    assert sc.feed(b"data:a\ndata:  b\ndata\nevent:n\n\n") == [(b"n", b"a\n b\n")]


def test_close_flushes_final_event_without_blank_line() -> None:
    sc = SSEScanner()
    assert sc.feed(b"data: 1\n\ndata: 2") == [(None, b"1")]
    assert sc.close() == [(None, b"2")]
    assert sc.close() == []


def test_bom_stripped() -> None:
    sc = SSEScanner()
    assert sc.feed(b"\xef\xbb\xbfdata: x\n\n") == [(None, b"x")]


def test_only_filters_named_events_keeps_nameless() -> None:
    sc = SSEScanner(only=frozenset({b"keep"}))
    raw = b"event: drop\ndata: 1\n\nevent: keep\ndata: 2\n\ndata: 3\n\ndata: 4\nevent: drop\n\n"
    assert sc.feed(raw) == [(b"keep", b"2"), (None, b"3")]
    assert sc.events == 4


def test_oversized_event_dropped_and_counted() -> None:
    sc = SSEScanner(max_event_bytes=100)
    out = sc.feed(b"data: ok\n\ndata: " + b"x" * 60)
    out += sc.feed(b"y" * 60)  # tail now over the bound: dropped
    out += sc.feed(b"z" * 500 + b"\n")
    out += sc.feed(b"\ndata: after\n\n")
    out += sc.feed(b"data: " + b"q" * 200 + b"\n\ndata: last\n\n")  # complete but too big
    assert out == [(None, b"ok"), (None, b"after"), (None, b"last")]
    assert sc.oversized == 2
    assert len(sc._buf) == 0


def test_tail_is_only_the_unfinished_event() -> None:
    sc = SSEScanner()
    sc.feed(b"data: 1\n\n" * 100 + b"data: par")
    assert bytes(sc._buf) == b"data: par"


def test_bom_split_across_the_first_chunks_is_stripped() -> None:
    """A BOM cut after its first byte(s) must not cost the first event (fuzz finding)."""
    for cut in (1, 2):
        scanner = SSEScanner()
        raw = b"\xef\xbb\xbfdata: x\n\n"
        events = scanner.feed(raw[:cut]) + scanner.feed(raw[cut:])
        assert [data for _name, data in events] == [b"x"]

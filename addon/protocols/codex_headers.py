"""What Codex tells us about the session and turn in its request headers (DESIGN §4)."""

from __future__ import annotations

from collections.abc import Callable

from .values import loads_object, printable_id


def session_and_turn(
    get_header: Callable[[str], str | None],
    prompt_cache_key: str | None,
    client_session_id: str | None,
) -> tuple[str | None, str | None]:
    """Session id: `session-id` header, else prompt_cache_key; turn id from turn metadata."""
    session = get_header("session-id") or prompt_cache_key or client_session_id
    turn: str | None = None
    meta = get_header("x-codex-turn-metadata")
    if meta:
        # a client-set header: invalid, non-object or too deeply nested reads as absent
        parsed = loads_object(meta)
        if parsed is not None and isinstance(parsed.get("turn_id"), str):
            turn = parsed["turn_id"]
    return printable_id(session), printable_id(turn)

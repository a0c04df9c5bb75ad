"""Error bodies in each client's own format (DESIGN §5).

The OpenAI shape is what Codex parses (`error.message` is what it shows);
the Anthropic shape is added when Claude Code lands. ``universal_error_body``
satisfies both parsers at once, for places that cannot know the client.
"""

from __future__ import annotations

import json


def openai_error_body(message: str, *, type: str, code: str, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "code": code, "param": param}},
        ensure_ascii=False,
    ).encode()


def universal_error_body(message: str, *, type: str, code: str) -> bytes:
    """One JSON body both OpenAI (`error.message/code`) and Anthropic (`type: error`) read."""
    return json.dumps(
        {
            "type": "error",
            "error": {"message": message, "type": type, "code": code, "param": None},
        },
        ensure_ascii=False,
    ).encode()


def error_body_for(api: str, message: str, *, type: str, code: str) -> bytes:
    """An error body in the format of the API the client called (DESIGN §5)."""
    if api == "anthropic.messages":
        from .anthropic_messages import error_body

        return error_body(message, type="api_error")
    return openai_error_body(message, type=type, code=code)

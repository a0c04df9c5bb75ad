"""Meter a stream's generated text as it passes, for the budget cut-off.

Counts the characters of what the model writes (Responses `*.delta` events;
Chat Completions `content` / `arguments` / `refusal` deltas; Anthropic
`content_block_delta` text, JSON and thinking), not the SSE
framing around them, so a running output-token estimate is near the real
count. Reasoning tokens are billed but not streamed, so the meter undercounts
reasoning models: the cut-off is a backstop, the reservation is the limit.
"""

from __future__ import annotations

import re

from .sse import SSEScanner

_RESPONSES_DELTAS = frozenset({
    b"response.output_text.delta", b"response.function_call_arguments.delta",
    b"response.refusal.delta", b"response.reasoning_summary_text.delta",
    b"response.custom_tool_call_input.delta",
    b"content_block_delta",  # Anthropic: text_delta, input_json_delta, thinking_delta
})
# A JSON string value after one of these keys; escapes count as one character each.
_VALUE = re.compile(
    rb'"(?:delta|content|arguments|refusal|text|partial_json|thinking)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(?:u[0-9a-fA-F]{4}|.)")


class OutputMeter:
    __slots__ = ("_scanner", "chars")

    def __init__(self) -> None:
        self._scanner = SSEScanner(only=_RESPONSES_DELTAS)
        self.chars = 0

    def feed(self, chunk: bytes) -> int:
        """Characters of generated output seen so far."""
        for _name, data in self._scanner.feed(chunk):
            for m in _VALUE.finditer(data):
                value = m.group(1)
                self.chars += len(value) - sum(len(e.group(0)) - 1
                                               for e in _ESCAPE.finditer(value))
        return self.chars

    @property
    def tokens(self) -> int:
        return -(-self.chars // 4)

"""What the gateway learns from one model response, whatever the API.

Every protocol reader fills the same record so settlement (cost, ledger, audit)
and telemetry never need to know which wire format the call used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .usage import Usage


@dataclass(slots=True)
class ResponseSummary:
    usage: Usage | None = None
    """Provider-reported usage; None when the response never carried it (cut stream)."""
    response_id: str | None = None
    model: str | None = None
    """Model the provider says served the call (may differ from the one requested)."""
    status: str | None = None
    """``completed`` | ``incomplete`` | ``failed`` (Responses) or a finish reason (Chat)."""
    finish_reasons: list[str] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    """(call_id, name) of every tool call the model asked for, in order."""
    events: int = 0
    """SSE events seen (0 for a non-streamed body)."""
    oversized_events: int = 0
    """Events dropped unread because they exceeded the scanner's size bound."""

    @property
    def finished(self) -> bool:
        """The provider reported usage and an end state: the answer is whole.

        A connection lost after this (Codex hangs up once it has read
        ``response.completed``, sometimes before the body's last chunk) neither cut the
        stream nor failed the call, and the client will not retry it.
        """
        return self.usage is not None and self.status not in (None, "in_progress")


class BadRequest(ValueError):
    """A client mistake we answer ourselves, in the API's own error format.

    ``param`` and ``code`` mirror OpenAI's ``error.param`` / ``error.code`` so the
    refusal builder can fill them in without re-deriving what went wrong.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

"""Request limits: model allowlist, input size, requested output tokens.

Pure: takes the decoded request body, returns a refusal reason or the body
changes to make (a clamped output-token cap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from .config import LimitsCheck

_OUTPUT_CAP_FIELDS = ("max_output_tokens", "max_completion_tokens", "max_tokens")


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    rule: str | None = None
    """``limits.<name>`` when the request must be refused."""
    message: str = ""
    clamp: dict[str, int] | None = None
    """Fields to set on the body (the output-token cap)."""


def check(limits: LimitsCheck, obj: Mapping[str, Any], model: str, body_bytes: int,
          api: str) -> LimitVerdict:
    if limits.models and not any(fnmatchcase(model, g) for g in limits.models):
        return LimitVerdict("limits.model_not_allowed",
                            f"model {model!r} is not allowed by the guardrail policy (allowed:"
                            f" {', '.join(limits.models)})")
    if limits.max_input_bytes is not None and body_bytes > limits.max_input_bytes:
        return LimitVerdict("limits.max_input_bytes",
                            f"the request is {body_bytes} bytes, over the policy's limit of"
                            f" {limits.max_input_bytes} bytes; compact or start a new session")
    est = -(-body_bytes // 4)
    if limits.max_input_tokens is not None and est > limits.max_input_tokens:
        return LimitVerdict("limits.max_input_tokens",
                            f"the request is about {est} tokens, over the policy's limit of"
                            f" {limits.max_input_tokens}; compact or start a new session")
    cap = limits.max_output_tokens
    if cap is None:
        return LimitVerdict()
    fields = [f for f in _OUTPUT_CAP_FIELDS if isinstance(obj.get(f), int)]
    asked = max((int(obj[f]) for f in fields), default=None)
    if asked is not None and asked > cap and limits.output_tokens_action == "block":
        return LimitVerdict("limits.max_output_tokens",
                            f"the request asks for up to {asked} output tokens, over the"
                            f" policy's cap of {cap}")
    if asked is None or asked > cap:
        default = "max_output_tokens" if api.startswith("openai.responses") else (
            "max_completion_tokens")
        return LimitVerdict(clamp={f: cap for f in fields} if fields else {default: cap})
    return LimitVerdict()

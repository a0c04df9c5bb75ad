"""Token usage as providers report it, normalised across APIs.

OpenAI counts cached tokens inside ``input_tokens`` and reasoning tokens inside
``output_tokens``; we keep that convention (totals, with the subsets beside them)
so a ledger row reconciles with the provider's own usage numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    """All input tokens, cached ones included."""
    cached_input_tokens: int = 0
    """Subset of ``input_tokens`` read from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """Input tokens written to a prompt cache (Anthropic); not in ``input_tokens`` there."""
    output_tokens: int = 0
    """All output tokens, reasoning ones included."""
    reasoning_tokens: int = 0
    """Subset of ``output_tokens`` spent on reasoning."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.cache_write_tokens + self.output_tokens

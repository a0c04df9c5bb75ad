"""USD cost of one call, from the provider's own usage numbers.

Prices come from configured overrides first (negotiated rates, private
models), then from the price table bundled with ``genai-prices``. The bundled
table only: ``genai_prices.UpdatePrices`` would fetch a new one over the
network, which a gateway must not do behind the operator's back. A model
nobody prices is reported as unpriced (``usd=None``), never as free.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from genai_prices import Usage as GPUsage
from genai_prices import calc_price

from .protocols.usage import Usage

_MTOK = Decimal(1_000_000)
_GLOB_CHARS = frozenset("*?[")
_UNKNOWN_MAX = 4096


@dataclass(frozen=True)
class ModelPrice:
    """A configured price, USD per million tokens.

    Cached input and cache writes fall back to the input rate when not given,
    so a partial override can only over-charge, never under-charge.
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_rate = self.cached_input_per_mtok
        write_rate = self.cache_write_per_mtok
        total = (
            (usage.input_tokens - cached) * self.input_per_mtok
            + cached * (self.input_per_mtok if cached_rate is None else cached_rate)
            + usage.cache_write_tokens
            * (self.input_per_mtok if write_rate is None else write_rate)
            + usage.output_tokens * self.output_per_mtok
        )
        return total / _MTOK


@dataclass(frozen=True)
class Cost:
    usd: Decimal | None
    """None means nobody prices this model: report it, do not count it as 0."""
    source: Literal["override", "genai-prices", "unpriced"]


_unknown: set[tuple[str, str | None]] = set()
"""(model, provider) pairs genai-prices does not know.

genai-prices caches its hits but re-scans every provider and model on each
miss, so misses are remembered here (bounded: model names come from clients).
"""


def find_override(model: str, overrides: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """Exact key first, then the first matching glob key in mapping order."""
    exact = overrides.get(model)
    if exact is not None:
        return exact
    for pattern, price in overrides.items():
        if not _GLOB_CHARS.isdisjoint(pattern) and fnmatch.fnmatchcase(model, pattern):
            return price
    return None


def to_genai_usage(usage: Usage) -> GPUsage:
    """Map our usage onto genai-prices' buckets without double counting.

    genai-prices prices ``input_tokens - cache_read_tokens - cache_write_tokens``
    at the input rate, so its ``input_tokens`` must include both cache buckets:
    ours already includes cache reads (OpenAI convention) but not cache writes
    (Anthropic reports those apart), hence the sum. ``output_tokens`` already
    includes reasoning tokens, which providers bill as output, so reasoning is
    not passed separately (it has no bucket there and must not be added twice).
    """
    return GPUsage(
        input_tokens=usage.input_tokens + usage.cache_write_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )


def price_call(
    usage: Usage, model: str, provider_id: str | None, overrides: Mapping[str, ModelPrice]
) -> Cost:
    """Cost of one call: override, else genai-prices, else unpriced."""
    override = find_override(model, overrides)
    if override is not None:
        return Cost(override.cost(usage), "override")
    key = (model, provider_id)
    if key in _unknown:
        return Cost(None, "unpriced")
    try:
        calc = calc_price(to_genai_usage(usage), model, provider_id=provider_id)
    except LookupError:
        if len(_unknown) >= _UNKNOWN_MAX:
            _unknown.clear()
        _unknown.add(key)
        return Cost(None, "unpriced")
    except ValueError:
        # Inconsistent usage (e.g. more cached than input tokens): refuse to guess.
        return Cost(None, "unpriced")
    return Cost(calc.total_price, "genai-prices")

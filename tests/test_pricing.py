"""price_call: overrides, genai-prices' bundled table, unpriced models."""

from __future__ import annotations

import socket
from decimal import Decimal
from typing import Any

import pytest

from agent_egress.addon import pricing
from agent_egress.addon.pricing import Cost, ModelPrice, price_call
from agent_egress.addon.protocols.usage import Usage

M = Decimal(1_000_000)
USAGE = Usage(input_tokens=12_000, cached_input_tokens=9_000, output_tokens=700,
              reasoning_tokens=300)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pricing must work offline: any connection attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pricing tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# Rates from genai_prices 0.0.61 data.py (provider "openai"), USD per MTok:
#   gpt-5.5 (matches "gpt-5.5"):             input 5,    cache read 0.5,   output 30
#   gpt-5   (matches "gpt-5-codex"):         input 1.25, cache read 0.125, output 10
#   gpt-5.1 (matches "gpt-5.1-codex"):       input 1.25, cache read 0.125, output 10
@pytest.mark.parametrize(
    ("model", "inp", "cached", "out"),
    [
        ("gpt-5.5", "5", "0.5", "30"),
        ("gpt-5-codex", "1.25", "0.125", "10"),
        ("gpt-5.1-codex", "1.25", "0.125", "10"),
    ],
)
@pytest.mark.parametrize("provider", ["openai", None])
def test_known_models_priced_exactly(
    model: str, inp: str, cached: str, out: str, provider: str | None
) -> None:
    # Uncached input at the input rate, cached input at the cache-read rate,
    # all output (reasoning included, once) at the output rate.
    expected = (3_000 * Decimal(inp) + 9_000 * Decimal(cached) + 700 * Decimal(out)) / M
    assert price_call(USAGE, model, provider, {}) == Cost(expected, "genai-prices")


def test_cached_input_is_cheaper_than_uncached() -> None:
    cold = price_call(Usage(input_tokens=10_000, output_tokens=100), "gpt-5.5", "openai", {})
    warm = price_call(Usage(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=100),
                      "gpt-5.5", "openai", {})
    assert cold.usd is not None and warm.usd is not None
    assert warm.usd < cold.usd
    assert cold.usd - warm.usd == 8_000 * (Decimal(5) - Decimal("0.5")) / M


def test_reasoning_not_double_counted() -> None:
    plain = price_call(Usage(input_tokens=100, output_tokens=1_000), "gpt-5.5", "openai", {})
    reasoned = price_call(Usage(input_tokens=100, output_tokens=1_000, reasoning_tokens=900),
                          "gpt-5.5", "openai", {})
    assert plain == reasoned
    assert plain.usd == (100 * 5 + 1_000 * 30) / M


def test_cache_writes_priced_at_write_rate() -> None:
    # genai_prices data.py, anthropic claude-sonnet-4-5 below its 200K tier:
    # input 3, cache write 3.75, cache read 0.3, output 15.
    usage = Usage(input_tokens=1_000, cached_input_tokens=400, cache_write_tokens=200,
                  output_tokens=100)
    expected = (600 * 3 + 400 * Decimal("0.3") + 200 * Decimal("3.75") + 100 * 15) / M
    assert price_call(usage, "claude-sonnet-4-5", "anthropic", {}) == Cost(
        expected, "genai-prices")


@pytest.mark.parametrize(("model", "provider"), [
    ("my-private-model", None),
    ("my-private-model", "openai"),
    ("gpt-5.5", "no-such-provider"),
])
def test_unknown_model_is_unpriced_not_free(model: str, provider: str | None) -> None:
    for _ in range(2):  # second time from the miss cache
        assert price_call(USAGE, model, provider, {}) == Cost(None, "unpriced")
    assert (model, provider) in pricing._unknown


def test_inconsistent_usage_is_unpriced() -> None:
    bad = Usage(input_tokens=10, cached_input_tokens=50, output_tokens=1)
    assert price_call(bad, "gpt-5.5", "openai", {}).source == "unpriced"


def test_override_wins_over_genai_prices() -> None:
    overrides = {"gpt-5.5": ModelPrice(Decimal(1), Decimal(2), Decimal("0.1"))}
    expected = (3_000 * 1 + 9_000 * Decimal("0.1") + 700 * 2) / M
    assert price_call(USAGE, "gpt-5.5", "openai", overrides) == Cost(expected, "override")


def test_override_rates_default_to_input_rate() -> None:
    usage = Usage(input_tokens=1_000, cached_input_tokens=400, cache_write_tokens=100,
                  output_tokens=10)
    assert price_call(usage, "m", None, {"m": ModelPrice(Decimal(2), Decimal(8))}).usd == (
        1_100 * 2 + 10 * 8) / M
    full = ModelPrice(Decimal(2), Decimal(8), Decimal("0.2"), Decimal("2.5"))
    assert price_call(usage, "m", None, {"m": full}).usd == (
        600 * 2 + 400 * Decimal("0.2") + 100 * Decimal("2.5") + 10 * 8) / M


def test_glob_overrides_exact_first_then_mapping_order() -> None:
    a = ModelPrice(Decimal(1), Decimal(1))
    b = ModelPrice(Decimal(2), Decimal(2))
    exact = ModelPrice(Decimal(3), Decimal(3))
    overrides = {"local-*": a, "local-big*": b, "local-big-2": exact}
    u = Usage(input_tokens=1_000_000)
    assert price_call(u, "local-big-2", None, overrides) == Cost(Decimal(3), "override")
    assert price_call(u, "local-big-1", None, overrides) == Cost(Decimal(1), "override")
    assert price_call(u, "local-small", None, overrides) == Cost(Decimal(1), "override")
    assert price_call(u, "LOCAL-small", None, overrides) == Cost(None, "unpriced")
    assert price_call(u, "gpt-5.5", "openai", {"gpt-*": a}).source == "override"


def test_no_price_update_thread_started() -> None:
    from genai_prices import data_snapshot, update_prices

    price_call(USAGE, "gpt-5.5", "openai", {})
    assert update_prices._global_update_prices is None
    assert data_snapshot._custom_snapshot is None

"""Gateway token format, checksum, scanning, hashing and header parsing."""

from __future__ import annotations

import hashlib
import hmac
import re
import string
import zlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent_egress.addon.tokens import (
    TOKEN_LENGTH,
    TOKEN_PATTERN,
    TOKEN_PREFIX,
    extract_token,
    find_tokens,
    generate_token,
    hash_token,
    is_well_formed,
    new_key_id,
    redact,
)

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def reference_token(random_part: str) -> str:
    """The format as documented, built independently so scanners can rely on it."""
    head = "aeg_" + random_part
    n, checksum = zlib.crc32(head.encode()), ""
    for _ in range(6):
        n, r = divmod(n, 62)
        checksum = BASE62[r] + checksum
    return head + checksum


def near_miss(token: str) -> str:
    """Same shape, wrong checksum."""
    last = token[-1]
    return token[:-1] + ("0" if last != "0" else "1")


def test_format() -> None:
    token = generate_token()
    assert TOKEN_PREFIX == "aeg_"
    assert len(token) == TOKEN_LENGTH == 40
    assert re.fullmatch(r"aeg_[0-9A-Za-z]{36}", token)
    assert token == reference_token(token[4:34])
    assert is_well_formed(token)
    assert generate_token() != token


@given(
    random_part=st.text(BASE62, min_size=30, max_size=30),
    position=st.integers(0, TOKEN_LENGTH - 1),
    replacement=st.one_of(st.sampled_from(BASE62), st.characters()),
)
def test_checksum_catches_any_substitution(
    random_part: str, position: int, replacement: str
) -> None:
    token = reference_token(random_part)
    assert is_well_formed(token)
    assume(replacement != token[position])
    assert not is_well_formed(token[:position] + replacement + token[position + 1 :])


def test_checksum_catches_every_base62_substitution_exhaustively() -> None:
    token = generate_token()
    for i in range(TOKEN_LENGTH):
        for c in BASE62.replace(token[i], ""):
            assert not is_well_formed(token[:i] + c + token[i + 1 :])


@pytest.mark.parametrize(
    "bad", ["", "aeg_", "aeg_" + "a" * 36, "AEG_" + "a" * 36, "ghp_" + "a" * 36]
)
def test_malformed(bad: str) -> None:
    assert not is_well_formed(bad)


def test_length_is_exact() -> None:
    token = generate_token()
    assert not is_well_formed(token + "a")
    assert not is_well_formed(token[:-1])
    assert not is_well_formed(f" {token}")


def test_find_tokens_in_text() -> None:
    a, b = generate_token(), generate_token()
    text = f'export OPENAI_API_KEY={a}\n{{"auth": "Bearer {b}"}}. and {near_miss(a)} too'
    assert find_tokens(text) == [a, b]
    assert find_tokens(f"x{a}") == []  # not word-bounded
    assert find_tokens(f"{a}0") == []  # too long
    assert [m[0] for m in TOKEN_PATTERN.finditer(text)] == [a, b, near_miss(a)]


def test_hash_is_keyed_and_stable() -> None:
    token, k1, k2 = generate_token(), b"k" * 32, b"j" * 32
    h = hash_token(token, k1)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == hash_token(token, k1)
    assert h == hmac.new(k1, token.encode(), hashlib.sha256).hexdigest()
    assert h != hash_token(token, k2)
    assert h != hash_token(generate_token(), k1)
    with pytest.raises(ValueError):
        hash_token(token, b"")


def test_new_key_id() -> None:
    key_id = new_key_id()
    assert re.fullmatch(r"key_[0-9a-f]{16}", key_id)
    assert new_key_id() != key_id


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer aeg_x", "aeg_x"),
        ("bearer aeg_x", "aeg_x"),
        ("BEARER   aeg_x  ", "aeg_x"),
        ("  Bearer\taeg_x\r\n", "aeg_x"),
        ("Bearer not-a-token", "not-a-token"),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("aeg_x", None),
        ("Bearerx aeg_x", None),
    ],
)
def test_extract_token(header: str | None, expected: str | None) -> None:
    assert extract_token(header) == expected


def test_redact() -> None:
    a, b = generate_token(), generate_token()
    bad = near_miss(a)
    out = redact(f"Authorization: Bearer {a}; other={b}; typo={bad}")
    assert out == f"Authorization: Bearer aeg_…[redacted]; other=aeg_…[redacted]; typo={bad}"
    assert find_tokens(out) == []
    assert redact("nothing here") == "nothing here"

"""Gateway tokens: what developers hold instead of provider keys.

GitHub-style: a fixed prefix makes a leaked token recognisable, and a CRC32
checksum lets secret scanners and our own log redaction confirm a match (and
lets the gateway reject typos) without touching the token store. The store
keeps only a keyed hash, so a dumped database cannot be replayed.
"""

from __future__ import annotations

import hmac
import re
import secrets
import zlib

TOKEN_PREFIX = "aeg_"  # noqa: S105 - a public marker, not a credential
TOKEN_LENGTH = 40
REDACTED = TOKEN_PREFIX + "…[redacted]"

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LENGTH = 30  # ~178 bits
_CHECKSUM_LENGTH = 6  # 62**6 > 2**32, so any CRC32 fits
_BODY = rf"{TOKEN_PREFIX}[0-9A-Za-z]{{{_RANDOM_LENGTH + _CHECKSUM_LENGTH}}}"

TOKEN_PATTERN = re.compile(rf"\b{_BODY}\b", re.ASCII)
"""Candidate tokens inside arbitrary text; confirm each with :func:`is_well_formed`."""
_EXACT = re.compile(_BODY, re.ASCII)


def _checksum(head: str) -> str:
    n = zlib.crc32(head.encode("ascii"))
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        n, r = divmod(n, 62)
        digits.append(_ALPHABET[r])
    return "".join(reversed(digits))


def generate_token() -> str:
    head = TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH))
    return head + _checksum(head)


def is_well_formed(token: str) -> bool:
    """Prefix, length, charset and checksum; says nothing about whether it is issued."""
    if _EXACT.fullmatch(token) is None:
        return False
    return token[-_CHECKSUM_LENGTH:] == _checksum(token[:-_CHECKSUM_LENGTH])


def find_tokens(text: str) -> list[str]:
    """Checksum-validated tokens in ``text``, in order, for scanners and redaction."""
    return [m[0] for m in TOKEN_PATTERN.finditer(text) if is_well_formed(m[0])]


def redact(text: str) -> str:
    """Replace every well-formed token so logs and transcripts never carry one."""
    return TOKEN_PATTERN.sub(lambda m: REDACTED if is_well_formed(m[0]) else m[0], text)


def hash_token(token: str, key: bytes) -> str:
    """HMAC-SHA256 hex, all the store keeps; keyed so a dump of the store alone
    cannot even confirm that a leaked token is one of ours.

    ``surrogateescape``: header values decoded from invalid UTF-8 may carry surrogates.
    """
    if len(key) < 16:
        raise ValueError("token hashing key is too short; use derive_key(master, ...)")
    data = token.encode("utf-8", "surrogateescape")
    return hmac.digest(key, data, "sha256").hex()  # one C call: it runs on every request


def new_key_id() -> str:
    """Non-secret record id, safe to show in CLIs and logs in place of the token."""
    return "key_" + secrets.token_hex(8)


def extract_token(authorization: str | None) -> str | None:
    """The credential of a ``Bearer`` Authorization header, well-formed or not.

    Returns None when there is no bearer credential, so the caller can tell
    "missing" from "malformed" and answer each with its own error.
    """
    if authorization is None:
        return None
    parts = authorization.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip()

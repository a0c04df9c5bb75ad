"""Logging set-up with a last line of defence: no token or provider key in any line."""

from __future__ import annotations

import logging

from . import tokens
from .keyring import Keyring


class RedactSecrets(logging.Filter):
    def __init__(self, keyring: Keyring | None) -> None:
        super().__init__()
        self.keyring = keyring

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = tokens.redact(msg)
        if self.keyring is not None:
            for name in self.keyring.names():
                value = self.keyring.get(name)
                if value and value in clean:
                    clean = clean.replace(value, f"[vault:{name}]")
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLevelName(
        level.upper())))


def install_redaction(keyring: Keyring | None) -> None:
    """Attach the filter to every root handler (records from all loggers pass there)."""
    for handler in logging.getLogger().handlers:
        for f in list(handler.filters):
            if isinstance(f, RedactSecrets):
                handler.removeFilter(f)
        handler.addFilter(RedactSecrets(keyring))

"""Logging set-up with a last line of defence: no token or provider key in any line."""

from __future__ import annotations

import logging

from . import tokens
from .keyring import Keyring


def scrub(text: str, keyring: Keyring | None) -> str:
    """``text`` with every gateway token and every vaulted value replaced by a marker."""
    clean = tokens.redact(text)
    if keyring is not None:
        for name in keyring.names():
            value = keyring.get(name)
            if value and value in clean:
                clean = clean.replace(value, f"[vault:{name}]")
    return clean


class RedactSecrets(logging.Filter):
    def __init__(self, keyring: Keyring | None) -> None:
        super().__init__()
        self.keyring = keyring

    def _clean(self, text: str) -> str:
        return scrub(text, self.keyring)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self._clean(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        # A traceback is formatted after the filters ran and exception messages carry
        # data (a request body, a URL): format it here, redacted; handlers reuse exc_text.
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


_FORMATTER = logging.Formatter()


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # mitmproxy's own event log is noisy at info; at debug it follows (the redaction
    # filter covers it too: tested with canaries in tests/test_secret_leaks.py)
    logging.getLogger("mitmproxy").setLevel(logging.DEBUG if level.lower() == "debug" else max(
        logging.WARNING, logging.getLevelName(level.upper())))


def install_redaction(keyring: Keyring | None) -> None:
    """Attach the filter to every root handler (records from all loggers pass there)."""
    for handler in logging.getLogger().handlers:
        for f in list(handler.filters):
            if isinstance(f, RedactSecrets):
                handler.removeFilter(f)
        handler.addFilter(RedactSecrets(keyring))

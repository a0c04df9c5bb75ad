"""Personal data via Presidio's analyzer, regex and checksum recognizers only.

No spaCy model can be installed (or downloaded at run time), so the analyzer
runs on ``NoOpNlpEngine``: recognizers that need NLP (names, places) are not
available, and the ones used are pattern + checksum based (credit cards with
Luhn, IBAN with its check digits, US SSN, e-mail, ...). Presidio's e-mail
recognizer validates domains with tldextract, whose default fetches the Public
Suffix List from the network on first use; ours uses tldextract's bundled
snapshot instead, so nothing is fetched, ever.

Most items hold no personal data, and ``AnalyzerEngine.analyze`` costs about as
much in set-up (a spaCy ``Doc``, context enhancement, logging) as its regexes.
So when every configured recognizer reports only its own patterns' matches, each
pattern is first searched for directly (skipped when its literal prefilter,
``prefilter.py``, rules it out); only when one matches does the analyzer run,
unchanged. A text no pattern matches gets no result from the analyzer either, so
the findings are the same (tests/test_guardrails_prefilter.py checks it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    PatternRecognizer,
    RecognizerRegistry,
)
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer.pattern_recognizer import REGEX_TIMEOUT_SECONDS
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MacAddressRecognizer,
    PhoneRecognizer,
    UkNinoRecognizer,
    UrlRecognizer,
    UsBankRecognizer,
    UsItinRecognizer,
    UsPassportRecognizer,
    UsSsnRecognizer,
)

from .config import PII_ENTITIES
from .prefilter import Gate, lowered_ascii, regex_gate

Hit = tuple[str, int, int]
_regex: Any = importlib.import_module("regex")  # Presidio's regex engine; no type stubs

_OFFLINE_TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer with the public suffix list from the bundled snapshot."""

    def validate_result(self, pattern_text: str) -> bool:
        return bool(_OFFLINE_TLD(pattern_text).fqdn)


_RECOGNIZERS: dict[str, Any] = {
    "CREDIT_CARD": CreditCardRecognizer,
    "CRYPTO": CryptoRecognizer,
    "EMAIL_ADDRESS": OfflineEmailRecognizer,
    "IBAN_CODE": IbanRecognizer,
    "IP_ADDRESS": IpRecognizer,
    "MAC_ADDRESS": MacAddressRecognizer,
    "PHONE_NUMBER": PhoneRecognizer,
    "UK_NINO": UkNinoRecognizer,
    "URL": UrlRecognizer,
    "US_BANK_NUMBER": UsBankRecognizer,
    "US_ITIN": UsItinRecognizer,
    "US_PASSPORT": UsPassportRecognizer,
    "US_SSN": UsSsnRecognizer,
}
ENTITIES = frozenset(_RECOGNIZERS)
assert ENTITIES == PII_ENTITIES  # the config validates against the same list


_PATTERN_ONLY = frozenset(ENTITIES - {"PHONE_NUMBER"})
"""Recognizers whose results are their patterns' matches (phone numbers come from the
phonenumbers library's own matcher instead)."""


_UNTIMED_CHARS = 2048
"""Texts up to this size are probed without Presidio's regex timeout: the ``regex``
module enforces it by reading ``CLOCK_PROCESS_CPUTIME_ID``, a system call, twice per
search (strace: 17 per scanned item with the four default entities). At this size
the slowest built-in pattern (URL's "Non schema URL": 1 s CPU on 2048 characters of
``a.a.``, timeout or not) ends far inside Presidio's 60 s; longer texts (scanned in a
worker thread) keep the timeout."""


class _Probe(NamedTuple):
    rx: Any
    """The pattern compiled as Presidio compiles it (``regex`` module, its flags)."""
    gate: Gate | None


def _probes(recognizer: PatternRecognizer) -> list[_Probe]:
    flags = int(recognizer.global_regex_flags or 0)
    patterns: list[Any] = list(getattr(recognizer, "patterns", None) or [])
    return [_Probe(_regex.compile(p.regex, flags=flags), regex_gate(str(p.regex), flags))
            for p in patterns]


class PiiScanner:
    """A Presidio analyzer limited to ``entities``; build once (imports spaCy's vocab)."""

    def __init__(self, entities: Sequence[str], score_threshold: float = 0.5,
                 prefilter: bool = True) -> None:
        unknown = sorted(set(entities) - ENTITIES)
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {sorted(ENTITIES)}")
        self.entities = list(entities)
        self.score_threshold = score_threshold
        recognizers: list[EntityRecognizer] = [_RECOGNIZERS[e]() for e in self.entities]
        engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        self._analyzer = AnalyzerEngine(registry=RecognizerRegistry(recognizers=recognizers),
                                        nlp_engine=engine, supported_languages=["en"])
        if "EMAIL_ADDRESS" in self.entities:
            # tldextract builds its suffix trie on first use (0.26 s wall on this busy box):
            # here, when the engine is built (``Guardrails.warm`` runs off the loop), not
            # on the loop when the first call carrying an e-mail address is scanned
            _OFFLINE_TLD("example.com")
        self._probes: list[_Probe] | None = None
        pattern_only = [r for r in recognizers if isinstance(r, PatternRecognizer)]
        if (prefilter and set(self.entities) <= _PATTERN_ONLY
                and len(pattern_only) == len(recognizers)):
            self._probes = [probe for r in pattern_only for probe in _probes(r)]

    def _may_find(self, text: str) -> bool:
        """False only if no recognizer's pattern matches (the analyzer would return [])."""
        assert self._probes is not None
        lowered = lowered_ascii(text)
        timeout = None if len(text) <= _UNTIMED_CHARS else REGEX_TIMEOUT_SECONDS
        for rx, required in self._probes:
            # the regex module folds case unlike re outside ASCII: gates on ASCII text only
            if required is not None and lowered is not None and not required.admits(
                    text, lowered):
                continue
            try:
                if rx.search(text, timeout=timeout) is not None:
                    return True
            except TimeoutError:
                return True  # the analyzer decides, timing out as it always has
        return False

    def scan(self, text: str) -> Iterator[Hit]:
        if not self.entities or not text:
            return
        if self._probes is not None and not self._may_find(text):
            return
        for r in self._analyzer.analyze(text, language="en", entities=self.entities,
                                        score_threshold=self.score_threshold):
            yield str(r.entity_type).lower(), int(r.start), int(r.end)

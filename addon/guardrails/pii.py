"""Personal data via Presidio's analyzer, regex and checksum recognizers only.

No spaCy model can be installed (or downloaded at run time), so the analyzer
runs on ``NoOpNlpEngine``: recognizers that need NLP (names, places) are not
available, and the ones used are pattern + checksum based (credit cards with
Luhn, IBAN with its check digits, US SSN, e-mail, ...). Presidio's e-mail
recognizer validates domains with tldextract, whose default fetches the Public
Suffix List from the network on first use; ours uses tldextract's bundled
snapshot instead, so nothing is fetched, ever.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import tldextract
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine
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

Hit = tuple[str, int, int]

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


class PiiScanner:
    """A Presidio analyzer limited to ``entities``; build once (imports spaCy's vocab)."""

    def __init__(self, entities: Sequence[str], score_threshold: float = 0.5) -> None:
        unknown = sorted(set(entities) - ENTITIES)
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {sorted(ENTITIES)}")
        self.entities = list(entities)
        self.score_threshold = score_threshold
        recognizers: list[EntityRecognizer] = [_RECOGNIZERS[e]() for e in self.entities]
        engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        self._analyzer = AnalyzerEngine(registry=RecognizerRegistry(recognizers=recognizers),
                                        nlp_engine=engine, supported_languages=["en"])

    def scan(self, text: str) -> Iterator[Hit]:
        if not self.entities or not text:
            return
        for r in self._analyzer.analyze(text, language="en", entities=self.entities,
                                        score_threshold=self.score_threshold):
            yield str(r.entity_type).lower(), int(r.start), int(r.end)

"""Prompt-injection heuristics, aimed first at tool outputs.

A file the agent read or a page it fetched can carry instructions meant for the
model ("ignore previous instructions", a fake ``system:`` turn) or hide them
from the human reviewing the transcript (zero-width, Unicode tag and bidi
control characters). Each signal adds to a score; the text is a hit when the
score reaches the policy's threshold. An operator may add a classifier (a
dotted-path callable) whose score is checked on its own.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator

from .prefilter import gate, lowered_ascii

Hit = tuple[str, int, int, float]
"""(rule, start, end, weight)."""

Classifier = Callable[[str, str], "float | None"]

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\u180e\ufeff]{2,}")
_TAG_CHARS = re.compile("[\U000e0000-\U000e007f]+")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
_ROLE_OVERRIDE = re.compile(
    r"(?im)^[ \t>#*-]*(?:<\|?(?:im_start|system|assistant)\|?>|\[/?(?:system|INST)\]"
    r"|(?:system|developer)\s*(?:prompt|message)?\s*:)"
)
_INSTRUCTIONS = re.compile(
    r"(?i)\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+|the\s+)?"
    r"(?:previous|prior|above|earlier|preceding|your|system)\s+"
    r"(?:instructions?|prompts?|rules|directions|guidelines|context)"
    r"|\byou\s+are\s+now\s+(?:a|an|in|the|DAN)\b"
    r"|\bnew\s+(?:system\s+)?instructions?\s*:"
    r"|\b(?:AI|LLM|assistant|agent|model|Codex|Claude|ChatGPT)s?\s*[,:]?\s+(?:must|should|please)"
    r"\s+(?:now\s+)?(?:ignore|run|execute|send|upload|curl|exfiltrate|reveal|print)\b"
    r"|\bdo\s+not\s+(?:tell|inform|mention\s+(?:this\s+)?to)\s+the\s+(?:user|human)\b"
)
_SIGNALS: tuple[tuple[str, re.Pattern[str], float], ...] = (
    ("zero_width", _ZERO_WIDTH, 1.0),
    ("tag_characters", _TAG_CHARS, 1.0),
    ("bidi_control", _BIDI, 0.5),
    ("role_override", _ROLE_OVERRIDE, 1.0),
    ("instructions", _INSTRUCTIONS, 1.0),
)
NON_ASCII_SIGNALS = frozenset({"zero_width", "tag_characters", "bidi_control"})
"""Signals made only of non-ASCII characters: an ASCII text cannot hold them."""
_GATED = tuple((name, rx, weight, gate(rx.pattern, rx.flags)) for name, rx, weight in _SIGNALS)


def heuristics(text: str) -> Iterator[Hit]:
    lowered = lowered_ascii(text)
    for name, rx, weight, required in _GATED:
        if lowered is not None and name in NON_ASCII_SIGNALS:
            continue
        if required is not None and not required.admits(text, lowered):
            continue  # the signal's literals are absent (prefilter.py)
        for m in rx.finditer(text):
            yield name, m.start(), m.end(), weight


def load_classifier(path: str) -> Classifier:
    """Import ``package.module:function`` (or ``package.module.function``)."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import the injection classifier {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"the injection classifier {path!r} is not callable")
    return fn  # type: ignore[no-any-return]

"""Runs one caller's checks over a text for a direction; pure and thread-safe.

``Guardrails`` resolves the policy for (org, team, key) and keeps one
``Engine`` per distinct policy; the expensive parts (Presidio analyzers, the
compiled secret rules, an operator classifier) are built once and shared.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING

from .config import Action, Direction, GuardrailsConfig, Resolved
from .custom import compile_rule
from .custom import scan as custom_scan
from .findings import Finding
from .injection import Classifier, heuristics, load_classifier
from .secrets import WEAK_RULES, SecretScanner

if TYPE_CHECKING:
    from .pii import PiiScanner

_NO_INJECTION_ROLES = frozenset({"system", "developer", "assistant"})
"""The agent's own prompt and the model's earlier turns are instructions by design."""


@lru_cache(maxsize=8)
def _secret_scanner(detect_secrets: bool, entropy: bool) -> SecretScanner:
    return SecretScanner(detect_secrets=detect_secrets, entropy=entropy)


@lru_cache(maxsize=8)
def _pii_scanner(entities: tuple[str, ...], threshold: float) -> PiiScanner:
    # Presidio imports spaCy (~85 MiB resident): only when a policy scans for PII
    from .pii import PiiScanner

    return PiiScanner(entities, threshold)


@lru_cache(maxsize=8)
def _classifier(path: str) -> Classifier:
    return load_classifier(path)


class Engine:
    def __init__(self, policy: Resolved) -> None:
        self.policy = policy
        self.fingerprint = hashlib.blake2b(policy.model_dump_json().encode(),
                                           digest_size=8).hexdigest()
        p = policy
        self._secrets = (_secret_scanner(p.secrets.detect_secrets, p.secrets.entropy)
                         if p.secrets.enabled else None)
        self._pii = (_pii_scanner(tuple(p.pii.entities), p.pii.score_threshold)
                     if p.pii.enabled and p.pii.entities else None)
        self._classifier = (_classifier(p.injection.classifier)
                            if p.injection.enabled and p.injection.classifier else None)
        self._custom = [(r, compile_rule(r)) for r in p.custom]

    def scans(self, direction: Direction) -> bool:
        return self.policy.scans(direction)

    def scan(self, text: str, direction: Direction, role: str | None = None) -> list[Finding]:
        """Every finding in ``text``, each with the action the policy gives it."""
        out: list[Finding] = []
        p = self.policy
        if self._secrets is not None and p.secrets.scans(direction):
            for rule, start, end in self._secrets.scan(text):
                action = p.secrets.action_for(direction, rule)
                if action is None:
                    continue
                if rule in WEAK_RULES and rule not in p.secrets.rules:
                    action = "flag"
                out.append(Finding("secrets." + rule, action, start, end))
        if self._pii is not None and p.pii.scans(direction):
            for rule, start, end in self._pii.scan(text):
                action = p.pii.action_for(direction, rule)
                if action is not None:
                    out.append(Finding("pii." + rule, action, start, end))
        if p.injection.scans(direction) and role not in _NO_INJECTION_ROLES:
            out.extend(self._injection(text, direction))
        for custom, rx in self._custom:
            if direction in custom.directions:
                out.extend(Finding("custom." + custom.name, custom.action, s, e)
                           for s, e in custom_scan(rx, text))
        return list(dict.fromkeys(out))  # detect-secrets and our rules may agree

    def _injection(self, text: str, direction: Direction) -> list[Finding]:
        check = self.policy.injection
        hits = list(heuristics(text))
        out: list[Finding] = []
        if hits and sum(w for *_, w in hits) >= check.threshold:
            for rule, start, end, _ in hits:
                action = check.action_for(direction, rule)
                if action is not None:
                    out.append(Finding("injection." + rule, action, start, end))
        if self._classifier is not None:
            score = self._classifier(text, direction)
            if score is not None and score >= check.classifier_threshold:
                action = check.action_for(direction, "classifier")
                if action is not None:
                    out.append(Finding("injection.classifier", action, 0, len(text)))
        return out


class Guardrails:
    """The configured policies; ``engine_for`` is cheap after the first call per key."""

    def __init__(self, config: GuardrailsConfig, max_keys: int = 10_000) -> None:
        self.config = config
        self._engines: dict[str, Engine] = {}
        self._by_key: OrderedDict[tuple[str, str, str], Engine] = OrderedDict()
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def engine_for(self, org: str, team: str, key_id: str) -> Engine:
        k = (org, team, key_id)
        with self._lock:
            engine = self._by_key.get(k)
            if engine is not None:
                self._by_key.move_to_end(k)
                return engine
        policy = self.config.resolve(org, team, key_id)
        fp = policy.model_dump_json()
        with self._lock:
            engine = self._engines.get(fp)
            if engine is None:
                engine = self._engines[fp] = Engine(policy)
            self._by_key[k] = engine
            while len(self._by_key) > self._max_keys:
                self._by_key.popitem(last=False)
        return engine

    def warm(self) -> None:
        """Build every configured policy's engine (imports Presidio; run off the loop).

        Raises ValueError for a policy that cannot be built (unknown PII entity,
        classifier that does not import)."""
        c = self.config
        for level in [c.default, *c.orgs.values(), *c.teams.values(), *c.keys.values()]:
            self._engines.setdefault(
                "warm:" + level.model_dump_json(),
                Engine(Resolved.model_validate({k: v for k, v in level if v is not None})))


def action_counts(findings: list[Finding]) -> dict[Action, int]:
    counts: dict[Action, int] = {"block": 0, "redact": 0, "flag": 0}
    for f in findings:
        counts[f.action] += 1
    return counts

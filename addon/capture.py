"""Opt-in message content for chat spans: who gets it, and redaction before anything else.

Off by default. ``telemetry.traces.capture_content`` turns it on for everyone;
``capture_content_overrides`` turns it on or off per org (``acme``) or team
(``acme/payments``; the team wins over its org). Every captured text is redacted
first with the guardrail engine the request path uses: the built-in secret and
PII rules for every direction, plus the caller's own policy (custom rules, extra
PII entities), and *every* hit is redacted whatever action the policy gives it
(a ``flag`` lets a secret reach the provider; it still never reaches a span).
Then each text is cut to ``capture_max_bytes``. Runs in a worker thread.
"""

from __future__ import annotations

from agent_egress.exporters.otel import CapturedContent

from .guardrails.config import DIRECTIONS, InjectionCheck, PiiCheck, Resolved, SecretsCheck
from .guardrails.engine import Engine, Guardrails
from .guardrails.findings import Finding, redact
from .policy import Traces
from .protocols import content

_TRUNCATED = "…[truncated]"


class ContentCapture:
    def __init__(self, cfg: Traces, guardrails: Guardrails | None) -> None:
        self.cfg = cfg
        self.guardrails = guardrails
        self._baseline: Engine | None = None

    @staticmethod
    def configured(cfg: Traces) -> bool:
        """True if any caller can have content captured (else nothing is built)."""
        return cfg.capture_content or any(cfg.capture_content_overrides.values())

    def enabled_for(self, api: str, org: str, team: str) -> bool:
        ov = self.cfg.capture_content_overrides
        on = ov.get(f"{org}/{team}", ov.get(org, self.cfg.capture_content))
        return on and content.supported(api)

    def warm(self) -> None:
        """Build the baseline engine (imports Presidio: run off the loop)."""
        self._baseline = Engine(Resolved(
            secrets=SecretsCheck(directions=DIRECTIONS, action="redact"),
            pii=PiiCheck(directions=DIRECTIONS, action="redact"),
            injection=InjectionCheck(enabled=False)))

    def build(self, api: str, org: str, team: str, key_id: str, request_body: bytes,
              response: bytes, streamed: bool) -> CapturedContent | None:
        """Redacted, capped content of one call (pure CPU: call it in a worker thread)."""
        if self._baseline is None:
            self.warm()
        assert self._baseline is not None
        engines = [self._baseline]
        if self.guardrails is not None:
            engines.append(self.guardrails.engine_for(org, team, key_id))
        cap = self.cfg.capture_max_bytes
        truncated = False

        def clean(text: str, direction: str, role: str) -> str:
            nonlocal truncated
            findings = [Finding(f.rule, "redact", f.start, f.end) for e in engines
                        for f in e.scan(text, direction, role)  # type: ignore[arg-type]
                        if not f.rule.startswith("injection.")]
            out = redact(text, findings)
            raw = out.encode()
            if len(raw) > cap:
                truncated = True
                out = raw[:cap].decode(errors="ignore") + _TRUNCATED
            return out

        got = content.extract(api, request_body, response, streamed, clean)
        if got is None:
            return None
        return CapturedContent(
            input_messages=content.dumps(got.input),
            output_messages=content.dumps(got.output),
            system_instructions=content.dumps(got.system) if got.system else None,
            truncated=truncated)

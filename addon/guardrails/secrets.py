"""Secret detection: detect-secrets' regex plugins plus our own rules.

detect-secrets supplies the maintained patterns (AWS key ids, GitHub ``gh?_``
tokens, Slack, Stripe live keys, private-key headers, JWTs, npm, PyPI, ...). Its
``analyze_string`` yields strings, not positions, so we run the plugins' own
``denylist`` regexes with ``finditer`` to know what to redact. Its entropy
plugins are off by default (lockfile hashes), and its keyword plugin is never
used (``password = x`` is everywhere in code). Our rules cover what it misses:
current OpenAI key shapes (``sk-proj-``, ``sk-svcacct-``), Anthropic, GitHub
fine-grained PATs, GCP, Stripe test keys, whole private-key blocks, and the
gateway's own tokens, checksum-validated (no false positives from look-alikes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from re import Pattern

from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import (
    Base64HighEntropyString,
    HexHighEntropyString,
    HighEntropyStringsPlugin,
)
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from .. import tokens
from .prefilter import gate, lowered_ascii, min_width

Hit = tuple[str, int, int]
"""(rule without the ``secrets.`` prefix, start, end)."""

_DETECT_SECRETS: tuple[type[RegexBasedDetector], ...] = (
    ArtifactoryDetector, AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector,
    CloudantDetector, DiscordBotTokenDetector, GitHubTokenDetector, GitLabTokenDetector,
    IbmCloudIamDetector, IbmCosHmacDetector, MailchimpDetector, NpmDetector, OpenAIDetector,
    PrivateKeyDetector, PypiTokenDetector, SendGridDetector, SlackDetector, SoftlayerDetector,
    SquareOAuthDetector, StripeDetector, TelegramBotTokenDetector, TwilioKeyDetector,
)
WEAK_RULES = frozenset({"basic_auth_credentials"})
"""Rules whose default action is at most ``flag``: ``user:pass@`` URLs are common in
docs, tests and local configs."""

# Our own rules (formats detect-secrets misses, or finds without their full extent).
_OWN: tuple[tuple[str, str], ...] = (
    ("openai_key", r"(?<![\w-])sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_-]{20,}"
                   r"|(?<![\w-])sk-[A-Za-z0-9]{40,}(?![\w-])"),
    ("anthropic_key", r"(?<![\w-])sk-ant-[a-z]{2,8}\d{0,2}-[A-Za-z0-9_-]{20,}"),
    ("github_token", r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ("aws_access_key", r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])"),
    ("aws_secret_key", r"(?i:aws_?secret_?access_?key|secretaccesskey)[\"']?\s*[:=]\s*[\"']?"
                       r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
    ("gcp_api_key", r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"),
    ("gcp_oauth_token", r"(?<![\w-])ya29\.[0-9A-Za-z_-]{30,}"),
    ("slack_token", r"(?<![\w-])xox[abposr]-[0-9A-Za-z-]{10,}"),
    ("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/-]{20,}"),
    ("stripe_key", r"(?<!\w)(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,}"),
    ("private_key", r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
                    r"(?:[\s\S]{0,16384}?-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"),
    ("jwt", r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
)


def _slug(secret_type: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", secret_type.lower()).strip("_")


class SecretScanner:
    """Finds secrets in a text; pure and thread-safe (compiled regexes only).

    Each rule is skipped when its literal prefilter (``prefilter.gate``) proves it
    cannot match; ``prefilter=False`` runs every rule (the reference in tests)."""

    def __init__(self, *, detect_secrets: bool = True, entropy: bool = False,
                 prefilter: bool = True) -> None:
        rules: list[tuple[str, Pattern[str]]] = [(n, re.compile(p)) for n, p in _OWN]
        if detect_secrets:
            for cls in _DETECT_SECRETS:
                name = _slug(str(cls.secret_type))
                rules.extend((name, rx) for rx in cls().denylist)
        self._rules = [(n, rx, gate(rx.pattern, rx.flags) if prefilter else None,
                        min_width(rx.pattern, rx.flags) if prefilter else 0)
                       for n, rx in rules]
        self._jwt = JwtTokenDetector.is_formally_valid
        self._entropy: list[tuple[str, HighEntropyStringsPlugin]] = (
            [("base64_high_entropy_string", Base64HighEntropyString(limit=4.5)),
             ("hex_high_entropy_string", HexHighEntropyString(limit=3.0))] if entropy else [])

    def scan(self, text: str) -> Iterator[Hit]:
        lowered = lowered_ascii(text)
        size = len(text)
        for name, rx, required, shortest in self._rules:
            if size < shortest:
                continue  # too short for any match ("hi", "run the tests")
            if required is not None and not required.admits(text, lowered):
                continue  # the rule's literals are absent: it cannot match
            for m in rx.finditer(text):
                start, end = m.span()
                if end == start:
                    continue
                if name == "jwt" and not self._jwt(m.group()):
                    continue
                yield name, start, end
        if tokens.TOKEN_PREFIX in text:
            for m in tokens.TOKEN_PATTERN.finditer(text):
                if tokens.is_well_formed(m[0]):  # checksum-valid only: no look-alikes
                    yield "gateway_token", m.start(), m.end()
        for name, plugin in self._entropy:
            for m in plugin.regex.finditer(text):
                value = m.group(2)
                if plugin.calculate_shannon_entropy(value) > plugin.entropy_limit:
                    yield name, m.start(2), m.end(2)

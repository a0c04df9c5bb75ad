"""Provider error bodies never hand a vaulted key (or a gateway token) to the client.

Providers echo the credential they were sent in some errors (OpenAI's 401 "Incorrect
API key provided: sk-..." shows part of it; a proxy or a self-hosted server may echo it
whole). The client must never see a provider key, so every upstream error answered
whole (not streamed) is scrubbed here, last in the chain, after every addon that may
set or rewrite a response. Successful and streamed bodies are not touched: models
never see the key, and scanning every stream would cost per-chunk work for nothing.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from .call import METADATA_KEY
from .keyring import Keyring
from .logs import scrub

log = logging.getLogger("agent_egress.scrub")


class ScrubErrors:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if (resp is None or resp.status_code < 400 or resp.stream
                or METADATA_KEY not in flow.metadata):
            return
        for name in set(resp.headers.keys()):
            values = resp.headers.get_all(name)
            cleaned = [scrub(v, self.keyring) for v in values]
            if cleaned != values:
                resp.headers.set_all(name, cleaned)
        try:
            text = resp.get_text(strict=True)
        except ValueError:  # not text in its charset: keys and tokens are ASCII anyway
            text = None
        if text is None:
            raw = (resp.raw_content or b"").decode("latin-1")
            clean = scrub(raw, self.keyring)
            if clean != raw:
                resp.raw_content = clean.encode("latin-1")
        else:
            clean = scrub(text, self.keyring)
            if clean != text:
                resp.text = clean
        if clean != (text if text is not None else raw):
            log.warning("a vaulted key or gateway token in the upstream error body of %s was"
                        " redacted", flow.metadata[METADATA_KEY].request_id)

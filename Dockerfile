# agent-egress gateway image: `docker build -t agent-egress:0.1.0 .`
# Runs as a non-root user; state (SQLite/vault file when used) under /var/lib/agent-egress.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AGENT_EGRESS_HOME=/var/lib/agent-egress

RUN groupadd --system --gid 10001 egress \
    && useradd --system --uid 10001 --gid egress --home-dir /var/lib/agent-egress egress \
    && install -d -o egress -g egress -m 0700 /var/lib/agent-egress

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY addon ./addon
COPY exporters ./exporters
# the locked, hash-checked dependencies (SECURITY.md), then the package itself
RUN pip install --require-hashes -r requirements.lock \
    && pip install --no-deps . && rm -rf /src

WORKDIR /var/lib/agent-egress
USER egress:egress

# reverse (OpenAI base URL), explicit proxy, admin (/healthz, /readyz, /metrics)
EXPOSE 8787 8080 9787

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9787/healthz', timeout=2)"]

ENTRYPOINT ["agent-egress"]
CMD ["run"]

"""`agent-egress`: run the gateway; manage the vault, tokens and spend reports.

The CLI works on the local store and vault (the same files a gateway on this
machine uses); the admin API on the admin listener is the remote equivalent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import getpass
import io
import json
import os
import re
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from agent_egress.exporters.audit import AuditEvent, AuditLog, cli_actor, verify

from . import logs
from .cli_admin import (
    KEY_COLUMNS,
    Api,
    ApiError,
    _print,
    _tags,
    add_parsers,
    fail,
    flatten,
    remote_options,
    run_verb,
)
from .cli_budgets import add_budget_parsers, run_budget_verb
from .policy import ConfigError, Settings, load_settings, resolve_home
from .store.base import SpendRow, Store
from .store.sql import open_store
from .vault import FileVault, SecretNotFound, Vault, load_master_key
from .vault.base import MASTER_KEY_FILE
from .vault.file import generate_master_key
from .vault.spec import VAULT_FILE, FileVaultSpec, open_vault

CODEX_ENV_VAR = "AGENT_EGRESS_TOKEN"


def parse_ttl(text: str) -> timedelta | None:
    """'30d', '12h', '45m', '2w' or 'never'."""
    if text in ("never", "0", "none"):
        return None
    m = re.fullmatch(r"(\d+)\s*([mhdw])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad --ttl {text!r}: use e.g. 30d, 12h, 45m, 2w, never")
    n, unit = int(m.group(1)), m.group(2)
    return {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n),
            "w": timedelta(weeks=n)}[unit]


def parse_when(text: str) -> datetime:
    """ISO date or datetime; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad date {text!r}: use YYYY-MM-DD or ISO 8601") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[tuple[str, ...], Any] = {}
    for attr, path in (("reverse_listen", ("listen", "reverse")),
                       ("proxy_listen", ("listen", "proxy")),
                       ("admin_listen", ("listen", "admin"))):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[path] = None if value == "off" else value
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _store(settings: Settings) -> Store:
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return open_store(settings.db_url)


def _audit(settings: Settings, action: str, target: str | None, outcome: str = "ok",
           **detail: str | None) -> None:
    """Every admin action from the CLI lands in the same hash-chained log."""
    AuditLog(settings.audit_file).append(AuditEvent(
        action=action, actor=cli_actor(), outcome=outcome, target=target, source="cli",
        detail={k: v for k, v in detail.items() if v is not None}))


def _vault(settings: Settings) -> Vault:
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return open_vault(settings.vault, home=settings.home)


# run / init ---------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.log_level)
    logs.install_redaction(None)
    from .gateway import serve

    return asyncio.run(serve(settings))


def cmd_init(args: argparse.Namespace) -> int:
    home = resolve_home()
    path: Path = args.path or home / "config.yaml"
    if path.exists() and not args.force:
        print(f"{path} exists; use --force to overwrite", file=sys.stderr)
        return 1
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = (resources.files("agent_egress.addon") / "example-config.yaml").read_text("utf-8")
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


# vault --------------------------------------------------------------------
def cmd_vault_set(args: argparse.Namespace) -> int:
    settings = _settings(args)
    vault = _vault(settings)
    if sys.stdin.isatty():
        value = getpass.getpass(f"value for {args.name} (input hidden): ")
    else:
        value = sys.stdin.read()
    value = value.strip()
    if not value:
        print("no value on stdin; usage: agent-egress vault set NAME < keyfile", file=sys.stderr)
        return 2
    info = vault.set(args.name, value)
    _audit(settings, "vault.set", info.name, fingerprint=info.fingerprint)
    print(f"stored {info.name} ({info.fingerprint}) in the {settings.vault.kind} vault")
    return 0


def cmd_vault_list(args: argparse.Namespace) -> int:
    vault = _vault(_settings(args))
    infos = vault.list()
    if args.format == "json":
        print(json.dumps([{"name": i.name, "fingerprint": i.fingerprint,
                           "updated_at": i.updated_at.isoformat()} for i in infos], indent=2))
        return 0
    if not infos:
        print("vault is empty; add a provider key: agent-egress vault set openai < keyfile")
    for i in infos:
        print(f"{i.name:<24} {i.fingerprint}  updated {i.updated_at:%Y-%m-%d %H:%M} UTC")
    return 0


def cmd_vault_delete(args: argparse.Namespace) -> int:
    settings = _settings(args)
    vault = _vault(settings)
    try:
        vault.delete(args.name)
    except SecretNotFound as e:
        _audit(settings, "vault.delete", args.name, outcome="error", reason="not found")
        print(str(e), file=sys.stderr)
        return 1
    _audit(settings, "vault.delete", args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_vault_rotate_kek(args: argparse.Namespace) -> int:
    """Re-wrap every data key under a new master key; values are not re-encrypted."""
    settings = _settings(args)
    spec = settings.vault
    if not isinstance(spec, FileVaultSpec):
        print(f"rotate-kek is for the file vault; a {spec.kind} vault's encryption keys are"
              " rotated in that service (KMS / transit)", file=sys.stderr)
        return 2
    current = load_master_key(settings.home)
    new_b64 = generate_master_key()
    key_file = settings.home / MASTER_KEY_FILE
    staged = key_file.with_suffix(".new")
    from_file = current.source.startswith("file:")
    if from_file:  # stage first: a crash after the re-wrap can still be recovered
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_b64 + "\n")
    vault = FileVault((spec.path or settings.home / VAULT_FILE).expanduser(), current.key)
    count = vault.rotate_kek(base64.b64decode(new_b64))
    _audit(settings, "vault.rotate_kek", None, secrets=str(count))
    if from_file:
        os.replace(staged, key_file)
        print(f"re-wrapped {count} secrets; the new master key is in {key_file}")
    else:
        print(f"re-wrapped {count} secrets. Set the new master key everywhere the old one was"
              f" set (it is shown once; the old key no longer opens the vault):\n\n"
              f"    AGENT_EGRESS_MASTER_KEY={new_b64}\n")
    return 0


# tokens -------------------------------------------------------------------
def codex_snippet(gateway_url: str, env_var: str = CODEX_ENV_VAR) -> str:
    return (
        "# ~/.codex/config.toml\n"
        'model_provider = "agent-egress"\n\n'
        "[model_providers.agent-egress]\n"
        'name = "agent-egress"\n'
        f'base_url = "{gateway_url}"\n'
        f'env_key = "{env_var}"\n'
        'wire_api = "responses"\n'
    )


def claude_snippet(gateway_url: str, token: str) -> str:
    """anthropic (issue 13): Claude Code's base URL has no /v1 (it adds /v1/messages)."""
    base = gateway_url.removesuffix("/").removesuffix("/v1")
    return (
        "# Claude Code: shell profile (e.g. ~/.bashrc)\n"
        f"export ANTHROPIC_BASE_URL={base}\n"
        f"export ANTHROPIC_AUTH_TOKEN={token}\n"
        "# optional tags: export ANTHROPIC_CUSTOM_HEADERS='x-egress-tag-project: atlas'\n"
    )


def _api(args: argparse.Namespace, settings: Settings | None = None) -> Api:
    settings = settings or _settings(args)
    url = getattr(args, "url", None)

    def notify(key_id: str | None) -> None:
        if url is None and key_id is not None:  # a remote gateway evicts by itself
            args._notified = _notify_revocation(settings, key_id)

    return Api(settings, url, getattr(args, "admin_token", None), notify)


def _ensure(api: Api, kind: str, name: str, parent_path: str, params: dict[str, Any]) -> str:
    """Id of the named org/team/user, created if it does not exist yet."""
    for e in api.call("GET", f"/{kind}s", params=params):
        if e["name"] == name:
            return str(e["id"])
    return str(api.call("POST", parent_path, {"name": name})["id"])


def cmd_token_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    api = _api(args, settings)
    org_id = _ensure(api, "org", args.org, "/orgs", {})
    team_id = _ensure(api, "team", args.team, f"/orgs/{org_id}/teams", {"org_id": org_id})
    user_id = _ensure(api, "user", args.user, f"/teams/{team_id}/users", {"team_id": team_id})
    ttl = args.ttl.total_seconds() / 86400 if args.ttl is not None else None
    out = api.call("POST", f"/users/{user_id}/keys", {
        "ttl_days": ttl, "models": args.model or [], "providers": args.provider or [],
        "routes": args.route or [], "tags": _tags(args.tag) or {},
        "description": args.description})
    token, key = out["token"], out["key"]
    url = args.gateway_url or f"http://{settings.listen.reverse}/v1"
    if args.format == "json":
        print(json.dumps({"token": token, "key_id": key["id"], "org": key["org"],
                          "team": key["team"], "user": key["user"],
                          "expires_at": key["expires_at"], "models": key["models"],
                          "base_url": url, "env_var": CODEX_ENV_VAR}))
        return 0
    exp = f"expires {key['expires_at'][:16]} UTC" if key["expires_at"] else "never expires"
    scope = f"; models {', '.join(key['models'])}" if key["models"] else ""
    print(f"Issued {key['id']} for {key['user']} (team {key['team']}, org {key['org']});"
          f" {exp}{scope}.")
    print("The token is shown once; it is stored only as a keyed hash.\n")
    print(f"    {token}\n")
    print(codex_snippet(url))
    print("# shell profile (e.g. ~/.bashrc)")
    print(f"export {CODEX_ENV_VAR}={token}")
    print()
    print(claude_snippet(url, token), end="")  # anthropic (issue 13)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    keys = _api(args).call("GET", "/keys")
    _print(keys, args.format, KEY_COLUMNS)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    args._notified = True
    key = _api(args).call("POST", f"/keys/{args.key_id}/revoke")
    print(f"revoked {key['id']} ({key['user']}, team {key['team']}); refused from the next"
          " request on" + ("" if args._notified else " (gateway not reachable: it sees the"
                                                      " revocation within a second)"))
    return 0


def cmd_token_rotate(args: argparse.Namespace) -> int:
    out = _api(args).call("POST", f"/keys/{args.key_id}/rotate",
                          {"grace_seconds": int(args.grace.total_seconds())})
    if args.format == "json":
        print(json.dumps({"token": out["token"], "key_id": out["key"]["id"],
                          "previous_valid_seconds": out["previous_valid_seconds"]}))
        return 0
    print(f"Rotated {out['key']['id']}: the old token keeps working for"
          f" {out['previous_valid_seconds']} s. New token (shown once):\n\n    {out['token']}\n")
    return 0


def cmd_token_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"models": args.model, "providers": args.provider,
                            "routes": args.route, "tags": _tags(args.tag),
                            "description": args.description}
    if args.disable or args.enable:
        body["disabled"] = bool(args.disable)
    key = _api(args).call("PATCH", f"/keys/{args.key_id}",
                          {k: v for k, v in body.items() if v is not None})
    _print(key, args.format, KEY_COLUMNS)
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    if args.cmd in ("budget", "ratelimit"):
        _print(flatten(run_budget_verb(_api(args), args)), args.format, args.columns)
        return 0
    _print(flatten(run_verb(_api(args), args)), args.format, args.columns)
    return 0


def _notify_revocation(settings: Settings, key_id: str) -> bool:
    """Tell gateways to drop their cached record now (their polls would within 0.25 s):
    every replica through Redis when configured, and the local one on its admin listener."""
    published = False
    if settings.redis_url:
        from .store.revocations import publish_sync

        published = publish_sync(settings.redis_url, settings.redis_prefix, key_id)
    url = f"http://{settings.listen.admin}/internal/keys/{key_id}/evict"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=2):
            return True
    except OSError:
        return published


# spend --------------------------------------------------------------------
SPEND_COLUMNS = ("calls", "input_tokens", "cached_input_tokens", "output_tokens",
                 "reasoning_tokens", "cost_usd", "unpriced_calls", "estimated_calls")


def _cell(value: object) -> str:
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    return str(value)


def render_spend(rows: list[SpendRow], by: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{by: r.group, **{c: str(getattr(r, c)) if c == "cost_usd"
                                          else getattr(r, c) for c in SPEND_COLUMNS}}
                           for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([by, *SPEND_COLUMNS])
        for r in rows:
            # exact amounts (nano-USD precision): the CSV must sum to the ledger to the cent
            w.writerow([r.group, *(str(getattr(r, c)) for c in SPEND_COLUMNS)])
        return buf.getvalue().rstrip("\n")
    table = [[by.upper(), *(c.upper() for c in SPEND_COLUMNS)]]
    table += [[r.group, *(_cell(getattr(r, c)) for c in SPEND_COLUMNS)] for r in rows]
    total = sum((r.cost_usd for r in rows), Decimal(0))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in table]
    lines.append(f"total cost_usd {total:.6f}")
    return "\n".join(lines)


def spend_group(value: str) -> str:
    if value in ("team", "user", "model", "org", "key", "provider", "agent", "billing") or (
            value.startswith("tag:") and len(value) > 4):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: one of org, team, user, key, model, provider, agent, billing, tag:<name>")


def parse_period(value: str) -> tuple[datetime, datetime]:
    """2026 | 2026-11 | 2026-11-25 -> [start, end) in UTC."""
    try:
        parts = [int(p) for p in value.split("-")]
        if len(parts) == 1:
            start = datetime(parts[0], 1, 1, tzinfo=UTC)
            return start, start.replace(year=parts[0] + 1)
        if len(parts) == 2:
            start = datetime(parts[0], parts[1], 1, tzinfo=UTC)
            end = (start + timedelta(days=32)).replace(day=1)
            return start, end
        if len(parts) == 3:
            start = datetime(parts[0], parts[1], parts[2], tzinfo=UTC)
            return start, start + timedelta(days=1)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{value!r}: a period is YYYY, YYYY-MM or YYYY-MM-DD")


def cmd_spend(args: argparse.Namespace) -> int:
    if args.period is not None:
        if args.since or args.until:
            raise ConfigError("--period and --since/--until are exclusive")
        args.since, args.until = args.period
    if args.url:
        data = _api(args).call("GET", "/spend", params={
            "by": args.by, "since": args.since.isoformat() if args.since else None,
            "until": args.until.isoformat() if args.until else None})
        rows = [SpendRow(group=d[args.by], calls=d["calls"], input_tokens=d["input_tokens"],
                         cached_input_tokens=d["cached_input_tokens"],
                         output_tokens=d["output_tokens"],
                         reasoning_tokens=d["reasoning_tokens"],
                         cost_usd=Decimal(d["cost_usd"]), unpriced_calls=d["unpriced_calls"],
                         estimated_calls=d["estimated_calls"]) for d in data]
    else:
        rows = _store(_settings(args)).spend(args.by, args.since, args.until)
    print(render_spend(rows, args.by, args.format))
    return 0


# audit --------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = args.path or settings.audit_file
    result = verify(path, expected_head=args.expected_head)
    if result.ok:
        print(f"ok: {result.records} records, chain intact; head {result.head}")
        return 0
    print(f"FAILED: {path}: {result.problem}", file=sys.stderr)
    return 1


def cmd_audit_tail(args: argparse.Namespace) -> int:
    path = _settings(args).audit_file
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()[-args.n:]
    for line in lines:
        print(line)
    return 0


# parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-egress", description=__doc__)
    p.add_argument("--config", type=Path, help="config file (default $AGENT_EGRESS_HOME/"
                   "config.yaml if present; env AGENT_EGRESS_CONFIG)")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="start the gateway")
    run.add_argument("--reverse-listen", help="HOST:PORT (env AGENT_EGRESS_REVERSE_LISTEN)")
    run.add_argument("--proxy-listen", help="HOST:PORT or off (env AGENT_EGRESS_PROXY_LISTEN)")
    run.add_argument("--admin-listen", help="HOST:PORT (env AGENT_EGRESS_ADMIN_LISTEN)")
    run.set_defaults(func=cmd_run)

    init = sub.add_parser("init", help="write a commented example config")
    init.add_argument("--path", type=Path)
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_init)

    vault = sub.add_parser("vault", help="provider keys").add_subparsers(dest="vcmd",
                                                                          required=True)
    vs = vault.add_parser("set", help="store a key read from stdin")
    vs.add_argument("name")
    vs.set_defaults(func=cmd_vault_set)
    vl = vault.add_parser("list", help="names and fingerprints (never values)")
    vl.add_argument("--format", choices=("table", "json"), default="table")
    vl.set_defaults(func=cmd_vault_list)
    vd = vault.add_parser("delete")
    vd.add_argument("name")
    vd.set_defaults(func=cmd_vault_delete)
    vr = vault.add_parser("rotate-kek", help="new master key; re-wraps data keys (file vault)")
    vr.set_defaults(func=cmd_vault_rotate_kek)

    token = sub.add_parser("token", help="gateway tokens").add_subparsers(dest="tcmd",
                                                                           required=True)
    ti = token.add_parser("issue", help="issue a token (printed once)")
    ti.add_argument("--user", required=True)
    ti.add_argument("--team", required=True)
    ti.add_argument("--org", default="default")
    ti.add_argument("--ttl", type=parse_ttl, default=timedelta(days=30),
                    help="30d (default), 12h, 2w, never")
    ti.add_argument("--description")
    ti.add_argument("--gateway-url", help="base URL developers use (default http://<reverse>/v1)")
    ti.add_argument("--format", choices=("text", "json"), default="text")
    ti.set_defaults(func=cmd_token_issue)
    tl = token.add_parser("list")
    tl.add_argument("--format", choices=("table", "json"), default="table")
    tl.set_defaults(func=cmd_token_list)
    tr = token.add_parser("revoke")
    tr.add_argument("key_id")
    tr.set_defaults(func=cmd_token_revoke)
    tro = token.add_parser("rotate", help="new token; the old one works for --grace")
    tro.add_argument("key_id")
    tro.add_argument("--grace", type=parse_ttl, default=timedelta(hours=1), help="default 1h")
    tro.add_argument("--format", choices=("text", "json"), default="text")
    tro.set_defaults(func=cmd_token_rotate)
    tu = token.add_parser("update", help="change scopes, tags, or disable/enable")
    tu.add_argument("key_id")
    tu.add_argument("--format", choices=("table", "json"), default="table")
    tu.add_argument("--description")
    onoff = tu.add_mutually_exclusive_group()
    onoff.add_argument("--disable", action="store_true")
    onoff.add_argument("--enable", action="store_true")
    tu.set_defaults(func=cmd_token_update)
    for q in (ti, tu):
        q.add_argument("--model", action="append", help="allowed model glob (repeatable)")
        q.add_argument("--provider", action="append", help="allowed provider (repeatable)")
        q.add_argument("--route", action="append",
                       help="allowed API glob, e.g. openai.responses* (repeatable)")
        q.add_argument("--tag", action="append", metavar="NAME=VALUE",
                       help="metadata recorded on every ledger row and span (repeatable)")
    for q in (ti, tl, tr, tro, tu):
        remote_options(q)
    add_parsers(sub, cmd_admin)
    add_budget_parsers(sub, cmd_admin)
    # issue 10: dashboards/alert rules as code and the finance report (own modules)
    from .cli_grafana import add_grafana_parsers, add_report_parser
    add_grafana_parsers(sub)
    add_report_parser(sub)
    from .cli_ca import add_ca_parsers  # egress proxy mode (issue 9)
    add_ca_parsers(sub)

    audit = sub.add_parser("audit", help="the hash-chained audit log").add_subparsers(
        dest="acmd", required=True)
    av = audit.add_parser("verify", help="check the chain: edited, removed or reordered records")
    av.add_argument("--path", type=Path, help="default $AGENT_EGRESS_HOME/audit.jsonl")
    av.add_argument("--expected-head", help="a head hash recorded earlier (detects truncation)")
    av.set_defaults(func=cmd_audit_verify)
    at = audit.add_parser("tail", help="the last records")
    at.add_argument("-n", type=int, default=20)
    at.set_defaults(func=cmd_audit_tail)

    spend = sub.add_parser("spend", help="spend report from the ledger")
    spend.add_argument("--by", type=spend_group, default="team",
                       help="org, team, user, key, model, provider, agent, billing (gateway"
                       " vs ChatGPT subscription-equivalent) or tag:<name>")
    spend.add_argument("--period", type=parse_period,
                       help="a calendar month (2026-11), day (2026-11-25) or year, UTC")
    spend.add_argument("--since", type=parse_when, help="inclusive, UTC unless an offset is given")
    spend.add_argument("--until", type=parse_when, help="exclusive")
    spend.add_argument("--format", choices=("table", "csv", "json"), default="table")
    spend.set_defaults(func=cmd_spend)
    remote_options(spend)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"agent-egress: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        return fail(e)


if __name__ == "__main__":
    sys.exit(main())

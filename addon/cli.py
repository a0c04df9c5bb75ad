"""`agent-egress`: run the gateway; manage the vault, tokens and spend reports.

The CLI works on the local store and vault (the same files a gateway on this
machine uses); the admin API on the admin listener is the remote equivalent.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import io
import json
import re
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from agent_egress.exporters.audit import AuditEvent, AuditLog, cli_actor, verify

from . import logs, tokens
from .policy import ConfigError, Settings, load_settings, resolve_home
from .store.base import SpendRow, Store
from .store.sql import open_store
from .vault import FileVault, SecretNotFound, derive_key, load_master_key

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


def _vault(settings: Settings) -> tuple[FileVault, bytes]:
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    mk = load_master_key(settings.home)
    return FileVault(settings.vault_file, mk.key), mk.key


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
    vault, _ = _vault(settings)
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
    print(f"stored {info.name} ({info.fingerprint}) in {vault.path}")
    return 0


def cmd_vault_list(args: argparse.Namespace) -> int:
    vault, _ = _vault(_settings(args))
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
    vault, _ = _vault(settings)
    try:
        vault.delete(args.name)
    except SecretNotFound as e:
        _audit(settings, "vault.delete", args.name, outcome="error", reason="not found")
        print(str(e), file=sys.stderr)
        return 1
    _audit(settings, "vault.delete", args.name)
    print(f"deleted {args.name}")
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


def cmd_token_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _, master = _vault(settings)
    store = _store(settings)
    token = tokens.generate_token()
    expires = None if args.ttl is None else datetime.now(UTC) + args.ttl
    record = store.create_key(
        key_id=tokens.new_key_id(),
        token_hash=tokens.hash_token(token, derive_key(master, "token-hash")),
        org=args.org, team=args.team, user=args.user, expires_at=expires,
        description=args.description,
    )
    _audit(settings, "token.issue", record.id, org=record.org, team=record.team,
           user=record.user, expires_at=expires.isoformat() if expires else None)
    url = args.gateway_url or f"http://{settings.listen.reverse}/v1"
    if args.format == "json":
        print(json.dumps({"token": token, "key_id": record.id, "org": record.org,
                          "team": record.team, "user": record.user,
                          "expires_at": expires.isoformat() if expires else None,
                          "base_url": url, "env_var": CODEX_ENV_VAR}))
        return 0
    exp = f"expires {expires:%Y-%m-%d %H:%M} UTC" if expires else "never expires"
    print(f"Issued {record.id} for {record.user} (team {record.team}, org {record.org}); {exp}.")
    print("The token is shown once; it is stored only as a keyed hash.\n")
    print(f"    {token}\n")
    print(codex_snippet(url))
    print("# shell profile (e.g. ~/.bashrc)")
    print(f"export {CODEX_ENV_VAR}={token}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    now = datetime.now(UTC)
    keys = store.list_keys()
    if args.format == "json":
        print(json.dumps([{
            "key_id": k.id, "org": k.org, "team": k.team, "user": k.user,
            "state": k.state(now), "created_at": k.created_at.isoformat(),
            "expires_at": k.expires_at.isoformat() if k.expires_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        } for k in keys], indent=2))
        return 0
    print(f"{'KEY ID':<22} {'ORG':<12} {'TEAM':<14} {'USER':<14} {'STATE':<8} EXPIRES")
    for k in keys:
        exp = f"{k.expires_at:%Y-%m-%d}" if k.expires_at else "never"
        print(f"{k.id:<22} {k.org:<12} {k.team:<14} {k.user:<14} {k.state(now):<8} {exp}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    record = store.revoke_key(args.key_id, datetime.now(UTC))
    if record is None:
        _audit(settings, "token.revoke", args.key_id, outcome="error", reason="no such key")
        print(f"no key {args.key_id!r}; see agent-egress token list", file=sys.stderr)
        return 1
    _audit(settings, "token.revoke", record.id, org=record.org, team=record.team,
           user=record.user)
    notified = _notify_revocation(settings, record.id)
    print(f"revoked {record.id} ({record.user}, team {record.team}); refused from the next"
          " request on" + ("" if notified else " (gateway not reachable: it sees the"
                             " revocation within a second)"))
    return 0


def _notify_revocation(settings: Settings, key_id: str) -> bool:
    """Tell the local gateway to drop its cached record now (its poll would within 0.25 s)."""
    url = f"http://{settings.listen.admin}/internal/keys/{key_id}/evict"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=2):
            return True
    except OSError:
        return False


# spend --------------------------------------------------------------------
SPEND_COLUMNS = ("calls", "input_tokens", "cached_input_tokens", "output_tokens",
                 "reasoning_tokens", "cost_usd", "unpriced_calls", "estimated_calls")


def _cell(value: object) -> str:
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    return str(value)


def render_spend(rows: list[SpendRow], by: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{by: r.group, **{c: _cell(getattr(r, c)) if c == "cost_usd"
                                          else getattr(r, c) for c in SPEND_COLUMNS}}
                           for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([by, *SPEND_COLUMNS])
        for r in rows:
            w.writerow([r.group, *(_cell(getattr(r, c)) for c in SPEND_COLUMNS)])
        return buf.getvalue().rstrip("\n")
    table = [[by.upper(), *(c.upper() for c in SPEND_COLUMNS)]]
    table += [[r.group, *(_cell(getattr(r, c)) for c in SPEND_COLUMNS)] for r in rows]
    total = sum((r.cost_usd for r in rows), Decimal(0))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in table]
    lines.append(f"total cost_usd {total:.6f}")
    return "\n".join(lines)


def cmd_spend(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    rows = store.spend(args.by, args.since, args.until)
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
    spend.add_argument("--by", choices=("team", "user", "model", "org", "key", "provider"),
                       default="team")
    spend.add_argument("--since", type=parse_when, help="inclusive, UTC unless an offset is given")
    spend.add_argument("--until", type=parse_when, help="exclusive")
    spend.add_argument("--format", choices=("table", "csv", "json"), default="table")
    spend.set_defaults(func=cmd_spend)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"agent-egress: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

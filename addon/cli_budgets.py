"""CLI verbs `budget` and `ratelimit`: calls on /v1/budgets and /v1/rate-limits."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .cli_admin import Api, ApiError, remote_options

BUDGET_COLUMNS = ("scope", "period", "mode", "usd", "tokens", "source")
STATUS_COLUMNS = ("scope", "period", "mode", "limit_usd", "spent_usd", "reserved_usd",
                  "remaining_usd", "limit_tokens", "spent_tokens", "remaining_tokens",
                  "resets_at")
RATE_COLUMNS = ("scope", "rpm", "tpm", "concurrent", "source")


def run_budget_verb(api: Api, args: argparse.Namespace) -> Any:
    verb = (args.cmd, args.sub)
    if verb == ("budget", "status"):
        rows = api.call("GET", "/budgets/status")
        return [r for r in rows if not args.scope or r["scope"] == args.scope]
    if verb == ("budget", "list"):
        return api.call("GET", "/budgets")
    if verb == ("budget", "set"):
        return api.call("PUT", "/budgets", {
            "scope": args.scope, "period": args.period, "mode": args.mode,
            "usd": args.usd, "tokens": args.tokens})
    if verb == ("budget", "delete"):
        return api.call("DELETE", "/budgets", params={"scope": args.scope,
                                                      "period": args.period})
    if verb == ("budget", "rebuild"):
        return api.call("POST", "/budgets/rebuild")
    if verb == ("ratelimit", "list"):
        return api.call("GET", "/rate-limits")
    if verb == ("ratelimit", "set"):
        return api.call("PUT", "/rate-limits", {"scope": args.scope, "rpm": args.rpm,
                                                "tpm": args.tpm, "concurrent": args.concurrent})
    if verb == ("ratelimit", "delete"):
        return api.call("DELETE", "/rate-limits", params={"scope": args.scope})
    raise ApiError(2, f"unknown verb {verb}")


def add_budget_parsers(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    scope_help = "user:<org>/<user> or key:<key id> (org/team budgets live in the config)"
    b = sub.add_parser("budget", help="budgets: status (limit, spent, reserved, remaining,"
                       " reset), list, set, delete").add_subparsers(dest="sub", required=True)
    st = b.add_parser("status", help="every budget in its current period")
    st.add_argument("--scope", help="only this scope, e.g. team:acme/payments")
    st.set_defaults(columns=STATUS_COLUMNS)
    ls = b.add_parser("list", help="configured and API-set budgets")
    ls.set_defaults(columns=BUDGET_COLUMNS)
    s = b.add_parser("set", help="set a user or key budget (replaces one of the same period)")
    s.add_argument("--scope", required=True, help=scope_help)
    s.add_argument("--period", required=True, choices=("daily", "weekly", "monthly", "total"))
    s.add_argument("--usd", help="limit in USD per period")
    s.add_argument("--tokens", type=int, help="limit in tokens per period")
    s.add_argument("--mode", choices=("hard", "soft"), default="hard")
    s.set_defaults(columns=BUDGET_COLUMNS)
    d = b.add_parser("delete", help="remove an API-set budget")
    d.add_argument("--scope", required=True, help=scope_help)
    d.add_argument("--period", required=True, choices=("daily", "weekly", "monthly", "total"))
    d.set_defaults(columns=("scope", "period", "deleted"))
    rb = b.add_parser("rebuild", help="re-derive the live counters from the ledger (root;"
                      " after a database outage; run while the gateways are idle)")
    rb.set_defaults(columns=("rebuilt",))
    r = sub.add_parser("ratelimit", help="rate limits per user or key: list, set, delete"
                       ).add_subparsers(dest="sub", required=True)
    rl = r.add_parser("list")
    rl.set_defaults(columns=RATE_COLUMNS)
    rs = r.add_parser("set", help="requests/minute, tokens/minute, calls in flight")
    rs.add_argument("--scope", required=True, help=scope_help)
    rs.add_argument("--rpm", type=int)
    rs.add_argument("--tpm", type=int)
    rs.add_argument("--concurrent", type=int)
    rs.set_defaults(columns=RATE_COLUMNS)
    rd = r.add_parser("delete")
    rd.add_argument("--scope", required=True, help=scope_help)
    rd.set_defaults(columns=("scope", "deleted"))
    for q in (st, ls, s, d, rb, rl, rs, rd):
        q.add_argument("--format", choices=("table", "json"), default="table")
        q.set_defaults(func=handler)
        remote_options(q)

"""The admin API fuzzed from its own OpenAPI document (schemathesis) with every admin role.

Each operation gets generated requests (bodies, queries, path ids: random ones and real
ids of two orgs), sent by org-admin, team-admin and viewer tokens, an org-wide viewer and
a token of another org; every answer must: not be a 5xx, conform to the document (status
code declared, content type, body schema), and respect the role: no 2xx for what the role
may not do, and no id of an org or team it may not see in any 2xx body.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import schemathesis
from conftest import Gateway
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 25  # per operation and mode (valid, invalid): ~1,200 requests
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
WRITE = ("POST", "PUT", "PATCH", "DELETE")


def _cli_json(gw: Gateway, *args: str) -> Any:
    return json.loads(gw.cli(*args, "--format", "json").stdout)


def _world(gw: Gateway) -> dict[str, Any]:
    for org, teams in (("acme", ("payments", "search")), ("globex", ("ops",))):
        for team in teams:
            gw.cli("token", "issue", "--org", org, "--team", team, "--user", f"u-{team}")
    ids: dict[str, Any] = {"keys": {}}
    for kind in ("org", "team", "user"):
        for e in _cli_json(gw, kind, "list"):
            ids[e["name"]] = e["id"]
    for k in _cli_json(gw, "token", "list"):
        ids["keys"][k["team"]] = k["id"]
    tokens = {}
    for name, args in (("org-admin", ("--role", "org-admin", "--org", "acme")),
                       ("team-admin", ("--role", "team-admin", "--org", "acme",
                                       "--team", "payments")),
                       ("org-viewer", ("--role", "viewer", "--org", "acme")),
                       ("team-viewer", ("--role", "viewer", "--org", "acme",
                                        "--team", "payments")),
                       ("other-org-admin", ("--role", "org-admin", "--org", "globex"))):
        tokens[name] = _cli_json(gw, "admin-token", "issue", *args)["token"]
    ids["tokens"] = tokens
    return ids


def _hidden_ids(role: str, ids: dict[str, Any]) -> set[str]:
    """Ids a role must never see in a successful answer."""
    if role == "other-org-admin":
        return {ids["acme"], ids["payments"], ids["search"], ids["u-payments"],
                ids["u-search"], ids["keys"]["payments"], ids["keys"]["search"]}
    hidden = {ids["globex"], ids["ops"], ids["u-ops"], ids["keys"]["ops"]}
    if role in ("team-admin", "team-viewer"):
        hidden |= {ids["search"], ids["u-search"], ids["keys"]["search"]}
    return hidden


def _may_not(role: str, method: str, path: str, case: Any) -> bool:
    """Writes the role may never get a 2xx for, whatever the ids (README: roles)."""
    if method == "GET":
        return False
    if path in ("/v1/orgs", "/v1/budgets/rebuild"):
        return True  # root only (the local CLI)
    if role.endswith("viewer"):
        return True
    if role == "team-admin":
        if path in ("/v1/orgs/{org_id}/teams", "/v1/orgs/{entity_id}"):
            return True
        if path == "/v1/admin-tokens":
            body = case.body if isinstance(case.body, dict) else {}
            return body.get("role") != "viewer"
    return False


def test_admin_api_fuzzed_with_every_role(gateway: Gateway) -> None:
    gw = gateway
    ids = _world(gw)
    roles = ids["tokens"]
    pool = [ids[n] for n in ("acme", "globex", "payments", "search", "ops", "u-payments",
                             "u-search", "u-ops")] + list(ids["keys"].values())
    schema = schemathesis.openapi.from_url(f"{gw.admin_url}/openapi.json")
    stats: Counter[str] = Counter()
    violations: list[str] = []
    t0 = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]

    def fuzz(op: Any, mode: schemathesis.GenerationMode) -> None:
        @given(data=st.data())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        def run(data: st.DataObject) -> None:
            case = data.draw(op.as_strategy(generation_mode=mode))
            for name in list(case.path_parameters or {}):
                if data.draw(st.booleans()):  # half the time a real id (of any org)
                    case.path_parameters[name] = data.draw(st.sampled_from(pool))
            role = data.draw(st.sampled_from(sorted(roles)))
            headers = {"authorization": f"Bearer {roles[role]}"}
            response = case.call(base_url=gw.admin_url, headers=headers)
            stats[f"{mode.value} {response.status_code // 100}xx"] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
            if 200 <= response.status_code < 300:
                if _may_not(role, op.method.upper(), op.path, case):
                    violations.append(f"{role} got {response.status_code} on {op.label}:"
                                      f" {case.path_parameters} {case.body!r:.200}")
                leaked = {i for i in _hidden_ids(role, ids) if i in response.text}
                if leaked:
                    violations.append(f"{role} saw {leaked} in {op.label}")

        try:
            run()
        except Unsatisfiable:
            # nothing to make invalid (no parameters or body, e.g. GET /v1/orgs)
            assert mode is schemathesis.GenerationMode.NEGATIVE, op.label
            stats["negative: nothing to negate"] += 1

    for op in operations:
        for mode in schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE:
            fuzz(op, mode)
    elapsed = time.monotonic() - t0
    print(f"\nadmin API fuzz: {len(operations)} operations, {sum(stats.values())} requests"
          f" ({dict(stats)}) in {elapsed:.1f} s")
    assert not violations, violations
    # both sides were exercised; invalid input is never accepted
    assert stats["positive 2xx"] and stats["positive 4xx"] and stats["negative 4xx"], stats
    assert "Traceback" not in gw.logs(), gw.logs()[-3000:]

"""The admin API fuzzed from its own OpenAPI document (schemathesis) with every admin role.

Each operation gets generated requests (bodies, queries, path ids: random ones and real
ids of two orgs), sent by org-admin, team-admin and viewer tokens, an org-wide viewer and
a token of another org; every answer must: not be a 5xx, conform to the document (status
code declared, content type, body schema), refuse what the document says is invalid
(schemathesis's negative-data check, which ignores negations that serialization undoes), and
respect the role: no 2xx for what the role may not do, and no id of an org or team it may
not see in any 2xx body.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import schemathesis
from conftest import Gateway
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_ROLE = 5  # per operation, mode (valid, invalid) and role: ~1,150 requests
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
WRITE = ("POST", "PUT", "PATCH", "DELETE")


def _cli_json(gw: Gateway, *args: str) -> Any:
    return json.loads(gw.cli(*args, "--format", "json").stdout)


def _world(gw: Gateway) -> dict[str, Any]:
    """Two orgs (acme: payments, search; globex: ops), a user with a key per team, and the
    five admin tokens. The local CLI (root) does only what root alone may: the orgs and an
    org-admin token each (two chains at once); the rest goes through the admin API."""
    def org_with_admin(name: str) -> tuple[str, str]:
        org_id = _cli_json(gw, "org", "create", name)["id"]
        return org_id, _cli_json(gw, "admin-token", "issue", "--role", "org-admin",
                                 "--org", org_id)["token"]

    with ThreadPoolExecutor(2) as pool:
        (acme, admin), (globex, other_admin) = pool.map(org_with_admin, ("acme", "globex"))

    def post(token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{gw.admin_url}/v1{path}", json=body, timeout=30,
                       headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 201, f"{path}: {r.status_code} {r.text}"
        data: dict[str, Any] = r.json()
        return data

    ids: dict[str, Any] = {"acme": acme, "globex": globex, "keys": {}}
    for org, token, teams in ((acme, admin, ("payments", "search")),
                              (globex, other_admin, ("ops",))):
        for team in teams:
            ids[team] = post(token, f"/orgs/{org}/teams", {"name": team})["id"]
            ids[f"u-{team}"] = post(token, f"/teams/{ids[team]}/users",
                                    {"name": f"u-{team}"})["id"]
            ids["keys"][team] = post(token, f"/users/{ids[f'u-{team}']}/keys",
                                     {})["key"]["id"]
    tokens = {"org-admin": admin, "other-org-admin": other_admin}
    for name, body in (("team-admin", {"role": "team-admin", "team_id": ids["payments"]}),
                       ("org-viewer", {"role": "viewer", "org_id": acme}),
                       ("team-viewer", {"role": "viewer", "team_id": ids["payments"]})):
        tokens[name] = post(admin, "/admin-tokens", body)["token"]
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

    exercised: Counter[tuple[str, str, str]] = Counter()
    accepted: list[str] = []

    def fuzz(op: Any, mode: schemathesis.GenerationMode, role: str) -> bool:
        """Send the role's requests; False if there is nothing to negate in the operation."""
        cases = op.as_strategy(generation_mode=mode)  # built once, drawn from per example
        headers = {"authorization": f"Bearer {roles[role]}"}

        @given(data=st.data())
        @settings(max_examples=EXAMPLES_PER_ROLE, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        def run(data: st.DataObject) -> None:
            case = data.draw(cases)
            for name in list(case.path_parameters or {}):
                if data.draw(st.booleans()):  # half the time a real id (of any org)
                    case.path_parameters[name] = data.draw(st.sampled_from(pool))
            response = case.call(base_url=gw.admin_url, headers=headers)
            stats[f"{mode.value} {response.status_code // 100}xx"] += 1
            exercised[op.label, mode.value, role] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
            if mode is schemathesis.GenerationMode.NEGATIVE:
                try:
                    case.validate_response(response, checks=[negative_data_rejection],
                                           headers=headers)
                except FailureGroup as e:  # collected: one run shows every such case
                    accepted.append(f"{role} {op.label} {response.status_code}: {e!s:.600}")
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
            return False
        return True

    # Every operation, in both modes, with every role (each its own examples): a role
    # is never left out by chance, as one drawn at random per example could be.
    fuzzed: list[tuple[str, str]] = []
    for op in operations:
        for mode in schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE:
            for role in sorted(roles):
                if not fuzz(op, mode, role):  # the same for every role: the schema's doing
                    stats["negative: nothing to negate"] += 1
                    break
            else:
                fuzzed.append((op.label, mode.value))
    elapsed = time.monotonic() - t0
    print(f"\nadmin API fuzz: {len(operations)} operations, {len(fuzzed)} operation-modes x"
          f" {len(roles)} roles, {sum(exercised.values())} requests ({dict(stats)})"
          f" in {elapsed:.1f} s")
    assert not violations, violations
    assert not accepted, "\n---\n".join(accepted)
    missed = [(op, mode, role) for op, mode in fuzzed for role in roles
              if not exercised[op, mode, role]]
    assert not missed, missed
    # both sides were exercised (invalid input is never accepted: checked per case above)
    assert stats["positive 2xx"] and stats["positive 4xx"] and stats["negative 4xx"], stats
    assert "Traceback" not in gw.logs(), gw.logs()[-3000:]

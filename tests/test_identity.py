"""Identity and access through a real gateway process: roles, scopes, tags, rotation."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PROVIDER_KEY, Gateway, run_codex
from fakeprovider import FakeProvider


def responses_body(model: str = "gpt-5.5") -> dict[str, Any]:
    return {"model": model, "input": "hi", "stream": True}


def llm(gw: Gateway, token: str, model: str = "gpt-5.5",
        headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", json=responses_body(model),
                      headers={"authorization": f"Bearer {token}", **(headers or {})},
                      timeout=10)


def cli_json(gw: Gateway, *args: str) -> Any:
    return json.loads(gw.cli(*args, "--format", "json").stdout)


def _acme_by_cli(gw: Gateway) -> dict[str, Any]:
    """The world of `acme`, built with the local CLI's org/team/user/admin-token verbs
    (the calls of one step at once: each is a ~1 s process start)."""
    ids: dict[str, Any] = {}

    def step(*calls: tuple[str, ...]) -> list[Any]:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda args: cli_json(gw, *args), calls))

    step(("org", "create", "acme"), ("org", "create", "other"))
    step(("team", "create", "--org", "acme", "payments"),
         ("team", "create", "--org", "acme", "search"),
         ("team", "create", "--org", "other", "ops"))
    step(("user", "create", "--org", "acme", "--team", "payments", "alice"),
         ("user", "create", "--org", "acme", "--team", "search", "bob"),
         ("user", "create", "--org", "other", "--team", "ops", "olga"))
    for listed in step(("org", "list"), ("team", "list"), ("user", "list")):
        ids.update({e["name"]: e["id"] for e in listed})
    tokens = step(*[("admin-token", "issue", "--role", role, "--org", org, *team)
                    for role, org, team in (("org-admin", "acme", ()),
                                            ("team-admin", "acme", ("--team", "payments")),
                                            ("viewer", "acme", ()),
                                            ("org-admin", "other", ()))])
    for name, out in zip(("org-admin", "team-admin", "viewer", "other-admin"), tokens,
                         strict=True):
        ids[name] = out["token"]
    return ids


def _acme_by_api(gw: Gateway) -> dict[str, Any]:
    """The same world, with the CLI (root) only for what only root may do: create the two
    orgs and an org-admin token for each. Everything else goes through the running
    gateway's admin API with those tokens (each CLI call is a ~1 s process start)."""
    def org_with_admin(name: str) -> tuple[str, str]:
        org_id = cli_json(gw, "org", "create", name)["id"]
        return org_id, cli_json(gw, "admin-token", "issue", "--role", "org-admin",
                                "--org", org_id)["token"]

    with ThreadPoolExecutor(2) as pool:  # two independent chains of two CLI calls
        (acme_id, admin), (other_id, other_admin) = pool.map(org_with_admin,
                                                             ("acme", "other"))
    ids: dict[str, Any] = {"acme": acme_id, "other": other_id, "org-admin": admin,
                           "other-admin": other_admin}

    def created(token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = api(gw, token, "POST", path, body)
        assert r.status_code == 201, f"{path}: {r.status_code} {r.text}"
        data: dict[str, Any] = r.json()
        return data

    for org, token, teams in (("acme", admin, (("payments", "alice"), ("search", "bob"))),
                              ("other", other_admin, (("ops", "olga"),))):
        for team, user in teams:
            ids[team] = created(token, f"/orgs/{ids[org]}/teams", {"name": team})["id"]
            ids[user] = created(token, f"/teams/{ids[team]}/users", {"name": user})["id"]
    ids["team-admin"] = created(admin, "/admin-tokens", {
        "role": "team-admin", "team_id": ids["payments"]})["token"]
    ids["viewer"] = created(admin, "/admin-tokens", {
        "role": "viewer", "org_id": ids["acme"]})["token"]
    return ids


@pytest.fixture
def acme(gateway: Gateway) -> dict[str, Any]:
    """Two orgs, two teams in acme, a user per team, and one admin token per role."""
    return _acme_by_api(gateway)


@pytest.fixture
def acme_by_cli(gateway: Gateway) -> dict[str, Any]:
    """`acme`, built with the CLI verbs themselves (for the test of the CLI)."""
    return _acme_by_cli(gateway)


def api(gw: Gateway, token: str | None, method: str, path: str,
        body: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{gw.admin_url}/v1{path}", json=body, headers=headers,
                         timeout=10)


def test_each_role_may_do_what_it_should_and_nothing_else(gateway: Gateway,
                                                          acme: dict[str, Any]) -> None:
    gw, ids = gateway, acme
    org_admin, team_admin, viewer = ids["org-admin"], ids["team-admin"], ids["viewer"]
    new_user = {"name": "carol"}
    key = {"ttl_days": 1}
    cases: list[tuple[str, str | None, str, str, dict[str, Any] | None, int]] = [
        ("no token", None, "GET", "/orgs", None, 401),
        ("bad token", "aeg_notarealtoken", "GET", "/orgs", None, 401),
        ("only root creates orgs", org_admin, "POST", "/orgs", {"name": "x"}, 403),
        ("org-admin: team in its org", org_admin, "POST", f"/orgs/{ids['acme']}/teams",
         {"name": "ml"}, 201),
        ("org-admin: not another org", org_admin, "POST", f"/orgs/{ids['other']}/teams",
         {"name": "ml"}, 403),
        ("team-admin: no teams", team_admin, "POST", f"/orgs/{ids['acme']}/teams",
         {"name": "ml2"}, 403),
        ("viewer: no teams", viewer, "POST", f"/orgs/{ids['acme']}/teams", {"name": "v"}, 403),
        ("team-admin: user in its team", team_admin, "POST",
         f"/teams/{ids['payments']}/users", new_user, 201),
        ("team-admin: not another team", team_admin, "POST",
         f"/teams/{ids['search']}/users", {"name": "dave"}, 403),
        ("viewer: no users", viewer, "POST", f"/teams/{ids['payments']}/users",
         {"name": "eve"}, 403),
        ("team-admin: key for its user", team_admin, "POST", f"/users/{ids['alice']}/keys",
         key, 201),
        ("team-admin: not for another team", team_admin, "POST",
         f"/users/{ids['bob']}/keys", key, 403),
        ("org-admin: key in its org", org_admin, "POST", f"/users/{ids['bob']}/keys", key, 201),
        ("org-admin: not in another org", org_admin, "POST", f"/users/{ids['olga']}/keys",
         key, 403),
        ("viewer: no keys", viewer, "POST", f"/users/{ids['alice']}/keys", key, 403),
        ("team-admin cannot mint an org-admin", team_admin, "POST", "/admin-tokens",
         {"role": "org-admin", "org_id": ids["acme"]}, 403),
        ("org-admin cannot mint for another org", org_admin, "POST", "/admin-tokens",
         {"role": "viewer", "org_id": ids["other"]}, 403),
        ("org-admin mints a team viewer", org_admin, "POST", "/admin-tokens",
         {"role": "viewer", "team_id": ids["payments"]}, 201),
        ("viewer reads spend", viewer, "GET", "/spend", None, 200),
        ("viewer cannot disable a team", viewer, "PATCH", f"/teams/{ids['search']}",
         {"disabled": True}, 403),
        ("team-admin cannot disable a team", team_admin, "PATCH", f"/teams/{ids['search']}",
         {"disabled": True}, 403),
        ("org-admin reads another org", org_admin, "GET", f"/orgs/{ids['other']}", None, 403),
    ]
    for name, token, method, path, body, want in cases:
        r = api(gw, token, method, path, body)
        assert r.status_code == want, f"{name}: {r.status_code} {r.text}"
        if want >= 400:
            err = r.json()["error"]
            assert err["message"] and err["code"], name
    # Visibility: each sees only its scope.
    org_keys = {k["user"] for k in api(gw, org_admin, "GET", "/keys").json()}
    team_keys = {k["user"] for k in api(gw, team_admin, "GET", "/keys").json()}
    assert org_keys == {"alice", "bob"} and team_keys == {"alice"}
    assert {o["name"] for o in api(gw, viewer, "GET", "/orgs").json()} == {"acme"}
    assert api(gw, ids["other-admin"], "GET", "/keys").json() == []
    # Team admin revokes its team's key, not another team's.
    bob_key = next(k for k in api(gw, org_admin, "GET", "/keys").json() if k["user"] == "bob")
    assert api(gw, team_admin, "POST", f"/keys/{bob_key['id']}/revoke").status_code == 403
    gw.stop()
    audit = [json.loads(x) for x in (gw.home / "audit.jsonl").read_text().splitlines()]
    refused = [r for r in audit if r["outcome"] == "refused"]
    assert len(refused) >= sum(1 for c in cases if c[5] in (401, 403)) + 1
    assert any(r["action"] == "admin_token.issue" and r["outcome"] == "refused" for r in audit)
    blob = json.dumps(audit)
    for token in (org_admin, team_admin, viewer):
        assert token not in blob


def test_bad_admin_input_is_a_clear_4xx_and_changes_nothing(gateway: Gateway,
                                                             acme: dict[str, Any]) -> None:
    gw, ids = gateway, acme
    admin = ids["org-admin"]
    before = api(gw, admin, "GET", "/teams").json()
    r = httpx.post(f"{gw.admin_url}/v1/orgs/{ids['acme']}/teams", content=b"{nope",
                   headers={"authorization": f"Bearer {admin}",
                            "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
    r = api(gw, admin, "POST", f"/orgs/{ids['acme']}/teams", {"name": "x", "extra": 1})
    assert r.status_code == 422 and "extra" in r.json()["error"]["message"]
    r = api(gw, admin, "POST", f"/orgs/{ids['acme']}/teams", {"name": "bad name!"})
    assert r.status_code == 422
    r = api(gw, admin, "POST", "/orgs/org_doesnotexist/teams", {"name": "x"})
    assert r.status_code == 404
    r = api(gw, admin, "POST", f"/orgs/{ids['acme']}/teams", {"name": "payments"})
    assert r.status_code == 409
    r = api(gw, admin, "GET", "/keys/key_nope")
    assert r.status_code == 404
    assert api(gw, admin, "GET", "/teams").json() == before
    # JSON types as documented, not coerced: `true` is no number, "30" no integer
    key_id = api(gw, admin, "POST", f"/users/{ids['alice']}/keys", {}).json()["key"]["id"]
    for path, body in ((f"/keys/{key_id}/rotate", {"grace_seconds": True}),
                       (f"/keys/{key_id}/rotate", {"grace_seconds": "30"}),
                       (f"/users/{ids['alice']}/keys", {"ttl_days": "30"}),
                       (f"/keys/{key_id}", {"disabled": 1})):
        method = "PATCH" if path == f"/keys/{key_id}" else "POST"
        r = api(gw, admin, method, path, body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", (body, r.text)
    assert api(gw, admin, "GET", f"/keys/{key_id}").json()["state"] == "active"
    # spend windows are ISO 8601 as documented: a bare number is not read as Unix time
    assert api(gw, admin, "GET", "/spend?since=2026-11-01").status_code == 200
    assert api(gw, admin, "GET", "/spend?since=2026-11-01T00:00:00Z&until=2026-12-01"
               ).status_code == 200
    for bad in ("since=5", "until=1732500000", "since=5.5e-247", "since=yesterday"):
        r = api(gw, admin, "GET", f"/spend?{bad}")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", (bad, r.text)
    spec = httpx.get(f"{gw.admin_url}/openapi.json").json()
    assert {"/v1/orgs", "/v1/users/{user_id}/keys", "/v1/keys/{key_id}/rotate",
            "/v1/admin-tokens", "/v1/spend"} <= set(spec["paths"])
    assert httpx.get(f"{gw.admin_url}/healthz").status_code == 200


def test_scopes_tags_rotation_and_disable_on_the_request_path(
        fake: FakeProvider, gateway: Gateway, acme: dict[str, Any]) -> None:
    gw, ids = gateway, acme
    admin = ids["org-admin"]
    fake.tool_calls = 0
    r = api(gw, admin, "POST", f"/users/{ids['alice']}/keys", {
        "models": ["gpt-5*"], "routes": ["openai.responses*"],
        "tags": {"project": "atlas", "cost-center": "cc-42"}})
    token, key_id = r.json()["token"], r.json()["key"]["id"]
    # In scope, with a request tag (key tags win over request tags of the same name).
    ok = llm(gw, token, headers={"x-egress-tag-ticket": "JIRA-7", "x-egress-tag-project": "x"})
    assert ok.status_code == 200
    sent = fake.requests[-1]
    assert not any(h.startswith("x-egress-tag") for h, _ in sent.headers)
    assert sent.header("authorization") == f"Bearer {PROVIDER_KEY}"
    row = gw.wait_ledger(1)[0]
    assert row["tags"] == {"ticket": "JIRA-7", "project": "atlas", "cost-center": "cc-42"}
    # Out of scope: model, then API.
    r = llm(gw, token, model="o3")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert "gpt-5*" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"authorization": f"Bearer {token}"},
                   json={"model": "gpt-5.5", "messages": []}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "route_not_allowed"
    bad = llm(gw, token, headers={"x-egress-tag-Bad.Name": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_tag"
    # Scope widened by an admin: effective at once on this replica.
    assert api(gw, admin, "PATCH", f"/keys/{key_id}", {"models": []}).status_code == 200
    assert llm(gw, token, model="o3").status_code == 200
    # Rotation: the old token works during the grace period, then says so.
    r = api(gw, admin, "POST", f"/keys/{key_id}/rotate", {"grace_seconds": 2})
    new_token = r.json()["token"]
    assert llm(gw, token).status_code == 200 and llm(gw, new_token).status_code == 200
    time.sleep(2.2)
    r = llm(gw, token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_rotated"
    assert llm(gw, new_token).status_code == 200
    # Disabling the team refuses its keys, naming why; enabling restores them.
    assert api(gw, admin, "PATCH", f"/teams/{ids['payments']}", {"disabled": True}
               ).status_code == 200
    r = llm(gw, new_token)
    assert r.status_code == 401 and "its team is" in r.json()["error"]["message"]
    api(gw, admin, "PATCH", f"/teams/{ids['payments']}", {"disabled": False})
    assert llm(gw, new_token).status_code == 200


def test_cli_with_url_uses_the_running_gateways_api(gateway: Gateway,
                                                    acme_by_cli: dict[str, Any]) -> None:
    gw, ids = gateway, acme_by_cli
    remote = ["--url", gw.admin_url, "--admin-token", ids["team-admin"]]
    out = gw.cli("token", "issue", "--org", "acme", "--team", "payments", "--user", "alice",
                 "--format", "json", *remote).stdout
    key_id = json.loads(out)["key_id"]
    listed = json.loads(gw.cli("token", "list", "--format", "json", *remote).stdout)
    assert {k["user"] for k in listed} == {"alice"}
    res = gw.cli("token", "issue", "--org", "acme", "--team", "search", "--user", "bob",
                 *remote, check=False)
    assert res.returncode == 1 and "may not" in res.stderr
    gw.cli("token", "revoke", key_id, *remote)
    res = gw.cli("org", "list", "--url", gw.admin_url, check=False)  # no admin token
    assert res.returncode == 1 and "admin token" in res.stderr


def test_rotating_the_master_key_keeps_tokens_and_provider_keys(
        tmp_path: Path, fake: FakeProvider) -> None:
    from conftest import make_gateway
    gw = make_gateway(tmp_path, fake.base_url)
    token, _ = gw.issue_token()
    old_key = (gw.home / "master.key").read_text()
    out = gw.cli("vault", "rotate-kek").stdout
    assert "re-wrapped" in out and (gw.home / "master.key").read_text() != old_key
    assert not (gw.home / "master.key.new").exists()
    assert "openai" in gw.cli("vault", "list").stdout
    gw.start()
    try:
        fake.tool_calls = 0
        assert llm(gw, token).status_code == 200  # issued before the rotation
        assert fake.requests[-1].header("authorization") == f"Bearer {PROVIDER_KEY}"
    finally:
        gw.stop()


@pytest.mark.codex
def test_codex_with_a_key_scoped_to_another_model_shows_our_refusal(
        tmp_path: Path, fake: FakeProvider, gateway: Gateway) -> None:
    out = json.loads(gateway.cli("token", "issue", "--user", "frank", "--team", "ml",
                                 "--model", "gpt-4o*", "--format", "json").stdout)
    res = run_codex(tmp_path, gateway.base_url, out["token"])  # Codex asks for gpt-5.5
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"gateway token {out['key_id']} may use models gpt-4o*" in text, text[-2000:]
    assert "'gpt-5.5'" in text
    assert fake.requests == []


def test_provider_key_is_chosen_by_team_and_project(tmp_path: Path,
                                                    fake: FakeProvider) -> None:
    from conftest import make_gateway
    keys = {"openai": PROVIDER_KEY, "openai-payments": "sk-proj-PAYMENTSkey0000000000000000",
            "openai-atlas": "sk-proj-ATLASproject00000000000000000"}
    gw = make_gateway(tmp_path, fake.base_url, providers=[{
        "name": "openai", "kind": "openai", "base_url": fake.base_url, "key": "openai",
        "keys": [{"name": "openai-atlas", "projects": ["atlas"]},
                 {"name": "openai-payments", "teams": ["payments"]}]}])
    for name, value in keys.items():
        gw.cli("vault", "set", name, input=value)
    gw.start()
    try:
        fake.tool_calls = 0
        pay, _ = gw.issue_token(user="alice", team="payments")
        other, _ = gw.issue_token(user="bob", team="search")
        assert llm(gw, pay).status_code == 200
        assert llm(gw, other).status_code == 200
        assert llm(gw, other, headers={"x-egress-tag-project": "atlas"}).status_code == 200
        seen = [r.header("authorization") for r in fake.requests]
        assert seen == [f"Bearer {keys['openai-payments']}", f"Bearer {keys['openai']}",
                        f"Bearer {keys['openai-atlas']}"]
    finally:
        gw.stop()

"""`agent-egress grafana push` against a local HTTP server that checks the Grafana API
paths, the bearer token and the payloads (dashboards, folder, alert rule groups)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent_egress.exporters import grafana_alerting, grafana_dashboards

AGENT_EGRESS = str(Path(sys.executable).parent / "agent-egress")
TOKEN = "glsa_TESTtoken0123456789abcdef"


class FakeGrafana(ThreadingHTTPServer):
    """Answers the Grafana 11 HTTP API calls `push` makes; records every request."""

    def __init__(self, folder_exists: bool = False, token: str = TOKEN) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.folder_exists = folder_exists
        self.token = token
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeGrafana

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.server.calls.append((self.command, self.path,
                                  {k.lower(): v for k, v in self.headers.items()}, body))
        if self.headers.get("authorization") != f"Bearer {self.server.token}":
            return self._reply(401, {"message": "Unauthorized"})
        route = (self.command, self.path)
        if route == ("GET", "/api/folders/agent-egress"):
            if self.server.folder_exists:
                return self._reply(200, {"uid": "agent-egress", "title": "agent-egress"})
            return self._reply(404, {"message": "folder not found"})
        if route == ("POST", "/api/folders"):
            self.server.folder_exists = True
            return self._reply(200, {"uid": body["uid"], "title": body["title"]})
        if route == ("POST", "/api/dashboards/db"):
            return self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"]})
        if self.command == "PUT" and self.path.startswith(
                "/api/v1/provisioning/folder/agent-egress/rule-groups/"):
            return self._reply(200, body)
        return self._reply(404, {"message": f"unexpected {self.command} {self.path}"})

    do_GET = do_POST = do_PUT = _handle


def push(server: FakeGrafana, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT_EGRESS, "grafana", "push", "--url", server.url,
                           "--token", token], capture_output=True, text=True, timeout=60)


def test_push_creates_the_folder_then_uploads_dashboards_and_rule_groups() -> None:
    server = FakeGrafana()
    try:
        res = push(server)
        assert res.returncode == 0, res.stderr
        paths = [(m, p) for m, p, _, _ in server.calls]
        dashboards = grafana_dashboards.dashboards()
        groups = grafana_alerting.grafana_rules()
        assert paths == [
            ("GET", "/api/folders/agent-egress"), ("POST", "/api/folders"),
            *[("POST", "/api/dashboards/db")] * len(dashboards),
            *[("PUT", f"/api/v1/provisioning/folder/agent-egress/rule-groups/{g['title']}")
              for g in groups]]
        assert all(h["authorization"] == f"Bearer {TOKEN}" for _, _, h, _ in server.calls)
        assert server.calls[1][3] == {"title": "agent-egress", "uid": "agent-egress"}
        sent = [b for m, p, _, b in server.calls if p == "/api/dashboards/db"]
        assert [b["dashboard"]["uid"] for b in sent] == [d.body["uid"] for d in dashboards]
        for b, d in zip(sent, dashboards, strict=True):
            assert b["folderUid"] == "agent-egress" and b["overwrite"] is True
            assert b["dashboard"]["id"] is None
            assert {k: v for k, v in b["dashboard"].items() if k != "id"} == d.body
        rule_groups = [b for m, _, _, b in server.calls if m == "PUT"]
        assert sum(len(g["rules"]) for g in rule_groups) == 15
        for g in rule_groups:
            assert g["folderUid"] == "agent-egress" and g["interval"] == 30
            for r in g["rules"]:
                assert r["orgID"] == 1 and r["condition"] == "C" and r["folderUID"] == (
                    "agent-egress") and r["ruleGroup"] == g["title"]
                assert [q["refId"] for q in r["data"]] == ["A", "B", "C"]
                assert r["data"][0]["datasourceUid"] == "prometheus"
                assert "agent_egress_" in r["data"][0]["model"]["expr"]
                assert "$" not in r["data"][0]["model"]["expr"].replace('"$1"', "")
        assert "dashboard agent-egress-cost" in res.stdout
        # again: the folder exists now, nothing is created twice, the same objects are put
        server.calls.clear()
        res = push(server)
        assert res.returncode == 0, res.stderr
        assert ("POST", "/api/folders") not in [(m, p) for m, p, _, _ in server.calls]
        assert len(server.calls) == 1 + len(dashboards) + len(groups)
    finally:
        server.shutdown()


def test_a_rejected_token_fails_without_echoing_it() -> None:
    server = FakeGrafana(token="glsa_the-right-one")
    try:
        res = push(server)
        assert res.returncode == 1
        assert "grafana push" in res.stderr and "401" in res.stderr
        assert TOKEN not in res.stderr + res.stdout
        assert len(server.calls) == 1  # stopped at the first refusal
    finally:
        server.shutdown()

"""`agent-egress grafana generate|push`: dashboards and alert rules as code.

`generate` writes what is committed under grafana/ (a test regenerates and diffs);
`push` uploads the same dashboards and alert rules to an existing Grafana through its
HTTP API with grafana-client. The generators import grafana-foundation-sdk, so they are
imported only when a grafana verb runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GRAFANA_DIR = Path("grafana")


def generated_files() -> dict[str, str]:
    """Relative path under grafana/ -> file text, for every generated file."""
    from agent_egress.exporters import grafana_alerting, grafana_dashboards, grafana_rules

    files = {"alerts/agent-egress.rules.yml": grafana_rules.render()}
    for d in grafana_dashboards.dashboards():
        files[f"dashboards/{d.name}"] = json.dumps(d.body, indent=2, sort_keys=True) + "\n"
    files["provisioning/alerting/agent-egress.yaml"] = (
        grafana_alerting.HEADER + grafana_rules.dump(grafana_alerting.provisioning()))
    return files


def cmd_generate(args: argparse.Namespace) -> int:
    out: Path = args.out
    for rel, text in generated_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


def push(url: str, token: str, folder: str = "agent-egress",
         datasource_uid: str = "prometheus", timeout: float = 10.0) -> list[str]:
    """Create the folder if missing, then upsert every dashboard and alert rule group.

    Idempotent: dashboards are saved with overwrite, rule groups replaced whole (PUT).
    Returns one line per object written.
    """
    from grafana_client import GrafanaApi  # type: ignore[import-untyped]
    from grafana_client.client import GrafanaClientError  # type: ignore[import-untyped]

    from agent_egress.exporters import grafana_alerting, grafana_dashboards

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    done: list[str] = []
    try:
        api.folder.get_folder(folder)
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        api.folder.create_folder(folder, uid=folder)
        done.append(f"folder {folder} created")
    for d in grafana_dashboards.dashboards():
        api.dashboard.update_dashboard({"dashboard": {**d.body, "id": None},
                                        "folderUid": folder, "overwrite": True,
                                        "message": "agent-egress grafana push"})
        done.append(f"dashboard {d.body['uid']}")
    for group in grafana_alerting.grafana_rules(datasource_uid, folder_uid=folder):
        group = {**group, "rules": [{**r, "orgID": 1} for r in group["rules"]]}
        api.alertingprovisioning.update_rule_group(folder, group["title"], group)
        done.append(f"rule group {group['title']} ({len(group['rules'])} rules)")
    return done


def cmd_push(args: argparse.Namespace) -> int:
    from grafana_client.client import GrafanaException  # type: ignore[import-untyped, unused-ignore]

    try:
        done = push(args.url, args.token, folder=args.folder,
                    datasource_uid=args.datasource_uid, timeout=args.timeout)
    except GrafanaException as e:
        # status and Grafana's own message; never the token
        print(f"agent-egress: grafana push to {args.url} failed: HTTP {e.status_code}:"
              f" {e.message}", file=sys.stderr)
        return 1
    except OSError as e:  # connection refused, DNS, TLS (requests' errors are OSErrors)
        print(f"agent-egress: grafana push to {args.url} failed: {e}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    return 0


def add_grafana_parsers(sub: Any) -> None:
    g = sub.add_parser("grafana", help="dashboards and alert rules as code").add_subparsers(
        dest="gcmd", required=True)
    gen = g.add_parser("generate", help="write dashboards, Prometheus rules and Grafana alert"
                       " provisioning under --out (default ./grafana)")
    gen.add_argument("--out", type=Path, default=GRAFANA_DIR)
    gen.set_defaults(func=cmd_generate)
    push = g.add_parser("push", help="upload dashboards and alert rules to a Grafana")
    push.add_argument("--url", required=True, help="Grafana base URL, e.g. https://grafana:3000")
    push.add_argument("--token", required=True,
                      help="service account token (Editor, plus alert rule write)")
    push.add_argument("--folder", default="agent-egress", help="folder title (and uid)")
    push.add_argument("--datasource-uid", default="prometheus",
                      help="uid of the Prometheus data source the alert rules query")
    push.add_argument("--timeout", type=float, default=10.0)
    push.set_defaults(func=cmd_push)


def add_report_parser(sub: Any) -> None:
    """`agent-egress report` (addon/report.py), registered here to keep cli.py's edit small."""
    from .report import add_parser

    add_parser(sub)

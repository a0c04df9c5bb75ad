"""A local stand-in for HashiCorp Vault's KV version 2 HTTP API, for tests.

No Vault server can run here, so this serves the documented exchange hvac
speaks (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2):
``GET/POST/DELETE /v1/{mount}/data/{path}``, ``LIST`` (or ``GET ?list=true``),
``GET`` and ``DELETE /v1/{mount}/metadata/{path}``. It checks ``X-Vault-Token``
(403 ``{"errors": ["permission denied"]}`` otherwise), answers in Vault's JSON
envelope, and records every request so tests can assert paths and payloads.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class _Secret:
    created_time: str
    updated_time: str
    current_version: int = 0
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)

    def version_meta(self, n: int) -> dict[str, Any]:
        v = self.versions[n]
        return {
            "created_time": v["created_time"],
            "custom_metadata": None,
            "deletion_time": v["deletion_time"],
            "destroyed": v["destroyed"],
            "version": n,
        }


def _now() -> str:
    """Vault's timestamps: RFC 3339 in UTC with nanoseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


class KV2Server:
    def __init__(self, token: str = "s.test-root-token", mounts: tuple[str, ...] = ("secret",)):
        self.tokens = {token}
        self.token = token
        self.mounts: dict[str, dict[str, _Secret]] = {m: {} for m in mounts}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> KV2Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # -- the API -------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        payload = json.loads(body) if body else None
        with self._lock:
            self.requests.append(Recorded(method, url.path, query, headers, payload))
            if headers.get("x-vault-token") not in self.tokens:
                return 403, {"errors": ["permission denied"]}
            parts = unquote(url.path).split("/", 4)  # "", "v1", mount, kind, path
            if len(parts) < 4 or parts[1] != "v1" or parts[2] not in self.mounts:
                route = "/".join(parts[2:])
                return 404, {"errors": [f'no handler for route "{route}". route entry not found.']}
            store, kind, path = self.mounts[parts[2]], parts[3], parts[4] if len(parts) > 4 else ""
            if method == "LIST" or (method == "GET" and query.get("list") == ["true"]):
                return self._list(store, path) if kind == "metadata" else _unsupported()
            verb = "post" if method == "PUT" else method.lower()  # Vault treats PUT as POST
            handler = getattr(self, f"_{kind}_{verb}", None)
            return handler(store, path, query, payload) if handler else _unsupported()

    def _data_get(self, store: dict[str, _Secret], path: str, query: Any, _: Any
                  ) -> tuple[int, Any]:
        secret = store.get(path)
        if secret is None or not secret.versions:
            return 404, {"errors": []}
        n = int(query.get("version", [secret.current_version])[0]) or secret.current_version
        if n not in secret.versions:
            return 404, {"errors": []}
        v = secret.versions[n]
        if v["deletion_time"] or v["destroyed"]:
            return 404, _envelope({"data": None, "metadata": secret.version_meta(n)})
        return 200, _envelope({"data": v["data"], "metadata": secret.version_meta(n)})

    def _data_post(self, store: dict[str, _Secret], path: str, _: Any, payload: Any
                   ) -> tuple[int, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return 400, {"errors": ["no data provided"]}
        now = _now()
        secret = store.setdefault(path, _Secret(created_time=now, updated_time=now))
        cas = (payload.get("options") or {}).get("cas")
        if cas is not None and cas != secret.current_version:
            return 400, {"errors": ["check-and-set parameter did not match the current version"]}
        secret.current_version += 1
        secret.updated_time = now
        secret.versions[secret.current_version] = {
            "data": payload["data"], "created_time": now, "deletion_time": "", "destroyed": False,
        }
        return 200, _envelope(secret.version_meta(secret.current_version))

    def _data_delete(self, store: dict[str, _Secret], path: str, _: Any, __: Any
                     ) -> tuple[int, Any]:
        """Soft delete of the latest version (``vault kv delete``)."""
        secret = store.get(path)
        if secret is not None and secret.versions:
            secret.versions[secret.current_version]["deletion_time"] = _now()
        return 204, None

    def _metadata_get(self, store: dict[str, _Secret], path: str, _: Any, __: Any
                      ) -> tuple[int, Any]:
        secret = store.get(path)
        if secret is None:
            return 404, {"errors": []}
        return 200, _envelope({
            "cas_required": False,
            "created_time": secret.created_time,
            "current_version": secret.current_version,
            "custom_metadata": None,
            "delete_version_after": "0s",
            "max_versions": 0,
            "oldest_version": 0,
            "updated_time": secret.updated_time,
            "versions": {
                str(n): {k: v for k, v in secret.version_meta(n).items() if k != "version"}
                for n in secret.versions
            },
        })

    def _metadata_delete(self, store: dict[str, _Secret], path: str, _: Any, __: Any
                         ) -> tuple[int, Any]:
        store.pop(path, None)  # Vault answers 204 whether or not it existed
        return 204, None

    def _list(self, store: dict[str, _Secret], folder: str) -> tuple[int, Any]:
        if folder and not folder.endswith("/"):
            folder += "/"
        keys = set()
        for path in store:
            if path.startswith(folder):
                head, slash, _ = path[len(folder):].partition("/")
                keys.add(head + slash)
        if not keys:
            return 404, {"errors": []}
        return 200, _envelope({"keys": sorted(keys)})


def _envelope(data: Any) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
        "lease_duration": 0, "data": data, "wrap_info": None, "warnings": None,
        "auth": None, "mount_type": "kv",
    }


def _unsupported() -> tuple[int, Any]:
    return 405, {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]}


def _handler(server: KV2Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, doc = server.handle(self.command, self.path, headers, body)
            data = b"" if doc is None else json.dumps(doc).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_LIST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler

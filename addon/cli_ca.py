"""`agent-egress ca export`: the CA certificate developers trust in egress proxy mode.

The CA lives where the gateway's mitmproxy keeps it (``<home>/mitmproxy``, the
``confdir`` option); export creates it there if no gateway has run yet, so every
replica sharing the state directory signs with the same CA. The key never leaves
it: the directory is 0700 and each file holding the key 0600.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

CA_BASENAME = "mitmproxy"  # mitmproxy's tlsconfig addon reads <confdir>/mitmproxy-ca.pem
KEY_SIZE = 2048  # mitmproxy's own default `key_size`
_SECRET_FILES = (f"{CA_BASENAME}-ca.pem", f"{CA_BASENAME}-ca.p12")


def ca_dir(home: Path) -> Path:
    return home / "mitmproxy"


def ensure_ca(home: Path) -> Path:
    """Create the CA if missing (as mitmproxy would); return the certificate's path."""
    from mitmproxy.certs import CertStore

    confdir = ca_dir(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    confdir.mkdir(mode=0o700, exist_ok=True)
    CertStore.from_store(confdir, CA_BASENAME, KEY_SIZE)
    os.chmod(confdir, 0o700)
    for name in _SECRET_FILES:
        if (confdir / name).exists():
            os.chmod(confdir / name, 0o600)
    return confdir / f"{CA_BASENAME}-ca-cert.pem"


def cmd_ca_export(args: argparse.Namespace) -> int:
    from .policy import resolve_home

    cert = ensure_ca(resolve_home()).read_text(encoding="ascii")
    out: Path | None = args.out
    if out is None:
        sys.stdout.write(cert)
        return 0
    out.write_text(cert, encoding="ascii")
    print(f"wrote {out}: trust it with CODEX_CA_CERTIFICATE={out} (Codex),"
          f" NODE_EXTRA_CA_CERTS={out} (Node, Claude Code) or SSL_CERT_FILE", file=sys.stderr)
    return 0


def add_ca_parsers(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the egress proxy's CA").add_subparsers(dest="ccmd",
                                                                           required=True)
    export = ca.add_parser("export", help="write the CA certificate (never the key)")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")
    export.set_defaults(func=cmd_ca_export)

"""`agent-egress ca export`: the CA certificate developers trust in egress proxy mode.

The CA lives in mitmproxy's ``confdir``: ``<home>/mitmproxy`` by default, or
``egress.ca_dir`` (env ``AGENT_EGRESS_CA_DIR``) when replicas with separate state
directories must sign with one CA, e.g. a Kubernetes secret mounted read-only in every
replica. Export creates the CA there if it is missing (as mitmproxy would), so the
secret can be made from what one export wrote. The key never leaves the directory:
export writes only the certificate, a new directory is 0700 and the key 0600, and a
gateway refuses to start when the key file is readable by group or others.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

from .policy import ConfigError, Settings

CA_BASENAME = "mitmproxy"  # mitmproxy's tlsconfig addon reads <confdir>/mitmproxy-ca.pem
KEY_SIZE = 2048  # mitmproxy's own default `key_size`
KEY_FILE = f"{CA_BASENAME}-ca.pem"
DHPARAM_FILE = f"{CA_BASENAME}-dhparam.pem"  # mitmproxy writes it on start if missing
_SECRET_FILES = (KEY_FILE, f"{CA_BASENAME}-ca.p12")


def confdir_for(settings: Settings) -> Path:
    """Where this gateway's CA lives (mitmproxy's confdir)."""
    return settings.egress.ca_dir or settings.home / "mitmproxy"


def ensure_ca(confdir: Path, shared: bool = False) -> Path:
    """Create the CA in ``confdir`` if missing (as mitmproxy would) and return the key file.

    The gateway's own ``<home>/mitmproxy`` is made private; a ``shared`` directory that
    already holds a CA (possibly a read-only mount) is only checked.
    """
    from mitmproxy.certs import CertStore

    key = confdir / KEY_FILE
    if shared and key.exists():
        check_ca_dir(confdir)
        return key
    confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    CertStore.from_store(confdir, CA_BASENAME, KEY_SIZE)
    os.chmod(confdir, 0o700)
    for name in _SECRET_FILES:
        if (confdir / name).exists():
            os.chmod(confdir / name, 0o600)
    return key


def prepare_ca(settings: Settings) -> Path:
    """At start (in a worker thread): the CA mitmproxy will load, private and present."""
    if settings.egress.ca_dir is not None:
        check_ca_dir(settings.egress.ca_dir)  # never created by a replica: they would race
        return settings.egress.ca_dir / KEY_FILE
    return ensure_ca(confdir_for(settings))


def check_ca_dir(confdir: Path) -> None:
    """Refuse a CA directory a gateway cannot use safely (ConfigError names the fix)."""
    key = confdir / KEY_FILE
    if not key.is_file():
        raise ConfigError(f"egress.ca_dir: {key} is missing; create the CA once with"
                          f" `AGENT_EGRESS_CA_DIR={confdir} agent-egress ca export` and share"
                          " that directory (e.g. as a secret) with every replica")
    mode = stat.S_IMODE(key.stat().st_mode)  # follows symlinks (Kubernetes secret mounts)
    if mode & 0o077:
        raise ConfigError(f"egress.ca_dir: the CA key {key} is readable by group or others"
                          f" (mode {mode:04o}); chmod 600 it (Kubernetes: defaultMode 0400)")
    if not (confdir / DHPARAM_FILE).exists() and not os.access(confdir, os.W_OK):
        raise ConfigError(f"egress.ca_dir: {confdir / DHPARAM_FILE} is missing and the"
                          " directory is read-only; include the file `ca export` wrote")


def certificate_pem(key_file: Path) -> str:
    """Only the CERTIFICATE blocks of mitmproxy's combined key+certificate file."""
    text = key_file.read_text(encoding="ascii")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    blocks, start = [], text.find(begin)
    while start >= 0:
        stop = text.index(end, start) + len(end)
        blocks.append(text[start:stop] + "\n")
        start = text.find(begin, stop)
    if not blocks:
        raise ConfigError(f"{key_file} holds no CA certificate")
    return "".join(blocks)


def cmd_ca_export(args: argparse.Namespace) -> int:
    from .policy import load_settings

    settings = load_settings(getattr(args, "config", None))
    cert = certificate_pem(ensure_ca(confdir_for(settings),
                                     shared=settings.egress.ca_dir is not None))
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

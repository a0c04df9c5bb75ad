"""The state directory must be private before the gateway trusts what is in it.

It holds the vault, the master key (when no environment key is set), the CA key,
the SQLite ledger with the keyed token hashes, the audit log and the ledger
spool. SQLite and the audit log are created with the process umask (often
0644), so the directory's own mode is what keeps other local users out; a
group- or world-writable directory would also let them swap the vault or plant
a symlink. So start-up refuses a directory others can read or write, the way
ssh refuses a loose ``~/.ssh``, and names the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .policy import ConfigError

_OPEN_BITS = stat.S_IRWXG | stat.S_IRWXO


class StateDirError(ConfigError):
    """The state directory is not private; the message names the fix."""


def ensure_private(home: Path) -> None:
    """Create ``home`` 0700 if missing; refuse it if group or others have any access."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(home)  # follows a symlink: the directory actually used is checked
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {home} is not a directory")
    loose = st.st_mode & _OPEN_BITS
    if loose:
        who = " and ".join(w for w, bits in (("group", stat.S_IRWXG), ("others", stat.S_IRWXO))
                           if loose & bits)
        raise StateDirError(
            f"state directory {home} is accessible by {who} (mode {stat.S_IMODE(st.st_mode):o});"
            f" it holds the vault, keys and ledger. Fix: chmod 700 {home}")
    if st.st_uid != os.geteuid():
        raise StateDirError(
            f"state directory {home} belongs to uid {st.st_uid}, not to this user"
            f" (uid {os.geteuid()}); run the gateway as its owner or chown it")

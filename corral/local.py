"""The `corral up` of this machine, as the CLI's client commands find it, and its admin key.

`corral up` keeps three files in its data dir (`--data-dir`, else `$CORRAL_DATA_DIR`, else
`common.settings.default_data_dir()`):
- `run/corral-up.lock`: locked while it runs, holding its pid;
- `run/corral-up.yaml`: that run's effective config (its Redis URL, host, port, models);
- `admin-key`: the local admin key it made at its first start, readable by its owner only.

A client command that names no cluster (no Redis URL, no gateway URL) reads the run config of
the `corral up` running with its data dir, and sends the admin key: `CORRAL_ADMIN_KEY`,
else `CORRAL_API_KEY` (an alias), else the local key when the config says the admin key is
the local one (`open_until_user_keys`). That key is never sent to a gateway named by hand.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import psutil
from pydantic import SecretStr

from common.apikeys import new_secret
from common.settings import Settings, default_data_dir

log = logging.getLogger(__name__)

LOCK_FILE = Path("run") / "corral-up.lock"
RUN_CONFIG = Path("run") / "corral-up.yaml"
ADMIN_KEY_FILE = Path("admin-key")
KEY_ALIAS_ENV = "CORRAL_API_KEY"  # read by the client commands after CORRAL_ADMIN_KEY


def running_config(data_dir: Path) -> Path | None:
    """The run config of the `corral up` running with `data_dir` now, or None: its lock
    names a live `corral` process (a pid reused by another program is not it)."""
    config = data_dir / RUN_CONFIG
    try:
        pid = int((data_dir / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or not config.is_file():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        argv = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return config if "corral" in argv else None


def admin_key_path(data_dir: Path) -> Path:
    return data_dir / ADMIN_KEY_FILE


def read_admin_key(data_dir: Path) -> str | None:
    """The local admin key kept in `data_dir`, or None if it has none."""
    try:
        return admin_key_path(data_dir).read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_admin_key(data_dir: Path) -> tuple[str, bool]:
    """The local admin key of `data_dir`, and whether it was made just now (a random secret
    in a file only its owner may read; one found readable by others is made private)."""
    path = admin_key_path(data_dir)
    found = read_admin_key(data_dir)
    if found is not None:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: now by its owner only", path)
            path.chmod(0o600)
        return found, False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an empty file left earlier kept its own mode
        out.write(secret + "\n")
    log.info("made the local admin key in %s", path)
    return secret, True


def with_local_admin_key(settings: Settings) -> tuple[Settings, bool]:
    """For `corral up`: `settings` with the admin key to run with, and whether it was made
    just now. `CORRAL_ADMIN_KEY` given: that one, as it always was (it closes the gateway
    to callers without a key). Else the local key: it leaves a loopback gateway open until
    a user key exists (`open_until_user_keys`), so it only adds a credential."""
    if settings.admin_key is not None:
        return settings, False
    secret, made = ensure_admin_key(settings.data_dir)
    update = {"admin_key": SecretStr(secret), "open_until_user_keys": True}
    return settings.model_copy(update=update), made


def client_key(settings: Settings) -> Settings:
    """`settings` with the key a client command sends (see the module's docstring)."""
    if settings.admin_key is not None:
        return settings
    alias = os.environ.get(KEY_ALIAS_ENV, "").strip()
    secret = alias or (read_admin_key(settings.data_dir) if settings.open_until_user_keys else None)
    return settings.model_copy(update={"admin_key": SecretStr(secret)}) if secret else settings


def data_dir_flag(data_dir: Path) -> str:
    """` --data-dir DIR` for a command line shown to the user, unless `data_dir` is where a
    client command looks by itself."""
    default = Path(os.environ.get("CORRAL_DATA_DIR") or default_data_dir()).expanduser()
    if data_dir == default.absolute():
        return ""
    return f" --data-dir {shlex.quote(str(data_dir))}"

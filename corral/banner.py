"""What `corral up` prints once the cluster serves: where it is, a curl line that works as
is, the Redis URL, the admin key (shown once, when it is new) and who may call.

While no user key exists a loopback gateway with the local admin key is open, so the curl
line needs no header; once one exists every call needs a key, and the line reads the admin
key with `corral keys admin`. With `CORRAL_ADMIN_KEY` the gateway always wants a key.
"""

from __future__ import annotations

import redis
from kombu.utils.url import maybe_sanitize_url

from common import redis_keys
from common.settings import ModelConfig, Settings
from corral import local


def banner(settings: Settings, models: dict[str, ModelConfig], url: str, key_made: bool) -> str:
    base = f"{settings.local_url()}/v1"
    chat = next((a for a, m in models.items() if not m.embedding), None)
    preloaded = [a for a, m in models.items() if settings.preloaded(a, m)]
    on_demand = [a for a in models if a not in preloaded]
    lines = [f"\nCorral is up: {base}", f"  loaded:    {', '.join(preloaded) or 'none'}"]
    if on_demand:
        lines.append(f"  on demand: {', '.join(on_demand)}")
    flag = local.data_dir_flag(settings.data_dir)
    header, access = _access(settings, url, key_made, flag)
    if chat:
        body = f'{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
        lines.append(
            f"  try:       curl {base}/chat/completions{header} "
            f"-H 'Content-Type: application/json' -d '{body}'"
        )
    lines += [
        f"  redis:     {maybe_sanitize_url(url)}",
        *access,
        f"  CLI:       corral status{flag}, corral models list{flag}, corral keys list{flag}:"
        " they find this run by themselves",
        "  stop:      Ctrl-C\n",
    ]
    return "\n".join(lines)


def _access(settings: Settings, url: str, key_made: bool, flag: str) -> tuple[str, list[str]]:
    """The curl line's header (none while the gateway is open), and the banner's lines on
    the admin key and on who may call."""
    if not settings.open_until_user_keys:  # CORRAL_ADMIN_KEY: it closes the gateway
        header = ' -H "Authorization: Bearer $CORRAL_ADMIN_KEY"'
        return header, ["  admin key: the one in CORRAL_ADMIN_KEY; every call needs a key"]
    path = local.admin_key_path(settings.data_dir)
    if key_made and settings.admin_key is not None:
        shown = [
            f"  admin key: {settings.admin_key.get_secret_value()}",
            f"             (new, shown this once; kept in {path}, readable by you only:"
            f" `corral keys admin{flag}` prints it)",
        ]
    else:
        shown = [f"  admin key: `corral keys admin{flag}` prints it (kept in {path})"]
    if user_keys_exist(url):
        header = f' -H "Authorization: Bearer $(corral keys admin{flag})"'
        return header, [*shown, "  keys:      user keys exist: every call needs a key"]
    note = "  keys:      none needed until a user key exists (`corral keys create`)"
    return "", [*shown, note]


def user_keys_exist(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.exists(redis_keys.API_KEYS))
    except redis.RedisError:
        return False
    finally:
        client.close()

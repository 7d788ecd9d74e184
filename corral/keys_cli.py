"""`corral keys create|list|revoke`: user API keys, kept hashed in Redis (`common.apikeys`).

`create` prints the secret alone on stdout (so `KEY=$(corral keys create --name ci)` works)
and what it made on stderr; the secret is shown this once and stored nowhere. Changes take
effect at once on every gateway: they look keys up in Redis on each request. `--models`
names models the cluster knows (its catalog), else nothing is made. `admin` prints the
local admin key of `corral up` (`corral.local`; the CLI answers it before any Redis).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import redis

from common import redis_keys
from common.apikeys import ApiKey, issue
from common.errors import CorralError
from common.priority import Priority
from common.redis_conn import RedisTarget
from common.settings import Settings


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    shared = argparse.ArgumentParser(add_help=False)  # on each action: `keys list --config`
    common(shared)
    shared.add_argument(
        "--redis-url",
        help="broker URL (default: $CORRAL_REDIS_URL, else the running `corral up`'s)",
    )
    kp = sub.add_parser("keys", help="create, list and revoke user API keys")
    ks = kp.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    cr = ks.add_parser(
        "create", parents=[shared], help="create a key and print its secret (shown once)"
    )
    cr.add_argument("--name", required=True, help="who or what uses the key (unique)")
    cr.add_argument(
        "--max-priority",
        choices=[p.value for p in Priority],
        default="high",
        help="the highest priority its requests may run at (default high)",
    )
    cr.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    cr.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    cr.add_argument("--models", help="comma-separated model aliases it may use (default: all)")
    cr.add_argument(
        "--force",
        action="store_true",
        help="create the first user key even though no admin key is set (the management "
        "routes and `corral status` then need one the gateways do not have)",
    )
    ks.add_parser("list", parents=[shared], help="list keys (never their secrets)")
    rv = ks.add_parser("revoke", parents=[shared], help="revoke a key at once, by id or name")
    rv.add_argument("key", help="key id (key_...) or name")
    ks.add_parser(
        "admin",
        parents=[shared],
        help="print the local admin key `corral up` made in its data dir (readable by you only)",
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        client = RedisTarget.of(settings).client(decode_responses=True)
    except CorralError as exc:
        print(f"corral keys: {exc.message}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            if lockout(client, settings, args.force):
                return 1
            return create(client, args)
        if args.keys_command == "list":
            return list_keys(client)
        return revoke(client, args.key)
    except redis.RedisError as exc:
        print(f"corral keys: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def lockout(client: redis.Redis, settings: Settings, force: bool) -> bool:
    """Whether creating a key now would lock the owner out, said so (and not done): the
    first user key makes every gateway require a key, and without an admin key nobody may
    then use the management routes, `corral status` or `corral models`."""
    if force or settings.admin_key is not None or client.exists(redis_keys.API_KEYS):
        return False
    print(
        "corral keys: refusing to create the first user key while no admin key is set: "
        "every gateway would then require a key, and without an admin key the management "
        "routes, `corral status` and `corral models` would be locked to everyone.\n"
        "  Set CORRAL_ADMIN_KEY (the same secret for the gateways and this command), "
        "then create the key; or pass --force if the gateways have an admin key already.",
        file=sys.stderr,
    )
    return True


def load(client: redis.Redis) -> list[ApiKey]:
    found = [ApiKey.model_validate_json(raw) for raw in client.hvals(redis_keys.API_KEYS)]
    return sorted(found, key=lambda k: k.created_at)


def create(client: redis.Redis, args: argparse.Namespace) -> int:
    if any(k.name == args.name for k in load(client)):
        print(f"corral keys: a key named {args.name!r} exists already", file=sys.stderr)
        return 1
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    problem = unknown_models(client, models or [])
    if problem:
        print(f"corral keys: {problem}", file=sys.stderr)
        return 1
    key, secret = issue(
        args.name, max_priority=args.max_priority, rpm=args.rpm, tpm=args.tpm, models=models
    )
    pipe = client.pipeline(transaction=False)
    pipe.hset(redis_keys.API_KEYS, key.digest, key.model_dump_json())
    pipe.publish(redis_keys.KEYS_CHANGED, key.id)  # gateways forget what they cached
    pipe.execute()
    print(f"created {key.id} ({describe(key)}); its secret, shown only now:", file=sys.stderr)
    print(secret)
    return 0


def unknown_models(client: redis.Redis, models: list[str]) -> str | None:
    """Why `--models` names a model the cluster does not know (its catalog: configured,
    announced and discovered models), or None. A key for a model nobody serves yet can be
    made once the model is configured."""
    known = {redis_keys.text(a) for a in client.hkeys(redis_keys.CATALOG)}
    unknown = [m for m in models if m not in known]
    if not unknown:
        return None
    listed = ", ".join(sorted(known)) or "none yet: start a gateway or `corral up` first"
    return f"unknown model(s) {', '.join(unknown)} (models this cluster knows: {listed})"


def describe(key: ApiKey) -> str:
    models = ",".join(key.models) if key.models is not None else "all"
    return (
        f"name={key.name} max_priority={key.max_priority.value} "
        f"rpm={key.rpm or '-'} tpm={key.tpm or '-'} models={models}"
    )


def list_keys(client: redis.Redis) -> int:
    found = load(client)
    if not found:
        print("no keys (create one with `corral keys create --name NAME`)", file=sys.stderr)
        return 0
    for key in found:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at))
        print(f"{key.id}  {key.hint}  {describe(key)}  created={made}")
    return 0


def revoke(client: redis.Redis, which: str) -> int:
    matches = [k for k in load(client) if which in (k.id, k.name)]
    if len(matches) != 1:
        what = "no key" if not matches else f"{len(matches)} keys"
        print(f"corral keys: {what} with id or name {which!r}", file=sys.stderr)
        return 1
    key = matches[0]
    pipe = client.pipeline(transaction=False)
    pipe.hdel(redis_keys.API_KEYS, key.digest)
    pipe.delete(
        redis_keys.ratelimit_key(key.id, "requests"), redis_keys.ratelimit_key(key.id, "tokens")
    )
    pipe.publish(redis_keys.KEYS_CHANGED, key.id)  # gateways forget what they cached: 401 at once
    pipe.execute()
    print(f"revoked {key.id} (name={key.name})", file=sys.stderr)
    return 0

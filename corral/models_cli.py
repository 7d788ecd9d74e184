"""`corral models list|load|eject|reset|rm|scan|defaults|estimate` and `corral status`.

All but `estimate` talk to a gateway's management API (they need its placer); `estimate`
reads the GGUF header here and the measured figures from Redis, so it also works before
any gateway runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from common import redis_keys
from common.estimate import estimate_file
from common.memory import MemoryRecord, profile
from common.redis_conn import RedisTarget
from common.settings import ModelConfig, Settings
from corral import api, status
from corral.api import Api, ApiError


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    def client_flags(p: argparse.ArgumentParser) -> None:
        common(p)
        api.client_flags(p)

    mp = sub.add_parser("models", help="list, load, eject, reset models; estimate their memory")
    ms = mp.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = ms.add_parser("list", help="every configured model with its cluster state")
    client_flags(ls)
    ld = ms.add_parser("load", help="place a model and show progress until ready or failed")
    client_flags(ld)
    ld.add_argument("model")
    ld.add_argument("--replicas", type=int, help="copies to place (default: its config's)")
    ld.add_argument("--no-wait", action="store_true", help="return once placed")
    ej = ms.add_parser("eject", help="unload a model everywhere")
    client_flags(ej)
    ej.add_argument("model")
    rs = ms.add_parser("reset", help="clear a model's failed state")
    client_flags(rs)
    rs.add_argument("model")
    rm = ms.add_parser("rm", help="forget a model an earlier config announced (ejects it)")
    client_flags(rm)
    rm.add_argument("model")
    sc = ms.add_parser("scan", help="look for new GGUF files in models_dir now")
    client_flags(sc)
    df = ms.add_parser("defaults", help="show or set a model's request defaults at run time")
    client_flags(df)
    df.add_argument("model")
    df.add_argument(
        "settings",
        nargs="*",
        metavar="FIELD=VALUE",
        help="e.g. temperature=0.2 max_tokens=256 (none: show them; --clear: the config's)",
    )
    df.add_argument("--clear", action="store_true", help="drop what was set at run time")
    es = ms.add_parser("estimate", help="memory estimate (GGUF header) vs measured")
    common(es)
    es.add_argument("model", help="a configured alias, or a GGUF path")
    es.add_argument("--slots", type=int, help="slots (default: the model's `parallel`)")
    es.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    es.add_argument(
        "--redis-url",
        help="broker URL, for measured figures (default: $CORRAL_REDIS_URL, else the running "
        "`corral up`'s)",
    )

    st = sub.add_parser("status", help="workers, budgets, models and queues at a glance")
    client_flags(st)
    st.add_argument("--watch", action="store_true", help="refresh every second (Ctrl-C stops)")


def run_status(settings: Settings, args: argparse.Namespace) -> int:
    return _with_api(settings, args, lambda api: status.run(api, args.watch))


def run_models(settings: Settings, args: argparse.Namespace) -> int:
    action = args.models_command
    if action == "estimate":
        return estimate(settings, args.model, args.slots, args.device)
    if action == "list":
        return _with_api(settings, args, lambda api: _list(api))
    if action == "load":
        return _with_api(
            settings,
            args,
            lambda api: load(api, args.model, args.replicas, not args.no_wait, settings),
        )
    if action == "rm":
        return _with_api(
            settings, args, lambda api: _removed(api.delete(f"/v1/models/{args.model}"))
        )
    if action == "scan":
        return _with_api(settings, args, lambda api: _scanned(api.post("/v1/models/scan")))
    if action == "defaults":
        return _with_api(
            settings, args, lambda api: defaults(api, args.model, args.settings, args.clear)
        )
    path = "/v1/models/eject" if action == "eject" else f"/v1/models/{args.model}/reset"
    body = {"model": args.model} if action == "eject" else None
    return _with_api(settings, args, lambda api: _say(api.post(path, body)))


def _removed(reply: dict[str, Any]) -> int:
    where = ", ".join(reply.get("ejected_from") or [])
    print(f"{reply['model']}: removed" + (f" (unloading on {where})" if where else ""))
    return 0


def _scanned(reply: dict[str, Any]) -> int:
    print(
        ("new files found; " if reply["changed"] else "no change; ")
        + "models_dir models: "
        + (", ".join(reply["models"]) or "none")
    )
    return 0


def defaults(api: Api, alias: str, pairs: list[str], clear: bool) -> int:
    """Show `alias`'s request defaults, or set FIELD=VALUE ones (values read as JSON where
    they parse: numbers, lists; else as text)."""
    path = f"/v1/models/{alias}/defaults"
    if not pairs and not clear:
        reply = api.get(path)
    else:
        body: dict[str, Any] = {}
        for pair in pairs:
            field, sep, value = pair.partition("=")
            if not sep or not field:
                raise ApiError(f"not FIELD=VALUE: {pair!r}")
            try:
                body[field] = json.loads(value)
            except ValueError:
                body[field] = value
        reply = api.post(path, body)
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(reply["defaults"].items()))
    print(f"{alias}: {shown or 'no defaults'}")
    return 0


def _with_api(settings: Settings, args: argparse.Namespace, fn: Callable[[Api], int]) -> int:
    api = Api(settings, args.url, args.api_key)
    try:
        return fn(api)
    except ApiError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    finally:
        api.close()


def _say(reply: dict[str, object]) -> int:
    print(reply.get("message") or reply)
    return 0 if reply.get("status") == "success" else 1


def _list(api: Api) -> int:
    models = api.get("/v1/models/status")["models"]
    rows = [
        [
            a,
            m["status"],
            f"{m['replicas']}/{m['replicas_wanted']}",
            "embedding" if m["embedding"] else "chat",
            ", ".join(w["worker"] for w in m["workers"]) or "-",
        ]
        for a, m in models.items()
    ]
    print(status.table(rows, ["MODEL", "STATUS", "REPLICAS", "KIND", "WORKERS"]))
    return 0


def load(api: Api, alias: str, replicas: int | None, wait: bool, settings: Settings) -> int:
    """POST the load, then follow the model's status until ready or failed."""
    body: dict[str, object] = {"model": alias}
    if replicas:
        body["replicas"] = replicas
    reply = api.post("/v1/models/load", body)
    plan = reply["placement"]
    targets = [
        ld["worker"] + (f" (evicting {ld['evict']})" if ld["evict"] else "") for ld in plan["loads"]
    ]
    where = ", ".join(targets) or plan.get("reason") or "already placed"
    print(f"{alias}: {reply['status']} — {where}", flush=True)
    if not wait:
        return 0
    deadline = time.monotonic() + settings.load_timeout
    last = None
    while time.monotonic() < deadline:
        st = api.get(f"/v1/models/{alias}/status")
        wanted = replicas or st["replicas_wanted"]
        line = f"{alias}: {st['status']} ({st['replicas']}/{wanted} ready)"
        if line != last:
            print(line, flush=True)
            last = line
        if st["status"] == "failed":
            for worker, error in st["failed"].items():
                print(f"  failed on {worker}: {error}", file=sys.stderr)
            return 1
        if st["status"] == "ready" and st["replicas"] >= (replicas or 1):
            return 0
        time.sleep(0.3)
    print(f"{alias}: not ready after {settings.load_timeout:.0f}s", file=sys.stderr)
    return 1


def estimate(settings: Settings, name: str, slots: int | None, device: str) -> int:
    client = RedisTarget.of(settings).client() if settings.redis_url else None
    try:
        alias, model = _model(settings, name, client)
        slots = slots or model.parallel
        path = settings.resolve_model_path(model)
        if not model.is_gguf:  # another engine's model: nothing to read a need from
            print(f"{alias}: {path} (not a GGUF: its need is vram_mb, or what a load measures)")
            return 0
        est = estimate_file(
            path, ctx_size=model.ctx_size, slots=slots, flags=model.flags, device=device
        )
        print(f"{alias}: {path}")
        print(f"  profile   {profile(model, slots, device)}")
        print(f"  estimate  {est.describe()}")
        if model.vram_mb:
            print(f"  vram_mb   {model.vram_mb} MiB (config override)")
        if client is None:
            print("  measured  (no Redis URL, no `corral up` running here: pass --redis-url)")
            return 0
        raw = client.hgetall(redis_keys.memory_key(alias))
        mine = profile(model, slots, device)
        for prof, rec_raw in sorted(raw.items()):
            name = prof.decode() if isinstance(prof, bytes) else str(prof)
            rec = MemoryRecord.model_validate_json(rec_raw)
            _print_record(name, rec, est.total_mb, "*" if name == mine else " ")
        if not raw:
            print("  measured  none yet (it is measured on its first load)")
        return 0
    finally:
        if client is not None:
            client.close()


def _print_record(name: str, rec: MemoryRecord, est_mb: int, mark: str) -> None:
    """One measured profile; `*` marks the one the estimate above is for."""
    best = rec.best_mb()
    ratio = f" (estimate/measured = {est_mb / best:.2f})" if best else ""
    peak = f", peak {rec.peak_mb} MiB" if rec.peak_mb else ""
    print(f" {mark}measured  {rec.measured_mb} MiB at load{peak} [{name}] on {rec.worker}{ratio}")


def _model(settings: Settings, name: str, client: redis.Redis | None) -> tuple[str, ModelConfig]:
    if name in settings.models:
        return name, settings.models[name]
    if client is not None and (raw := client.hget(redis_keys.CATALOG, name)):
        return name, ModelConfig.model_validate_json(raw)
    path = Path(name).expanduser()
    if path.is_file():
        return path.stem, ModelConfig(model_path=path.resolve())
    known = set(settings.models)
    if client is not None:
        known |= {redis_keys.text(a) for a in client.hkeys(redis_keys.CATALOG)}
    listed = ", ".join(sorted(known)) or "none: is `corral up` running? else pass a GGUF path"
    raise SystemExit(f"corral models estimate: unknown model {name!r} (known: {listed})")

"""The `corral` command: run the cluster, or any part of it, from one entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import redis

from common.errors import CorralError
from common.settings import ModelConfig, Settings, load_settings
from corral import batches_cli, keys_cli, local, models_cli
from corral.logs import setup_logging
from corral.redis_server import EmbeddedRedisError

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  corral up                                  everything on this machine, with demo models
  corral up --model ~/models/qwen.gguf       serve a real GGUF (alias: the file stem)
  corral gateway --redis-url redis://r:6379  a gateway on its own machine
  corral worker --redis-url redis://r:6379 --model qwen --gpu 0
  corral worker --redis-url redis://r:6379 --gpu 0 --vram-budget 20GiB   models on demand
  corral status --watch                      workers, budgets, models, queues
  corral drain                               before stopping this host's workers
  corral make-model /tmp/tiny.gguf           a tiny random-weight GGUF for tests

Config: ./corral.yaml (or CORRAL_CONFIG / --config); every field can be overridden by a
CORRAL_* environment variable, e.g. CORRAL_REDIS_URL, CORRAL_LLAMA_SERVER.
On the machine of a running `corral up`, status, models, keys, batches and flower find it
by themselves (its data dir: --data-dir, CORRAL_DATA_DIR, or ~/.local/share/corral) and
send its admin key (`corral keys admin` prints it).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: $CORRAL_CONFIG or ./corral.yaml)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="demo models, Redis data, run files and the local admin key of `corral up`; "
        "client commands find the `corral up` running with it (default: $CORRAL_DATA_DIR "
        "or ~/.local/share/corral)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ...")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines (default text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Corral: an OpenAI-compatible inference cluster on llama.cpp workers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up", help="run Redis, a gateway and workers that load models on demand, here"
    )
    _common(up)
    up.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="a chat/completion GGUF to serve (repeatable; alias = file stem)",
    )
    up.add_argument(
        "--embedding-model",
        action="append",
        default=[],
        metavar="PATH",
        help="an embedding GGUF to serve (repeatable)",
    )
    up.add_argument("--host", help="gateway bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up.add_argument("--slots", type=_positive, help="parallel slots per model (default: config, 2)")
    up.add_argument(
        "--ram-budget",
        help="the memory models may use on the CPU, shared by every model, e.g. 8GiB "
        "(default: half of the available RAM)",
    )
    up.add_argument(
        "--vram-budget",
        help="the memory models may use on each GPU, e.g. 20GiB (default: each GPU's memory "
        "minus a reserve)",
    )
    up.add_argument(
        "--models-per-device",
        type=_positive,
        help="models resident at once on each GPU (or the CPU), memory allowing (default 3)",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a non-loopback --host without API keys",
    )

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    _common(gw)
    gw.add_argument("--redis-url", help="broker URL (default: $CORRAL_REDIS_URL)")
    gw.add_argument("--host", help="bind address (default 127.0.0.1)")
    gw.add_argument("--port", type=int, help="port (default 8000)")
    gw.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a non-loopback address without API keys",
    )

    wk = sub.add_parser("worker", help="run one worker: a llama-server child + its queues")
    _common(wk)
    wk.add_argument("--redis-url", help="broker URL (default: $CORRAL_REDIS_URL)")
    wk.add_argument(
        "--model",
        help="preload and keep this model: a config alias or a GGUF path (alias = file "
        "stem); default: none, gateways place models on the worker on demand",
    )
    wk.add_argument(
        "--vram-budget",
        help="the GPU's memory Corral may use, shared by every worker on that GPU, e.g. "
        "20GiB (default: its memory minus a reserve)",
    )
    wk.add_argument(
        "--ram-budget",
        help="the host's memory CPU workers may use, shared by every CPU worker of the "
        "host, e.g. 4GiB (default: half of the available RAM)",
    )
    wk.add_argument(
        "--device",
        help="the device whose memory this worker shares (default: its GPU's UUID, or the "
        "host's CPU); workers given the same name share one budget",
    )
    wk.add_argument("--embedding", action="store_true", help="with a path: an embedding model")
    wk.add_argument("--ctx-size", type=int, help="with a path: context size (default 4096)")
    wk.add_argument(
        "--slots", type=_positive, help="parallel slots (default: the model's `parallel`)"
    )
    wk.add_argument("--gpu", type=int, help="pin to this GPU index (NVML); default: CPU")
    wk.add_argument(
        "--no-banner",
        action="store_true",
        help="skip Celery's startup banner (`corral up` prints its own summary)",
    )

    mk = sub.add_parser("make-model", help="write a tiny random-weight GGUF (demo and tests)")
    mk.add_argument("path", type=Path)
    mk.add_argument("--embedding", action="store_true", help="an embedding model")
    mk.add_argument("--n-embd", type=int, default=64)
    mk.add_argument("--n-layer", type=int, default=2)
    mk.add_argument("--n-ff", type=int, default=128)
    mk.add_argument("--seed", type=int, default=0)

    fl = sub.add_parser("flower", help="run Flower (task and queue monitor) on the broker")
    _common(fl)
    fl.add_argument(
        "--redis-url",
        help="broker URL (default: $CORRAL_REDIS_URL, else the running `corral up`'s)",
    )
    fl.add_argument("--address", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    fl.add_argument("--port", type=int, default=5555, help="port (default 5555)")
    fl.add_argument(
        "--basic-auth",
        metavar="USER:PASSWORD",
        help="HTTP basic auth (default: $CORRAL_FLOWER_USER and $CORRAL_FLOWER_PASSWORD)",
    )
    fl.add_argument(
        "--unauthenticated",
        action="store_true",
        help="allow no credentials, on a loopback --address only",
    )
    dr = sub.add_parser(
        "drain",
        help="stop this host's workers taking tasks, wait until idle (a preStop hook)",
        description="The workers on this host stop taking new tasks (queued ones stay for "
        "other workers) and this waits until they have finished the ones they hold. Run it "
        "before stopping a worker, e.g. as a Kubernetes preStop hook: the SIGTERM that follows "
        "then ends it at once. Exit 0 when idle, 1 if tasks still run after --timeout.",
    )
    _common(dr)
    dr.add_argument("--redis-url", help="broker URL (default: $CORRAL_REDIS_URL)")
    dr.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for running tasks (default: task_time_limit)",
    )
    keys_cli.add_parser(sub, _common)
    batches_cli.add_parser(sub, _common)
    models_cli.add_parsers(sub, _common)
    return parser


def _settings(
    args: argparse.Namespace, *, config: str | Path | None = None, **overrides: Any
) -> Settings:
    return load_settings(
        config or args.config,
        log_level=args.log_level,
        log_format=args.log_format,
        data_dir=args.data_dir,
        **overrides,
    )


def _client_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings for a client command (keys, models, status, batches, flower): when nothing
    names a cluster (a Redis URL, or a gateway's `--url`/`CORRAL_URL`), those of the `corral
    up` running with this data dir (its run config); and the key to send (`corral.local`)."""
    settings = _settings(args, **overrides)
    if not (settings.redis_url or getattr(args, "url", None) or os.environ.get("CORRAL_URL")):
        run = local.running_config(settings.data_dir)
        if run is not None:
            settings = _settings(args, config=run, **overrides)
    return local.client_key(settings)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def cmd_up(args: argparse.Namespace) -> int:
    from corral.up import Cluster, address_problem, claim_data_dir, collect_models
    from workers.hardware.budget import parse_size

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        max_models_per_device=args.models_per_device,
    )
    setup_logging(settings.log_level, "up", settings.log_format)
    if settings.port == 0:
        print(
            "corral up: --port 0 would pick a port it cannot announce; choose one", file=sys.stderr
        )
        return 1
    problem = address_problem(settings.host, settings.port)
    if problem:  # before anything starts: the gateway would fail last, its reason buried
        print(f"corral up: {problem}", file=sys.stderr)
        return 1
    with claim_data_dir(settings.data_dir) as other:
        if other is not None:
            print(
                f"corral up: {settings.data_dir} is in use by another corral up (pid {other});"
                " stop it, or give this one its own --data-dir",
                file=sys.stderr,
            )
            return 1
        models = collect_models(settings, args.model, args.embedding_model, args.slots)
        budget = args.vram_budget or args.ram_budget
        if budget:
            try:
                parse_size(budget)
            except ValueError as exc:
                print(f"corral up: {exc}", file=sys.stderr)
                return 1
        settings, key_made = local.with_local_admin_key(settings)
        return Cluster(settings, models, budget, key_made).run()


def cmd_gateway(args: argparse.Namespace) -> int:

    from gateway.app import create_app
    from gateway.edge.head_timeout import guarded_protocol
    from gateway.tenancy.exposure import exposure_problem

    settings = _settings(
        args, redis_url=args.redis_url, host=args.host, port=args.port, insecure=args.insecure
    )
    setup_logging(settings.log_level, "gateway", settings.log_format)
    problem = exposure_problem(settings)  # no keys on a reachable address: refuse
    if problem:
        print(f"corral gateway: {problem}", file=sys.stderr)
        return 2
    from gateway.serve import serve

    serve(create_app(settings), settings, guarded_protocol(settings.header_timeout))
    return 0


def resolve_worker_model(
    settings: Settings, args: argparse.Namespace
) -> tuple[str | None, ModelConfig | None]:
    if args.model is None:
        return None, None
    if args.model in settings.models:
        return args.model, settings.models[args.model]
    path = Path(args.model).expanduser()
    if path.suffix == ".gguf" or path.exists():
        config = ModelConfig(model_path=path.resolve(), embedding=args.embedding)
        if args.ctx_size:
            config.ctx_size = args.ctx_size
        return path.stem, config
    known = ", ".join(settings.models) or "none"
    raise SystemExit(f"corral worker: unknown model {args.model!r} (configured: {known})")


def cmd_worker(args: argparse.Namespace) -> int:
    from common.errors import LlamaServerError
    from workers.main import WorkerOptions, run_worker

    settings = _settings(args, redis_url=args.redis_url)
    setup_logging(settings.log_level, "worker", settings.log_format)
    alias, model = resolve_worker_model(settings, args)
    try:
        options = WorkerOptions(
            slots=args.slots,
            gpu=args.gpu,
            vram_budget=args.vram_budget,
            ram_budget=args.ram_budget,
            device=args.device,
            banner=not args.no_banner,
        )
        run_worker(settings, alias, model, options)
    except LlamaServerError as exc:  # its message says why (and the child's last lines)
        print(f"corral worker: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from corral.tinymodel import make_model

    path = make_model(
        args.path,
        embedding=args.embedding,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_ff=args.n_ff,
        seed=args.seed,
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from corral.flower import run_flower

    settings = _client_settings(args, redis_url=args.redis_url)
    setup_logging(settings.log_level, "flower", settings.log_format)
    return run_flower(
        settings,
        address=args.address,
        port=args.port,
        basic_auth_flag=args.basic_auth,
        unauthenticated=args.unauthenticated,
    )


def cmd_drain(args: argparse.Namespace) -> int:
    from corral.drain import run_drain

    settings = _settings(args, redis_url=args.redis_url)
    setup_logging(settings.log_level, "drain", settings.log_format)
    return run_drain(settings, args.timeout or settings.task_time_limit)


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _client_settings(args, redis_url=getattr(args, "redis_url", None))
    setup_logging(settings.log_level, "keys", settings.log_format)
    if args.keys_command == "admin":
        return print_admin_key(settings)
    return keys_cli.run(settings, args)


def print_admin_key(settings: Settings) -> int:
    """`corral keys admin`: the local admin key `corral up` made in the data dir."""
    secret = local.read_admin_key(settings.data_dir)
    if secret is None:
        print(
            f"corral keys: no local admin key in {settings.data_dir} (`corral up` makes one"
            " at its first start, unless CORRAL_ADMIN_KEY is set)",
            file=sys.stderr,
        )
        return 1
    print(secret)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    settings = _client_settings(args, redis_url=getattr(args, "redis_url", None))
    setup_logging(settings.log_level, "models", settings.log_format)
    return models_cli.run_models(settings, args)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _client_settings(args)
    setup_logging(settings.log_level, "status", settings.log_format)
    return models_cli.run_status(settings, args)


def cmd_batches(args: argparse.Namespace) -> int:
    settings = _client_settings(args)
    setup_logging(args.log_level or "WARNING", "batches", settings.log_format)
    return batches_cli.run(settings, args)


COMMANDS = {
    "up": cmd_up,
    "gateway": cmd_gateway,
    "worker": cmd_worker,
    "make-model": cmd_make_model,
    "flower": cmd_flower,
    "drain": cmd_drain,
    "keys": cmd_keys,
    "models": cmd_models,
    "status": cmd_status,
    "batches": cmd_batches,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, CorralError, EmbeddedRedisError) as exc:
        print(f"corral {args.command}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:  # one line, as for any other error a user can fix
        print(f"corral {args.command}: cannot reach Redis: {exc}", file=sys.stderr)
        return 2

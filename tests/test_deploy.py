"""docker-compose.yml and deploy/ hold together without a Docker engine: every service runs
a real `corral` subcommand with flags the real parser accepts, the image it builds has
everything `pip install .` needs, and its config and environment load as real settings."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from common.settings import Settings, load_settings
from corral import flower
from corral.cli import COMMANDS, build_parser, resolve_worker_model
from gateway.routes import health

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
EXAMPLE_CONFIG = ROOT / "deploy" / "corral.example.yaml"
WORKERS = ("worker-qwen", "worker-embed")  # one per model of the example config
CORRAL_SERVICES = ("gateway", *WORKERS, "flower")
MONITORING = ("flower", "prometheus", "grafana")  # the `monitoring` profile


# --- docker compose, as far as the engine-free parts go ---------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` over a tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"] or ""
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op in (":?", "?") and unset:
            raise ValueError(f"${{{name}}} is required: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return val or ""

    out = _VAR.sub(sub, value.replace("$$", "\0"))
    assert "$" not in out, f"unsupported interpolation in {value!r}"
    return out.replace("\0", "$")


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())  # resolves the `<<: *anchor` merge keys
    return dict(interpolate(raw, env or {}))


@pytest.fixture(autouse=True)
def _no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell's CORRAL_* variables are not the containers'."""
    for var in [v for v in os.environ if v.startswith("CORRAL_")]:
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def bind_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the compose file) of the bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def parse_command(service: Mapping[str, Any]) -> Any:
    """The service's argv through the real `corral` parser (ENTRYPOINT is `corral`)."""
    argv = service["command"]
    assert isinstance(argv, list), "exec form, so no shell re-splits the arguments"
    try:
        return build_parser().parse_args([str(a) for a in argv])
    except SystemExit as exc:
        pytest.fail(f"`corral {' '.join(argv)}` is rejected by corral's parser (exit {exc})")


@dataclass
class Deployed:
    """A corral service with its parsed command and config."""

    name: str
    service: dict[str, Any]
    args: Any
    config: Path


def deployed(compose: Mapping[str, Any], name: str) -> Deployed:
    service = compose["services"][name]
    args = parse_command(service)
    assert args.config, f"{name}: pass --config so every service reads the same file"
    source = bind_mounts(service).get(args.config)
    assert source, f"{name}: --config {args.config} is not a mounted file"
    return Deployed(name, service, args, (COMPOSE.parent / source).resolve())


def test_services_run_real_corral_subcommands(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"redis", *CORRAL_SERVICES}
    for name in CORRAL_SERVICES:
        d = deployed(compose, name)
        assert d.args.command == name.split("-")[0], f"{name} runs `corral {d.args.command}`"
        assert d.args.command in COMMANDS
        assert "entrypoint" not in d.service, "the image's ENTRYPOINT is `corral`"
        assert d.config.is_file(), d.config


def test_corral_services_wait_for_a_healthy_broker(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["healthcheck"]["test"]
    for name in CORRAL_SERVICES:
        depends = compose["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name


def test_broker_never_evicts_and_persists(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = [str(a) for a in redis["command"]]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--maxmemory-policy"] == "noeviction"  # never drop queued tasks
    assert flags["--appendonly"] == "yes"
    named = {v.split(":")[0]: v.split(":")[1] for v in redis["volumes"]}
    assert named and all(n in compose["volumes"] for n in named)
    assert "/data" in named.values()


def test_broker_url_points_at_the_redis_service(compose: dict[str, Any]) -> None:
    for name in CORRAL_SERVICES:
        d = deployed(compose, name)
        url = service_env(d.service).get("CORRAL_REDIS_URL") or d.args.redis_url
        assert url, f"{name} has no broker URL"
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        assert host_port in ("redis", "redis:6379"), f"{name}: {url}"


def test_environment_names_are_settings_fields(compose: dict[str, Any]) -> None:
    cfg = Settings.model_config
    prefix, nested = str(cfg["env_prefix"]), str(cfg["env_nested_delimiter"])
    fields = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    for name in CORRAL_SERVICES:
        known = fields | ({flower.USER_ENV, flower.PASSWORD_ENV} if name == "flower" else set())
        for var in service_env(compose["services"][name]):
            assert var.split(nested)[0] in known, f"{name}: {var} is not a Corral setting"


def test_environment_values_load_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose({"CORRAL_LOG_LEVEL": "DEBUG"})
    for name in CORRAL_SERVICES:
        d = deployed(compose, name)
        with monkeypatch.context() as m:
            for var, value in service_env(d.service).items():
                m.setenv(var, value)
            settings = load_settings(d.config, redis_url=getattr(d.args, "redis_url", None))
        assert settings.log_level == "DEBUG"
        assert settings.redis_url


def test_every_model_of_the_config_has_its_worker(compose: dict[str, Any]) -> None:
    """Each worker serves a configured model from the models volume, and every model of the
    config that the image can run has one (a request for a model no worker holds would wait
    for its load; the image ships llama-server, not the other engines the config shows)."""
    served = set()
    for name in WORKERS:
        d = deployed(compose, name)
        settings = load_settings(d.config)
        alias, model = resolve_worker_model(settings, d.args)
        assert alias == d.args.model, "--model names an alias of the mounted config"
        assert model is not None
        assert "/models" in bind_mounts(d.service), "a models volume at /models"
        model_path = PurePosixPath(str(settings.resolve_model_path(model)))
        assert model_path.is_relative_to("/models"), model_path
        served.add(alias)
    models = load_settings(EXAMPLE_CONFIG).models
    assert served == {alias for alias, m in models.items() if m.custom_engine is None}
    workers = {n for n in compose["services"] if parse_command_or_none(compose, n) == "worker"}
    assert workers == set(WORKERS)


def parse_command_or_none(compose: Mapping[str, Any], name: str) -> str | None:
    service = compose["services"][name]
    if "command" not in service or service.get("image") != "corral:latest":
        return None
    return str(parse_command(service).command)


def test_monitoring_is_a_profile(compose: dict[str, Any]) -> None:
    """`docker compose up` runs what serves requests; `--profile monitoring` adds Flower,
    Prometheus and Grafana (so Flower's credentials are needed only then)."""
    for name, service in compose["services"].items():
        profiles = service.get("profiles", [])
        assert ("monitoring" in profiles) == (name in MONITORING), name
    assert "flower" in compose["services"]["flower"]["profiles"]
    depends = {d for n in MONITORING for d in compose["services"][n].get("depends_on", [])}
    assert depends <= set(compose["services"])


def _healthcheck_url(service: Mapping[str, Any]) -> tuple[int, str]:
    test = " ".join(str(t) for t in service["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)", test)
    assert m, test
    return int(m[1]), m[2]


def test_gateway_listens_publishes_and_checks_health(compose: dict[str, Any]) -> None:
    d = deployed(compose, "gateway")
    assert d.args.host == "0.0.0.0"
    assert f"{d.args.port}:{d.args.port}" in d.service["ports"]
    port, path = _healthcheck_url(d.service)
    assert port == d.args.port
    assert path in {getattr(r, "path", None) for r in health.router.routes}


def test_flower_serves_with_basic_auth_only(compose: dict[str, Any]) -> None:
    from flower.urls import handlers

    d = deployed(compose, "flower")
    assert f"{d.args.port}:{d.args.port}" in d.service["ports"]
    port, path = _healthcheck_url(d.service)
    assert port == d.args.port
    routed = next(h for h in handlers if re.fullmatch(getattr(h, "regex", None) or h[0], path))
    assert "NotFound" not in getattr(routed, "handler_class", routed[1]).__name__, path
    assert not d.args.unauthenticated and not d.args.basic_auth  # credentials from the env
    # Without credentials in the host's environment, it refuses (on 0.0.0.0).
    env = service_env(d.service)
    with pytest.raises(flower.FlowerRefused):
        flower.check_access(flower.basic_auth(None, env), d.args.address, False)
    # With them, it starts with basic auth.
    creds = {"CORRAL_FLOWER_USER": "admin", "CORRAL_FLOWER_PASSWORD": "s3cret"}
    env = service_env(load_compose(creds)["services"]["flower"])
    assert flower.basic_auth(None, env) == "admin:s3cret"
    flower.check_access("admin:s3cret", d.args.address, False)


# --- the Dockerfile ------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


def instructions(path: Path) -> Iterator[Instruction]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, rest = logical.strip().partition(" ")
            yield Instruction(keyword.upper(), rest.strip())
        logical = ""


def dockerignore(context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) for each .dockerignore pattern, `**` crossing directories."""
    rules = []
    path = context / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = re.split(r"(\*\*/?|\*|\?)", pattern)
        regex = "".join(
            {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
            for p in parts
        )
        rules.append((negated, re.compile(regex)))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `rel` (or a directory above it) survives .dockerignore, last match winning."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        excluded = False
        for negated, regex in rules:
            if regex.fullmatch(prefix):
                excluded = not negated
        if excluded:
            return False
    return True


@dataclass
class Image:
    """What the Dockerfile's COPY lines put where, replayed into a directory."""

    base: str
    root: Path  # the image's filesystem, as far as COPY writes it
    pip_install_dirs: list[str]
    user: str | None
    entrypoint: list[str]


def replay(dockerfile: Path, context: Path, into: Path) -> Image:
    rules = dockerignore(context)
    workdir, base, user, entrypoint = PurePosixPath("/"), "", None, []
    pip_dirs = []
    for ins in instructions(dockerfile):
        if ins.keyword == "FROM":
            base = ins.args.split()[0]
        elif ins.keyword == "WORKDIR":
            workdir = workdir / ins.args
        elif ins.keyword == "USER":
            user = ins.args
        elif ins.keyword == "ENTRYPOINT":
            entrypoint = json.loads(ins.args)
        elif ins.keyword == "COPY":
            *sources, dest = ins.args.split()
            assert not any(s.startswith("--from") for s in sources), "single-stage build"
            target = workdir / dest
            to_dir = dest.endswith(("/", ".")) or len(sources) > 1
            for src in sources:
                copy_from_context(context, src.rstrip("/"), into, target, to_dir, rules)
        elif ins.keyword == "RUN" and re.search(r"\bpip install\b.*\s\.(\s|$)", ins.args):
            pip_dirs.append(str(workdir))
    return Image(base, into, pip_dirs, user, entrypoint)


def copy_from_context(
    context: Path,
    src: str,
    into: Path,
    target: PurePosixPath,
    to_dir: bool,
    rules: list[tuple[bool, re.Pattern[str]]],
) -> None:
    """COPY semantics: a file lands in (or as) `target`, a directory's contents in it."""
    source = context / src
    assert source.exists(), f"COPY {src}: not in the repository"
    assert in_context(src, rules), f"COPY {src}: excluded by .dockerignore"
    dest = into / str(target).lstrip("/")
    if source.is_file():
        dest = dest / source.name if to_dir else dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dest)
        return
    for path in source.rglob("*"):
        rel = path.relative_to(context).as_posix()
        if path.is_file() and in_context(rel, rules):
            out = dest / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out)


@pytest.fixture(scope="module")
def image(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Image:
    builds = {
        (b["context"], b["dockerfile"])
        for name in CORRAL_SERVICES
        for b in [compose["services"][name]["build"]]
    }
    assert len(builds) == 1, f"one image for gateway, worker and flower: {builds}"
    context, dockerfile = builds.pop()
    context_dir = (COMPOSE.parent / context).resolve()
    assert context_dir == ROOT, "the build context is the repository (pyproject.toml)"
    return replay(context_dir / dockerfile, context_dir, tmp_path_factory.mktemp("image"))


def test_image_base_user_and_entrypoint(image: Image) -> None:
    assert image.base.startswith("python:3.11-slim"), image.base
    assert image.user and image.user.split(":")[0] not in ("root", "0"), "not root"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert image.entrypoint == ["corral"] and "corral" in scripts


def find_packages(where: Path, include: list[str]) -> list[str]:
    """setuptools' `packages.find`: dotted names of `__init__.py` trees matching `include`."""
    found = []
    for init in where.rglob("__init__.py"):
        parts = init.parent.relative_to(where).parts
        if all(
            (where.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))
        ):
            name = ".".join(parts)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
                found.append(name)
    return sorted(found)


def test_image_has_what_pip_install_needs(image: Image) -> None:
    """`pip install .` runs where pyproject.toml, its readme and every package landed."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert len(image.pip_install_dirs) == 1, "one `pip install .`"
    src = image.root / image.pip_install_dirs[0].lstrip("/")
    assert (src / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()
    assert (src / pyproject["project"]["readme"]).is_file()
    wanted = find_packages(ROOT, include)
    assert "corral" in wanted and find_packages(src, include) == wanted
    for package in wanted:  # every module, not just the package markers
        pkg_dir = ROOT / package.replace(".", "/")
        for module in pkg_dir.glob("*.py"):
            assert (src / module.relative_to(ROOT)).is_file(), module


def test_dockerignore_keeps_secrets_and_weights_out() -> None:
    rules = dockerignore(ROOT)
    for rel in (".git/config", "models/qwen.gguf", "x.gguf", "corral/__pycache__/a.pyc"):
        assert not in_context(rel, rules), rel
    for rel in ("pyproject.toml", "corral/cli.py", "workers/main.py"):
        assert in_context(rel, rules), rel


# --- the example config ----------------------------------------------------------------


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE_CONFIG)
    assert settings.models, "the example shows a models section"
    fields = set().union(
        *(m.model_dump(exclude_unset=True).keys() for m in settings.models.values())
    )
    # Every per-model field appears in the example.
    assert fields >= {
        "model_path",
        "flags",
        "ctx_size",
        "parallel",
        "preload",
        "pinned",
        "idle_ttl",
        "vram_mb",
    }
    for model in settings.models.values():
        assert not model.model_path.is_absolute(), "relative to models_dir, the volume"
    assert settings.models_dir == Path("/models")


def test_example_config_shows_other_engines() -> None:
    """vLLM, SGLang and llama-cpp-python, each as an engine command that parses (the flags
    themselves are each engine's own: see their --help)."""
    models = load_settings(EXAMPLE_CONFIG).models
    engines = {m.custom_engine.program: m for m in models.values() if m.custom_engine}
    assert set(engines) == {"vllm", "sglang", "llama-cpp-python"}
    for model in engines.values():
        assert model.custom_engine is not None and model.custom_engine.uses("port")
        assert model.custom_engine.uses("alias")  # the name requests carry
    assert not engines["vllm"].is_gguf and engines["llama-cpp-python"].is_gguf
    assert any(m.cache for m in models.values())


def test_example_config_keys_are_settings_fields() -> None:
    """`extra="ignore"` would silently drop a misspelled top-level key."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert set(data) <= set(Settings.model_fields), set(data) - set(Settings.model_fields)

"""deploy/k8s holds together without a cluster: every overlay renders with `kubectl
kustomize`; every core resource validates against the Kubernetes schemas
(`kubernetes-validate`, strict: an unknown field is an error) and the KEDA objects against
the schemas in deploy/k8s/schemas; and what the manifests say matches what Corral does:
real `corral` subcommands, a config and an environment that load as settings, a worker
Deployment per model, autoscalers on that model's queues, the broker where Corral looks
for it, secrets only from the generator."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common import redis_keys
from common.redis_conn import RedisTarget
from common.settings import Settings, load_settings
from corral import flower
from corral.cli import build_parser
from gateway.monitoring.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("external-redis", "keda", "prometheus-adapter", "sentinel")
# The oldest Kubernetes these manifests are for (autoscaling/v2, policy/v1), and the newest
# kubernetes-validate knows.
VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
KEDA_SCHEMAS = {
    kind: json.loads((K8S / "schemas" / f"keda-{kind.lower()}.json").read_text())
    for kind in ("ScaledObject", "TriggerAuthentication")
}
CORRAL_COMMANDS = {"gateway", "worker", "flower"}

Doc = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------


def secrets_for(overlay: str) -> dict[str, str]:
    """The example's keys, with values this test can find again."""
    example = (K8S / "secrets.env.example").read_text()
    keys = [line.split("=", 1)[0] for line in example.splitlines() if re.match(r"^\w+=", line)]
    values = {key: f"{key.lower()}-{overlay}-t0ps3cret" for key in keys}
    values["CORRAL_REDIS_URL"] = f"redis://:{values['REDIS_PASSWORD']}@redis.internal:6379/0"
    values["REDIS_ADDRESS"] = "redis.internal:6379"
    return values


def kubectl() -> str:
    """kubectl, with a kustomize that knows components (v4 and later: kubectl 1.21+)."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl renders deploy/k8s: apt-get install kubectl (.ci/run does)")
    out = subprocess.run([found, "version", "--client", "-o", "json"], capture_output=True)
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "v0")
    if int(re.sub(r"^v(\d+).*", r"\1", version) or 0) < 4:
        pytest.fail(f"{found} embeds kustomize {version}; deploy/k8s needs v4+ (kubectl 1.21+)")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Each overlay as `kubectl kustomize` renders it, from a copy of deploy/ in which each
    overlay has its secrets.env (the user's file, never in the repository)."""
    deploy = tmp_path_factory.mktemp("render") / "deploy"
    shutil.copytree(ROOT / "deploy", deploy, ignore=shutil.ignore_patterns("secrets.env"))
    overlays = deploy / "k8s" / "overlays"
    assert tuple(sorted(p.name for p in overlays.iterdir())) == OVERLAYS
    out: dict[str, list[Doc]] = {}
    for name in OVERLAYS:
        env = "".join(f"{k}={v}\n" for k, v in secrets_for(name).items())
        (overlays / name / "secrets.env").write_text(env)
        run = subprocess.run(
            [kubectl(), "kustomize", str(overlays / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"{name}: {run.stderr}"
        out[name] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


def kinds(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    """The resource of `kind` generated or written as `name` (generated ones carry a hash)."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    found = [d for d in kinds(docs, kind) if pattern.fullmatch(d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def each(rendered: dict[str, list[Doc]]) -> Iterator[tuple[str, list[Doc]]]:
    yield from sorted(rendered.items())


def corral_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(Deployment, container) for every container running the Corral image."""
    for dep in kinds(docs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "corral":
                yield dep, c


def parse(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args([str(a) for a in argv])
    except SystemExit:
        pytest.fail(f"`corral {' '.join(argv)}` is rejected by corral's parser")


def model_of(dep: Doc) -> str:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return str(parse(c["args"]).model)


def workers(docs: list[Doc]) -> list[Doc]:
    return [d for d, c in corral_containers(docs) if parse(c["args"]).command == "worker"]


# --- schemas ------------------------------------------------------------------------------


def test_every_core_resource_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Doc]],
) -> None:
    unique: dict[str, tuple[str, Doc]] = {}  # the overlays share most resources
    for name, docs in each(rendered):
        for doc in docs:
            if not doc["apiVersion"].startswith("keda.sh/"):
                unique.setdefault(json.dumps(doc, sort_keys=True), (name, doc))
    for name, doc in unique.values():
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} {where}: {exc}")
    assert len(unique) > 40


def test_the_kubernetes_schemas_catch_a_mistake() -> None:
    """Strict validation fails on a misspelled field (so the test above can fail)."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targetPrt": 2}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def keda_errors(doc: Doc) -> list[str]:
    validator = jsonschema.Draft202012Validator(KEDA_SCHEMAS[doc["kind"]])
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_objects_validate_against_the_keda_schemas(rendered: dict[str, list[Doc]]) -> None:
    seen = set()
    for name, docs in each(rendered):
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                assert doc["kind"] in KEDA_SCHEMAS, f"{name}: no schema for {doc['kind']}"
                assert not keda_errors(doc), (name, doc["metadata"]["name"], keda_errors(doc))
                seen.add(doc["kind"])
    assert seen == set(KEDA_SCHEMAS)
    for schema in KEDA_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_keda_schema_catches_mistakes(rendered: dict[str, list[Doc]]) -> None:
    good = kinds(rendered["sentinel"], "ScaledObject")[0]
    assert not keda_errors(good)

    def broken(change: Any) -> Doc:
        doc: Doc = json.loads(json.dumps(good))
        change(doc)
        return doc

    def number(d: Doc) -> None:  # KEDA's metadata is a map of strings
        d["spec"]["triggers"][0]["metadata"]["listLength"] = 4

    def no_master(d: Doc) -> None:
        del d["spec"]["triggers"][0]["metadata"]["sentinelMaster"]

    def misspelled(d: Doc) -> None:
        d["spec"]["pollingInterva"] = 5

    def no_target(d: Doc) -> None:
        del d["spec"]["scaleTargetRef"]

    for change in (number, no_master, misspelled, no_target):
        assert keda_errors(broken(change)), change.__name__


# --- Corral's side ------------------------------------------------------------------------


def corral_config(docs: list[Doc], tmp_path: Path) -> Path:
    data = named(docs, "ConfigMap", "corral-config")["data"]
    path = tmp_path / "corral.yaml"
    path.write_text(data["corral.yaml"])
    return path


def config_settings(docs: list[Doc], tmp_path: Path) -> Settings:
    """The config alone (the broker URL, which the environment brings, stood in for)."""
    return load_settings(corral_config(docs, tmp_path), redis_url="redis://stand-in:6379/0")


def environment(docs: list[Doc], container: Doc) -> dict[str, str]:
    """A container's environment as the kubelet would build it (envFrom, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        env.update(values(named(docs, kind, ref["name"]), kind))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"].get("configMapKeyRef")
        kind = "Secret" if "secretKeyRef" in var["valueFrom"] else "ConfigMap"
        env[var["name"]] = values(named(docs, kind, ref["name"]), kind)[ref["key"]]
    return env


def values(doc: Doc, kind: str) -> dict[str, str]:
    data = doc.get("data", {})
    if kind == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in data.items()}
    return dict(data)


@pytest.fixture(autouse=True)
def _no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("CORRAL_")]:
        monkeypatch.delenv(var)


def test_corral_containers_run_real_subcommands_on_the_mounted_config(
    rendered: dict[str, list[Doc]],
) -> None:
    for name, docs in each(rendered):
        commands = set()
        for dep, c in corral_containers(docs):
            args = parse(c["args"])
            commands.add(args.command)
            assert "command" not in c, "the image's ENTRYPOINT is `corral`"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volume = mounts[str(Path(args.config).parent)]
            (source,) = [
                v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == volume
            ]
            config_map = named(docs, "ConfigMap", "corral-config")
            assert source["configMap"]["name"] == config_map["metadata"]["name"], name
            assert Path(args.config).name in config_map["data"]
        assert commands == CORRAL_COMMANDS, name


def test_config_and_environment_load_as_settings(
    rendered: dict[str, list[Doc]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = Settings.model_config
    fields = {f"{cfg['env_prefix']}{f}".upper() for f in Settings.model_fields}
    allowed = fields | {flower.USER_ENV, flower.PASSWORD_ENV, "NVIDIA_DRIVER_CAPABILITIES"}
    for name, docs in each(rendered):
        config = corral_config(docs, tmp_path)
        for dep, c in corral_containers(docs):
            env = environment(docs, c)
            unknown = {v for v in env if v.split("__")[0] not in allowed}
            assert not unknown, f"{name} {dep['metadata']['name']}: {unknown}"
            with monkeypatch.context() as m:
                for var, value in env.items():
                    m.setenv(var, value)
                settings = load_settings(config)
            target = RedisTarget.of(settings)  # the broker URL parses, Sentinel or not
            assert target.is_sentinel == (name == "sentinel"), name
            if parse(c["args"]).command == "gateway":
                assert settings.admin_key is not None  # 0.0.0.0 needs a key
            if parse(c["args"]).command == "flower":
                flower.check_access(flower.basic_auth(None, env), "0.0.0.0", False)


def test_every_configured_model_has_a_worker_deployment(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    example = load_settings(ROOT / "deploy" / "corral.example.yaml")
    for name, docs in each(rendered):
        settings = config_settings(docs, tmp_path)
        assert sorted(model_of(d) for d in workers(docs)) == sorted(settings.models), name
        # the same llama-server models as docker compose's example config (the image has
        # no other engine)
        assert {a: m.model_path for a, m in settings.models.items()} == {
            a: m.model_path for a, m in example.models.items() if m.custom_engine is None
        }
        for dep in workers(docs):
            labels = dep["spec"]["template"]["metadata"]["labels"]
            assert labels["corral-model"] == model_of(dep)


def test_workers_drain_before_they_stop(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    for name, docs in each(rendered):
        settings = config_settings(docs, tmp_path)
        gpus = 0
        for dep in workers(docs):
            pod = dep["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            hook = c["lifecycle"]["preStop"]["exec"]["command"]
            assert hook[0] == "corral" and parse(hook[1:]).command == "drain", hook
            assert parse(hook[1:]).config == parse(c["args"]).config
            # the drain waits up to task_time_limit; the pod lives that long and a bit more
            assert pod["terminationGracePeriodSeconds"] > settings.task_time_limit + 30
            resources = c["resources"]
            if parse(c["args"]).gpu is not None:
                gpus += 1
                assert (
                    resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                )
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            env = environment(docs, c)
            assert int(env["CORRAL_WORKER_METRICS_PORT"]) == ports["metrics"]
            assert env["CORRAL_WORKER_METRICS_HOST"] == "0.0.0.0"
        assert gpus >= 1, f"{name}: no worker asks for a GPU"


def test_gateway_is_ready_on_health_and_scales_on_cpu(rendered: dict[str, list[Doc]]) -> None:
    from gateway.routes import health

    paths = {getattr(r, "path", None) for r in health.router.routes}
    for name, docs in each(rendered):
        (dep,) = [d for d, c in corral_containers(docs) if parse(c["args"]).command == "gateway"]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        args = parse(c["args"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert args.host == "0.0.0.0" and ports["http"] == args.port
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] in paths and probe["port"] == "http"
        hpa = named(docs, "HorizontalPodAutoscaler", "corral-gateway")
        assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        service = named(docs, "Service", "corral-gateway")
        assert (
            service["spec"]["selector"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
        assert "replicas" not in dep["spec"], f"{name}: the HPA owns the gateway's replicas"


def test_the_broker_never_evicts_and_keeps_its_queues(rendered: dict[str, list[Doc]]) -> None:
    for name in ("keda", "prometheus-adapter"):
        docs = rendered[name]
        sts = named(docs, "StatefulSet", "corral-valkey")
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        flags = dict(zip(c["args"][1::2], c["args"][2::2], strict=False))
        assert flags["--maxmemory-policy"] == "noeviction" and flags["--appendonly"] == "yes"
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[flags["--dir"]] in claims
        url = values(named(docs, "ConfigMap", "corral-env"), "ConfigMap")["CORRAL_REDIS_URL"]
        host, port = url.split("//")[1].split("/")[0].split(":")
        service = named(docs, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    script = (K8S / "components" / "sentinel" / "scripts" / "valkey.sh").read_text()
    assert "--maxmemory-policy noeviction" in script and "--appendonly yes" in script
    assert not kinds(rendered["external-redis"], "StatefulSet"), "external: no broker here"


def test_sentinel_url_names_the_sentinels_and_their_master(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["sentinel"]
    env = values(named(docs, "ConfigMap", "corral-env"), "ConfigMap")
    target = RedisTarget(env["CORRAL_REDIS_URL"], env["CORRAL_REDIS_SENTINEL_MASTER"])
    sentinels = named(docs, "StatefulSet", "corral-sentinel")
    service = sentinels["spec"]["serviceName"]
    assert named(docs, "Service", service)["spec"]["clusterIP"] == "None"  # per-pod names
    pods = {f"corral-sentinel-{i}.{service}" for i in range(sentinels["spec"]["replicas"])}
    assert {h for h, _ in target.sentinels} == pods
    (c,) = sentinels["spec"]["template"]["spec"]["containers"]
    assert {p for _, p in target.sentinels} == {p["containerPort"] for p in c["ports"]}
    script = (K8S / "components" / "sentinel" / "scripts" / "sentinel.sh").read_text()
    assert f"sentinel monitor {target.master} " in script
    valkeys = named(docs, "StatefulSet", "corral-valkey")
    assert valkeys["spec"]["replicas"] >= 3 and sentinels["spec"]["replicas"] >= 3


def test_keda_scales_each_worker_on_its_models_queues(rendered: dict[str, list[Doc]]) -> None:
    for name in ("external-redis", "keda", "sentinel"):
        docs = rendered[name]
        scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in kinds(docs, "ScaledObject")}
        assert sorted(scaled) == sorted(d["metadata"]["name"] for d in workers(docs)), name
        for dep in workers(docs):
            assert "replicas" not in dep["spec"], f"{name}: KEDA owns the replicas"
            spec = scaled[dep["metadata"]["name"]]["spec"]
            triggers = spec["triggers"]
            queues = [t["metadata"]["listName"] for t in triggers]
            assert queues == redis_keys.worker_queues(model_of(dep)), name
            formula = spec["advanced"]["scalingModifiers"]["formula"]
            assert set(re.findall(r"[a-z]+", formula)) == {t["name"] for t in triggers}
            for t in triggers:
                check_broker_address(name, docs, t)


def check_broker_address(overlay: str, docs: list[Doc], trigger: Doc) -> None:
    """The trigger reaches the broker Corral uses, from KEDA's own namespace."""
    meta = trigger["metadata"]
    if overlay == "external-redis":
        auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        secret = values(named(docs, "Secret", "corral-secrets"), "Secret")
        params = {ref["parameter"]: secret[ref["key"]] for ref in auth["spec"]["secretTargetRef"]}
        assert params["address"] == secrets_for(overlay)["REDIS_ADDRESS"]
        assert params["password"] in secret["CORRAL_REDIS_URL"]
        return
    address = meta["addresses"] if overlay == "sentinel" else meta["address"]
    host, port = address.split(":")
    service, namespace, svc = host.split(".")
    found = named(docs, "Service", service)
    assert (namespace, svc) == (found["metadata"]["namespace"], "svc"), address
    assert int(port) in {p["port"] for p in found["spec"]["ports"]}
    if overlay == "sentinel":
        env = values(named(docs, "ConfigMap", "corral-env"), "ConfigMap")
        assert trigger["type"] == "redis-sentinel"
        assert meta["sentinelMaster"] == env["CORRAL_REDIS_SENTINEL_MASTER"]


def test_without_keda_an_hpa_scales_each_worker_on_the_queue_metric(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prometheus-adapter"]
    assert not kinds(docs, "ScaledObject")
    rules = yaml.safe_load(
        named(docs, "ConfigMap", "corral-prometheus-adapter-rules")["data"]["config.yaml"]
    )
    (rule,) = rules["externalRules"]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"])
    assert series and series[1] in {f.name for f in GatewayMetrics().registry.collect()}
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in kinds(docs, "HorizontalPodAutoscaler")}
    for dep in workers(docs):
        assert "replicas" not in dep["spec"]
        (metric,) = hpas[dep["metadata"]["name"]]["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == rule["name"]["as"]
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"model": model_of(dep)}


def test_secrets_come_from_the_generator_only(rendered: dict[str, list[Doc]]) -> None:
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path
    for name, docs in each(rendered):
        (secret,) = kinds(docs, "Secret")
        assert values(secret, "Secret") == secrets_for(name)
        others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
        for value in secrets_for(name).values():
            if "t0ps3cret" in value:
                assert value not in others, f"{name}: a secret outside its Secret"


def test_prometheus_scrapes_the_gateways_and_workers(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["keda"]
    config = yaml.safe_load(named(docs, "ConfigMap", "corral-prometheus")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    by_component = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in kinds(docs, "Deployment")
    }
    for job, component, port in (
        ("corral-gateway", "gateway", "http"),
        ("corral-workers", "worker", "metrics"),
    ):
        keeps = [r for r in jobs[job]["relabel_configs"] if r.get("action") == "keep"]
        dep = by_component[component]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        meta = {
            "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in labels.items()
        }
        meta["__meta_kubernetes_pod_container_port_name"] = port
        assert port in {p["name"] for p in c["ports"]}
        for rule in keeps:  # each keep rule lets this component's pods through
            joined = ";".join(meta.get(s, "") for s in rule["source_labels"])
            assert re.fullmatch(rule["regex"], joined), (job, rule)
    # the gateway's /metrics wants the admin key: the file Prometheus reads is the Secret's
    prom = named(docs, "Deployment", "corral-prometheus")["spec"]["template"]["spec"]
    key_file = Path(jobs["corral-gateway"]["authorization"]["credentials_file"])
    (c,) = prom["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    (volume,) = [v for v in prom["volumes"] if v["name"] == mount["name"]]
    items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
    assert items[key_file.name] == "CORRAL_ADMIN_KEY"


def test_grafana_gets_the_dashboard_and_finds_prometheus(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["keda"]
    dashboards = named(docs, "ConfigMap", "corral-grafana-dashboards")["data"]
    source = ROOT / "deploy" / "grafana" / "dashboards" / "corral.json"
    assert json.loads(dashboards[source.name]) == json.loads(source.read_text())
    sources = named(docs, "ConfigMap", "corral-grafana-datasources")["data"]
    (url,) = [s["url"] for s in yaml.safe_load(next(iter(sources.values())))["datasources"]]
    host, port = url.split("//")[1].split(":")
    assert int(port) in {p["port"] for p in named(docs, "Service", host)["spec"]["ports"]}


# --- the Sentinel set's start scripts -------------------------------------------------------


def run_script(tmp_path: Path, script: str, host: str, sentinel_reply: str | None) -> list[str]:
    """Run a start script with stand-ins for `hostname`, `valkey-cli` (answering
    `sentinel_reply`, or failing) and `valkey-server` (recording its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "server-args"
    stubs = {
        "hostname": f"echo {host}",
        "valkey-cli": "exit 1" if sentinel_reply is None else f"printf '{sentinel_reply}'",
        "valkey-server": f'for a in "$@"; do echo "$a"; done > {record}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "POD_NAMESPACE": "ns",
        "SENTINEL_CONF": str(tmp_path / "sentinel.conf"),
    }
    path = K8S / "components" / "sentinel" / "scripts" / script
    run = subprocess.run(
        ["/bin/sh", str(path)], env=env, capture_output=True, text=True, timeout=10
    )
    assert run.returncode == 0, run.stderr
    return record.read_text().split("\n")[:-1]


FQDN = "{}.corral-valkey.ns.svc.cluster.local"


def test_the_first_valkey_starts_as_master_the_others_follow_it(tmp_path: Path) -> None:
    first = run_script(tmp_path, "valkey.sh", "corral-valkey-0", None)
    assert "--replicaof" not in first and "noeviction" in first
    assert first[first.index("--replica-announce-ip") + 1] == FQDN.format("corral-valkey-0")
    second = run_script(tmp_path, "valkey.sh", "corral-valkey-1", None)
    assert second[-2:] == [FQDN.format("corral-valkey-0"), "6379"]


def test_a_valkey_follows_the_master_the_sentinels_know(tmp_path: Path) -> None:
    master = FQDN.format("corral-valkey-2")
    args = run_script(tmp_path, "valkey.sh", "corral-valkey-0", f"{master}\\n6379\\n")
    assert args[-3:] == ["--replicaof", master, "6379"]  # a former master comes back a replica
    itself = run_script(tmp_path, "valkey.sh", "corral-valkey-2", f"{master}\\n6379\\n")
    assert "--replicaof" not in itself
    # an error reply from a sentinel is no address
    args = run_script(tmp_path, "valkey.sh", "corral-valkey-1", "ERR No such master\\n")
    assert args[-2:] == [FQDN.format("corral-valkey-0"), "6379"]


def test_a_sentinel_monitors_the_known_master(tmp_path: Path) -> None:
    master = FQDN.format("corral-valkey-1")
    args = run_script(tmp_path, "sentinel.sh", "corral-sentinel-2", f"{master}\\n6379\\n")
    assert args == [str(tmp_path / "sentinel.conf"), "--sentinel"]
    conf = (tmp_path / "sentinel.conf").read_text()
    assert f"sentinel monitor corral {master} 6379 2" in conf
    assert "sentinel announce-ip corral-sentinel-2.corral-sentinel.ns.svc.cluster.local" in conf
    run_script(tmp_path, "sentinel.sh", "corral-sentinel-0", None)
    conf = (tmp_path / "sentinel.conf").read_text()
    assert f"sentinel monitor corral {FQDN.format('corral-valkey-0')} 6379 2" in conf

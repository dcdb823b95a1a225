"""Static validation of the Redis Cluster deployments: the compose profile, Kubernetes.

Both must make the same cluster the tests run on (3 masters, one replica each, AOF on
every node), and put the workers in cluster mode by the settings the service parses.
"""

from __future__ import annotations

import shlex
from typing import Any

from app.settings import Settings, Stores
from tests.test_static import BIN, COMPOSE_LOCAL_ENV, ROOT, _compose, _env_file, run, yaml_docs

CLUSTER_ENV = ROOT / "deploy" / "compose-cluster.env"
CLUSTER_K8S = ROOT / "deploy" / "k8s" / "redis-cluster"
NODES = [f"redis-cluster-{n}" for n in range(6)]


def _cluster_compose() -> dict[str, Any]:
    return _compose({"ADMIN_TOKEN": "x" * 20, **_env_file(CLUSTER_ENV)})


def test_compose_cluster_profile_has_six_nodes_joined_three_by_three() -> None:
    services = _cluster_compose()["services"]
    for name in NODES:
        node = services[name]
        assert node["profiles"] == ["cluster"]
        argv = node["command"]
        for flag, value in (("--cluster-enabled", "yes"), ("--appendonly", "yes")):
            assert argv[argv.index(flag) + 1] == value
        # Each node its own volume: nodes.conf and the AOF survive a restart.
        assert node["volumes"] == [f"{name}:/data"]
    init = services["redis-cluster-init"]
    assert init["profiles"] == ["cluster"]
    assert set(init["depends_on"]) == set(NODES)
    script = init["command"][0].replace("$$", "$")
    assert "--cluster-replicas 1" in script
    assert "for n in 0 1 2 3 4 5" in script
    # Only with the profile: the plain and local runs keep the single Redis.
    assert "redis" in services


def test_compose_cluster_env_puts_the_workers_in_cluster_mode() -> None:
    compose = _cluster_compose()
    env = {k: str(v) for k, v in compose["services"]["app"]["environment"].items()}
    settings = Settings.from_env(env)
    assert settings.redis_cluster
    assert settings.redis_wait_replicas == 1
    assert settings.redis_url.startswith("redis://redis-cluster-0:")
    assert Stores.from_env(env).redis_cluster
    assert _env_file(CLUSTER_ENV)["COMPOSE_PROFILES"] == "cluster"


def test_compose_without_the_profile_is_one_redis() -> None:
    for extra in ({}, _env_file(COMPOSE_LOCAL_ENV)):
        compose = _compose({"ADMIN_TOKEN": "x" * 20, **extra})
        env = {k: str(v) for k, v in compose["services"]["app"]["environment"].items()}
        settings = Settings.from_env(env)
        assert not settings.redis_cluster
        assert settings.redis_wait_replicas == 0
        assert settings.redis_url == "redis://redis:6379/0"


def test_kubernetes_redis_cluster_validates_strictly() -> None:
    manifests = sorted(CLUSTER_K8S.glob("*.yaml"))
    assert manifests
    result = run(BIN / "kubernetes-validate", "--strict", "--quiet", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def _k8s(kind: str) -> dict[str, Any]:
    (doc,) = [
        d for p in sorted(CLUSTER_K8S.glob("*.yaml")) for d in yaml_docs(p) if d["kind"] == kind
    ]
    return doc


def test_kubernetes_redis_cluster_is_the_tested_shape() -> None:
    statefulset = _k8s("StatefulSet")
    assert statefulset["spec"]["replicas"] == len(NODES)
    service = _k8s("Service")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"redis": 6379, "bus": 16379}
    conf = _k8s("ConfigMap")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and line[0] != "#")
    assert settings["cluster-enabled"] == "yes"
    assert settings["appendonly"] == "yes"
    assert settings["maxmemory-policy"] == "noeviction"
    # A pod rescheduled keeps its name, not its IP: nodes announce the name.
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert "--cluster-announce-hostname" in container["args"][0]
    assert settings["cluster-preferred-endpoint-type"] == "hostname"
    assert _k8s("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    anti = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"]

    (create,) = _k8s("Job")["spec"]["template"]["spec"]["containers"]
    argv = shlex.split(create["args"][0].split("||", 1)[1])
    domain = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert argv[:3] == ["redis-cli", "--cluster", "create"]
    assert argv[3:9] == [f"{name}.{domain}:6379" for name in NODES]
    assert argv[9:] == ["--cluster-replicas", "1", "--cluster-yes"]


def test_kubernetes_workers_settings_for_the_cluster_parse() -> None:
    """The settings deploy/README.md gives the workers for this cluster."""
    service = _k8s("Service")
    seed = f"redis://redis-cluster-0.redis-cluster.{service['metadata']['namespace']}.svc:6379/0"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert seed in readme
    settings = Settings.from_env(
        {
            "REDIS_URL": seed,
            "REDIS_CLUSTER": "1",
            "REDIS_WAIT_REPLICAS": "1",
            "DATABASE_URL": "postgresql://hongbao@postgres:5432/hongbao",
            "ADMIN_TOKEN": "x" * 20,
        }
    )
    assert settings.redis_cluster
    assert settings.redis_wait_replicas == 1

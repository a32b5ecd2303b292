"""The shipped deploy files agree with the streamer and with each other (CI has no Docker engine to run them).

What is checked here: the Grafana dashboard and the alert rules name only
metrics the streamer exports; `docker-compose config` accepts the compose
file and its mounts, secrets and ports line up with the container config, the
Dockerfiles and the Prometheus and Grafana provisioning; `flowsort keys`
writes the key file the container config names; `systemd-analyze verify`
accepts the unit and its CPU-pinning drop-in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric

from system_packages import require

yaml = pytest.importorskip("yaml", reason="PyYAML reads the shipped configs: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flowsort.json"
CONTAINER_CONFIG = DEPLOY / "compose" / "streamer.toml"
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                   "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name the streamer's registry exposes (labelled or not, observed or not)."""
    from streamer.metrics import Metrics

    families: list[Metric] = list(Metrics().registry.collect())
    return {family.name + suffix for family in families for suffix in SAMPLE_SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bflowsort_[a-z0-9_]+", expr))


def mount(volume: str) -> tuple[str, str]:
    """(source, target) of a compose volume "SOURCE:TARGET[:MODE]" (SOURCE may hold ${VAR:-default})."""
    if volume.endswith((":ro", ":rw")):
        volume = volume[:-3]
    source, target = volume.rsplit(":", 1)
    return source, target


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


# ---------------------------------------------------------------------------- Grafana and alerts


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exported = exported_names()
    assert {"flowsort_cells_decided_total", "flowsort_decision_latency_seconds_bucket",
            "flowsort_engine_info"} <= exported
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    named = set().union(*map(metric_names, exprs))
    assert named <= exported, f"not exported by the streamer: {sorted(named - exported)}"
    # What the issue asks the dashboard to show.
    for wanted in ("flowsort_cells_received_total", "flowsort_decision_latency_seconds_bucket",
                   "flowsort_cells_late_total", "flowsort_cells_rejected_total", "flowsort_cells_decided_total",
                   "flowsort_cells_dead_total", "flowsort_cells_sorted_total", "flowsort_engine_info"):
        assert wanted in named, f"the dashboard does not show {wanted}"
    assert any("histogram_quantile(0.99" in e for e in exprs)


def test_dashboard_is_well_formed_for_provisioning() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        assert panel["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] and t["refId"] for t in panel["targets"])
    assert dashboard["uid"] and dashboard["templating"]["list"][0]["datasource"]["uid"] == source["uid"]
    # Grafana reaches Prometheus by its compose service name and port.
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]


def test_alert_rules_name_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    named = set().union(*map(metric_names, exprs))
    assert named and named <= exported_names(), sorted(named - exported_names())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"FlowsortLateDecision", "FlowsortDropping", "FlowsortLatencyHigh", "FlowsortDown"} <= alerts


# ---------------------------------------------------------------------------- compose, images, container config


def test_docker_compose_config_accepts_the_compose_file() -> None:
    binary = require("docker-compose", "docker-compose")
    result = subprocess.run([binary, "-f", "docker-compose.yml", "config"], cwd=DEPLOY, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "FLOWSORT_BUNDLE": "/srv/bundle"})
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    streamer = resolved["services"]["streamer"]
    assert "/srv/bundle:/bundle:ro" in streamer["volumes"]
    assert "streamer-gpu" in resolved["services"]  # behind the gpu profile


def test_compose_mounts_what_the_container_config_and_images_expect() -> None:
    from streamer.config import load_config

    spec = compose()
    streamer = spec["services"]["streamer"]
    config = load_config(CONTAINER_CONFIG)
    mounts = {target: source for source, target in map(mount, streamer["volumes"])}
    # files the compose file mounts exist in the repository
    for service in spec["services"].values():
        for volume in service.get("volumes", []):
            source = mount(volume)[0]
            if source.startswith("./") and "secrets" not in source:
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    config_target = streamer["command"][streamer["command"].index("--config") + 1]
    assert (DEPLOY / mounts[config_target]).resolve() == CONTAINER_CONFIG
    assert streamer["command"][:2] == ["serve", "/bundle"] and "/bundle" in mounts
    assert config.security.curve, "non-loopback endpoints in a container need CURVE"
    (secret,) = streamer["secrets"]
    assert config.security.secret_key_file == f"/run/secrets/{secret['target']}"
    assert config.security.allowed_clients_dir in mounts
    # The ports the container listens on are the ones published and scraped.
    published = {int(p.split(":")[-1]) for p in streamer["ports"]}
    for section in (config.ingest, config.push, config.pub):
        assert int(section.endpoint.rsplit(":", 1)[1]) in published
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"streamer:{config.health.port}"]
    assert config.health.host == "0.0.0.0"
    # Grafana's dashboard provider reads where compose mounts the dashboards.
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/flowsort.yml").read_text())
    grafana_mounts = {target: source for source, target in map(mount, spec["services"]["grafana"]["volumes"])}
    assert grafana_mounts[provider["providers"][0]["options"]["path"]] == "./grafana/dashboards"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_run_serve_as_a_non_root_user(dockerfile: str) -> None:
    from flowsort.cli import COMMAND_PACKAGES
    from streamer.config import load_config

    text = (DEPLOY / dockerfile).read_text()
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line}
    for source in copied:
        assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    assert set(COMMAND_PACKAGES) <= copied, "`flowsort` imports every command package"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["flowsort"]' in text
    # The bundle is mounted read-only: engine caches go to a folder the image's user owns.
    assert "FLOWSORT_CACHE_DIR=/var/lib/flowsort/cache" in text and "chown -R flowsort:flowsort /var/lib/flowsort" in text
    assert 'CMD ["serve", "/bundle", "--config", "/etc/flowsort/streamer.toml"]' in text
    port = load_config(CONTAINER_CONFIG).health.port
    assert f"http://127.0.0.1:{port}/healthz" in text  # the HEALTHCHECK asks the configured port


def test_flowsort_keys_writes_the_key_the_container_config_names(tmp_path: Path) -> None:
    from flowsort.cli import main
    from streamer.config import load_config
    from streamer.security import load_keypair, load_public_key

    name = Path(load_config(CONTAINER_CONFIG).security.secret_key_file).name
    assert name.endswith(".key_secret")
    assert main(["keys", name.removesuffix(".key_secret"), "-d", str(tmp_path)]) == 0
    secret = tmp_path / name
    assert secret.stat().st_mode & 0o077 == 0  # a compose secret keeps this mode: run as its owner
    public, _ = load_keypair(secret)
    assert load_public_key(str(secret.with_suffix(".key"))) == public


# ---------------------------------------------------------------------------- systemd


def test_systemd_unit_and_pinning_drop_in_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (DEPLOY / "systemd/flowsort.service").read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes", "Restart=on-failure"):
        assert key in unit
    # verify checks that ExecStart exists: point it at this checkout's flowsort.
    flowsort = Path(sys.executable).with_name("flowsort")
    assert "ExecStart=/opt/flowsort/venv/bin/flowsort " in unit
    (tmp_path / "flowsort.service").write_text(unit.replace("/opt/flowsort/venv/bin/flowsort", str(flowsort)))
    drop_in = tmp_path / "flowsort.service.d"
    drop_in.mkdir()
    pinning = (DEPLOY / "systemd/flowsort.service.d/cpu-pinning.conf.example").read_text()
    assert "AllowedCPUs=" in pinning and "CPUAffinity=" in pinning
    (drop_in / "cpu-pinning.conf").write_text(pinning)
    result = subprocess.run([analyze, "verify", str(tmp_path / "flowsort.service")], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    # Unknown keys and bad values are only warnings: none may mention the unit or its drop-in.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line
                or "flowsort.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr

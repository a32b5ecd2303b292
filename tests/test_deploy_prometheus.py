"""A real Prometheus, with the shipped scrape config and alert rules, scraping a real `flowsort serve`.

Prometheus runs on loopback with deploy/prometheus/prometheus.yml, changed
only where a test must: the target (the test streamer's health port), a 1 s
scrape and evaluation interval, and the rule file's absolute path. The
numbers Prometheus reports are checked against the cells sent and the
decisions received; the dashboard's queries run against it as well.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.metrics import LATENCY_BUCKETS
from system_packages import require

yaml = pytest.importorskip("yaml", reason="PyYAML reads the shipped configs: pip install -e '.[dev]'")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flowsort.json"
CHANNELS = (3, 6)
GATES = [{"name": "mitotic", "classes": ["Prophase", "Metaphase", "Anaphase", "Telophase"], "min_probability": 0.5},
         {"name": "rest", "classes": ["G1", "S_phase", "G2"], "min_probability": 0.0, "stream": 2}]
# Grafana's variables, as a dashboard viewer would have them.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "5m"}


def test_promtool_validates_the_shipped_config_and_rules() -> None:
    promtool = require("promtool", "prometheus")
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                    ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *command], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"


class Prometheus:
    """A Prometheus server on a free loopback port, with its HTTP API."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.wait(lambda: self._ready(), 60, "Prometheus did not become ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.get("/-/ready", raw=True) is not None
        except OSError:
            return False

    def get(self, path: str, raw: bool = False, **params: Any) -> Any:
        from streamer.testing import get

        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = get(self.url + path + query, timeout=5)
        if raw:
            return body if status == 200 else None
        assert status == 200, f"{path}{query}: HTTP {status}: {body}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        return self.get("/api/v1/query", **params)["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None

    def wait(self, predicate: Any, timeout: float, message: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"{message} after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def scrape_config_for(shipped: dict[str, Any], target: str) -> dict[str, Any]:
    """The shipped config with the test's target, a 1 s interval and the rule file's absolute path."""
    config = json.loads(json.dumps(shipped))
    config["global"].update(scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in shipped["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "flowsort"]
    for static in job["static_configs"]:
        static["targets"] = [target]
    return config


@pytest.fixture(scope="module")
def run(quick_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A streamer and a Prometheus scraping it; 150 cells sent and decided; what Prometheus saw then, and when."""
    from streamer.client import Receiver, Sender
    from streamer.testing import Served, config_dict, write_toml
    from trainer.synthetic import generate

    binary = require("prometheus", "prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = write_toml(folder / "streamer.toml", config_dict(deadline={"budget_us": 2_000_000.0},
                                                              pub={"endpoint": ""}, gates=GATES))
    with Served(quick_bundle, config, folder) as served:
        target = urllib.parse.urlsplit(served["health"]).netloc
        shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        prometheus_config = folder / "prometheus.yml"
        prometheus_config.write_text(yaml.safe_dump(scrape_config_for(shipped, target)))
        prometheus = Prometheus(binary, prometheus_config, folder)
        receiver = Receiver(served["push"])
        sender = Sender(served["ingest"])
        try:
            prometheus.wait(lambda: prometheus.value('up{job="flowsort"}') == 1, 30, "the streamer was never up")
            for nonce in range(200):  # PUSH drops while no consumer is connected
                sender.ping(nonce)
                if receiver.wait_other("pong", 0.05, nonce=nonce):
                    break
            cells = generate(150, seed=6, size=32, prior="uniform", dead_fraction=0.1).images
            ids = np.arange(1, 151, dtype=np.uint64)
            for i in range(30):  # single cells, then blocks of 8
                sender.cells("acq-prom", ids[i:i + 1], cells[i], CHANNELS)
            for start in range(30, 150, 8):
                sender.cells("acq-prom", ids[start:start + 8], cells[start:start + 8], CHANNELS)
            assert receiver.wait_for(ids.tolist(), 30), served.log()
            seen: dict[str, float] = {}

            def scraped_all() -> bool:
                data = prometheus.get("/api/v1/query", query="sum(flowsort_cells_decided_total)")["result"]
                if data and float(data[0]["value"][1]) == len(ids):
                    seen["at"] = float(data[0]["value"][0])
                    return True
                return False

            prometheus.wait(scraped_all, 30, "Prometheus never saw every decision")
            # A rate needs two samples of a series: wait for the scrape after the one that first saw them all.
            prometheus.wait(lambda: (prometheus.value("min(count_over_time(flowsort_cells_decided_total[1m]))")
                                     or 0) >= 2, 30, "no second scrape of the decided cells")
            yield {"prometheus": prometheus, "served": served, "sender": sender, "rows": dict(receiver.rows),
                   "cells": cells, "at": seen["at"]}
        finally:
            sender.close(linger=0)
            receiver.close()
            prometheus.stop()


def test_prometheus_counts_every_decided_cell(run: dict[str, Any]) -> None:
    prometheus, rows, at = run["prometheus"], run["rows"], run["at"]
    n = len(rows)
    assert prometheus.value("sum(flowsort_cells_decided_total)", at) == n == 150
    assert prometheus.value("flowsort_cells_received_total", at) == n
    assert prometheus.value('flowsort_messages_received_total{type="cells"}', at) == 30 + 15
    assert prometheus.value("flowsort_decision_latency_seconds_count", at) == n
    per_label = {r["metric"]["label"]: float(r["value"][1])
                 for r in prometheus.query("sum by (label) (flowsort_cells_decided_total)", at)}
    labels, counts = np.unique([row["label"] for row in rows.values()], return_counts=True)
    assert per_label == dict(zip(labels.tolist(), counts.astype(float).tolist()))
    per_gate = {r["metric"]["gate"]: float(r["value"][1])
                for r in prometheus.query("sum by (gate) (flowsort_cells_sorted_total)", at)}
    gates, counts = np.unique([row["gate"] for row in rows.values() if row["gate"]], return_counts=True)
    assert per_gate == dict(zip(gates.tolist(), counts.astype(float).tolist()))
    assert prometheus.value("flowsort_cells_dead_total", at) == sum(row["dead"] for row in rows.values())
    assert prometheus.value("flowsort_cells_late_total", at) == 0
    assert prometheus.value('flowsort_ready{instrument="ifc-1"}', at) == 1  # the shipped target labels apply


def test_latency_quantile_agrees_with_the_decisions(run: dict[str, Any]) -> None:
    """histogram_quantile lands in the bucket that holds the p99 of the latencies the decisions carried."""
    prometheus, rows, at = run["prometheus"], run["rows"], run["at"]
    p99 = prometheus.value("histogram_quantile(0.99, sum by (le) (flowsort_decision_latency_seconds_bucket))", at)
    # Decisions carry whole microseconds: each latency is in [us, us + 1) microseconds.
    latency_us = np.sort(np.array([row["latency_us"] for row in rows.values()], np.float64))
    bounds = np.array(LATENCY_BUCKETS)
    rank = int(np.ceil(0.99 * len(latency_us))) - 1  # the cell at the 99th percentile
    low = np.searchsorted(bounds, latency_us[rank] * 1e-6, side="left")
    high = np.searchsorted(bounds, (latency_us[rank] + 1) * 1e-6, side="left")
    lower = bounds[low - 1] if low > 0 else 0.0
    upper = bounds[high] if high < len(bounds) else np.inf
    assert lower <= p99 <= upper, f"p99 {p99} outside [{lower}, {upper}] (latencies {latency_us[-5:]} us)"
    # and the dashboard's form of it (a rate over a window) gives a number too
    rated = prometheus.value("histogram_quantile(0.99, sum by (le) "
                             "(rate(flowsort_decision_latency_seconds_bucket[1m])))", at)
    assert rated is not None and 0 < rated <= 0.1


def test_late_decisions_fire_the_alert(run: dict[str, Any]) -> None:
    prometheus, sender, cells = run["prometheus"], run["sender"], run["cells"]
    past = time.time_ns() - 1_000_000
    sender.cells("acq-prom-late", np.arange(9001, 9004, dtype=np.uint64), cells[:3], CHANNELS, deadline_ns=past)

    def firing() -> set[str]:
        return {a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"}

    prometheus.wait(lambda: "FlowsortLateDecision" in firing(), 30, "FlowsortLateDecision never fired")
    assert firing() == {"FlowsortLateDecision"}
    assert prometheus.value("flowsort_cells_late_total") == 3
    # every shipped rule evaluates without error against the real metrics
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    shipped = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    assert {rule["name"] for rule in rules} == {rule["alert"] for group in shipped["groups"] for rule in group["rules"]}
    assert all(rule["health"] == "ok" for rule in rules), rules


def test_dashboard_queries_run_and_return_data(run: dict[str, Any]) -> None:
    prometheus = run["prometheus"]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) > 20
    for expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        result = prometheus.query(expr)  # fails on a PromQL error
        selectors = re.findall(r"\bflowsort_[a-z0-9_]+(?:\{[^}]*\})?", expr)
        if all(prometheus.get("/api/v1/series", **{"match[]": selector}) for selector in selectors):
            assert result, f"no data for {expr}"  # every series it reads exists: it must show something

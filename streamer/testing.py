"""Helpers for tests and benchmarks of the service: configs on ephemeral ports, `flowsort serve` subprocesses.

Everything binds to loopback on ports the OS picks (``tcp://127.0.0.1:*``,
health port 0); a spawned service reports what it got in its ``--ready-file``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamer.config import StreamerConfig, parse_config
from streamer.metrics import parse_text

EPHEMERAL = "tcp://127.0.0.1:*"


def engine_for_tests() -> str:
    """OpenVINO where it runs here, else torch."""
    import engines

    reasons = engines.available()
    return "openvino" if reasons["openvino"] is None else "torch"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(**sections: Any) -> dict[str, Any]:
    """A config on ephemeral loopback ports, small warmup, with ``sections`` merged over it."""
    base = {
        "ingest": {"endpoint": EPHEMERAL},
        "push": {"endpoint": EPHEMERAL},
        "pub": {"endpoint": EPHEMERAL},
        "health": {"port": 0},
        "engine": {"engine": engine_for_tests(), "warmup_runs": 1},
        "logging": {"reject_interval_s": 0.0},
    }
    return merge(base, sections)


def make_config(**sections: Any) -> StreamerConfig:
    return parse_config(config_dict(**sections), "<test>")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A small TOML writer for test configs (tables, arrays of tables, scalars, arrays)."""
    lines: list[str] = []
    for name, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for table in value:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        else:
            raise TypeError(f"top-level {name} must be a table or an array of tables")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(health_url: str) -> dict[str, float]:
    status, text = get(health_url + "/metrics")
    assert status == 200, text
    return parse_text(text)


class Served:
    """A `flowsort serve` subprocess: endpoints from its ready file, and clean stopping."""

    def __init__(self, bundle: Path, config: Path, workdir: Path, args: Sequence[str] = (), name: str = "serve",
                 timeout: float = 60.0, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that execs the service (e.g. in a mount namespace)."""
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "flowsort", "serve", str(bundle), "--config", str(config),
             "--ready-file", str(self.ready_file), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.info = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"flowsort serve exited with {self.process.returncode}:\n{self.log()}")
            if self.ready_file.exists():
                info = json.loads(self.ready_file.read_text())
                status, _ = get(info["health"] + "/readyz")
                if status == 200:
                    return info
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"flowsort serve not ready after {timeout} s:\n{self.log()}")

    def __getitem__(self, key: str) -> str:
        return self.info[key]

    def metrics(self) -> dict[str, float]:
        return metrics(self.info["health"])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

"""deploy/Dockerfile.cpu built and run with podman, as an operator runs it (deploy/podman/ci.sh).

The bundle is mounted read-only and holds the compiled-model cache an earlier
`flowsort serve` as root left in it (flowsort 0.1 cached under the bundle),
files of mode 0440 that the image's user cannot read: OpenVINO, handed such a
cache, tries to delete them and fails on the read-only mount. The container,
as its non-root user, must start, decide cells sent with the reference
client, export its metrics and drain at SIGTERM, exiting cleanly.

Root and Debian only: podman, runc and debootstrap are installed when missing
(tests/system_packages.py); elsewhere the test skips and says why. The base
image stand-in and the image layers are reused from run to run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import engines
from streamer.client import Receiver, Sender
from streamer.testing import config_dict, get, write_toml
from system_packages import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "podman" / "ci.sh"
TAG = "localhost/flowsort:cpu-test"
CHANNELS = (3, 6)
BUILD_TIMEOUT_S = 1200
START_TIMEOUT_S = 240
CONTAINER_UID = "10001"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the CI settings of deploy/podman/ci.sh."""
    result = subprocess.run([str(SCRIPT), "podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image, built (layers cached) with deploy/podman/ci.sh."""
    if os.geteuid() != 0:
        pytest.skip("podman builds and runs the image as root here, and this is not root")
    for binary in ("podman", "runc", "debootstrap"):
        require(binary, binary)
    info = subprocess.run([str(SCRIPT), "podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-1000:]}")
    build = subprocess.run([str(SCRIPT), "build", TAG], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, f"building deploy/Dockerfile.cpu failed:\n{(build.stdout + build.stderr)[-4000:]}"
    return TAG


def free_ports(n: int) -> list[int]:
    """Loopback ports free now (the container shares the host's network)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def leave_root_cache_in(bundle: Path) -> None:
    """The cache `flowsort serve` 0.1 run as root left in a bundle: compiled fp32 models, mode 0440."""
    scratch = bundle.parent / "scratch-cache"
    with engines.load(bundle, "openvino", "fp32", max_batch=64, cache_dir=scratch):
        pass
    legacy = bundle / "engines" / "openvino-cache" / "fp32"
    legacy.mkdir(parents=True)
    for blob in scratch.rglob("*.blob"):
        shutil.move(blob, legacy / blob.name)
        (legacy / blob.name).chmod(0o440)
    shutil.rmtree(scratch)


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"flowsort-test-{uuid.uuid4().hex[:8]}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False)


def logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def wait_healthy(health: str, name: str) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        try:
            if get(health + "/healthz")[0] == 200 and get(health + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"the container is {state}:\n{logs(name)[-4000:]}"
        time.sleep(0.5)
    pytest.fail(f"not ready after {START_TIMEOUT_S} s:\n{logs(name)[-4000:]}")


# A cold build (Debian stand-in, pip install) on a busy 2-core machine takes longer than the suite's 600 s default.
@pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S + 300)
def test_cpu_image_serves_a_read_only_bundle_as_a_non_root_user(
    image: str, quick_bundle: Path, tmp_path: Path, container_name: str
) -> None:
    bundle = Path(shutil.copytree(quick_bundle, tmp_path / "bundle"))
    leave_root_cache_in(bundle)
    ingest, push, health_port = free_ports(3)
    # Cells wait up to 20 s for a full batch of 64: the second lot is still queued at SIGTERM, for the drain.
    config = write_toml(tmp_path / "streamer.toml", config_dict(
        ingest={"endpoint": f"tcp://127.0.0.1:{ingest}"}, push={"endpoint": f"tcp://127.0.0.1:{push}"},
        pub={"endpoint": ""}, health={"host": "127.0.0.1", "port": health_port},
        engine={"engine": "openvino", "precision": "fp32", "warmup_runs": 1},
        batching={"batch_sizes": [1, 2, 4, 8, 16, 32, 64], "max_delay_us": 20_000_000.0, "adaptive_delay": False},
        deadline={"budget_us": 0.0}))
    config.chmod(0o644)
    health = f"http://127.0.0.1:{health_port}"
    podman("run", "--detach", "--name", container_name, "--volume", f"{bundle}:/bundle:ro",
           "--volume", f"{config}:/etc/flowsort/streamer.toml:ro", image)
    wait_healthy(health, container_name)
    assert podman("exec", container_name, "id", "-u").stdout.strip() == CONTAINER_UID
    images = np.load(bundle / "validation.npz")["images"]
    receiver, sender = Receiver(f"tcp://127.0.0.1:{push}"), Sender(f"tcp://127.0.0.1:{ingest}")
    try:
        decided = list(range(128))  # two full batches: decided at once
        for i in decided:
            sender.cells("acq-image", [i], images[i % len(images)], CHANNELS)
        assert receiver.wait_for(decided, 60), logs(container_name)[-4000:]
        queued = list(range(128, 168))
        for i in queued:
            sender.cells("acq-image", [i], images[i % len(images)], CHANNELS)
        end = time.monotonic() + 20
        while (metrics := get(health + "/metrics")[1]) and f"flowsort_queue_depth {len(queued)}.0" not in metrics:
            assert time.monotonic() < end, metrics
            time.sleep(0.1)
        assert "flowsort_cells_received_total" in metrics and "flowsort_engine_info" in metrics
        assert not set(queued) & set(receiver.rows)
        podman("stop", "--time", "30", container_name, timeout=60)
        assert receiver.wait_for(queued, 10), f"{len(set(queued) - set(receiver.rows))} queued cells lost at SIGTERM"
        assert all(receiver.rows[i]["error"] == "" for i in decided + queued)
    finally:
        sender.close(linger=0)
        receiver.close()
    assert podman("inspect", "--format", "{{.State.ExitCode}}", container_name).stdout.strip() == "0"
    output = logs(container_name)
    assert "SIGTERM: draining" in output and f"drained {len(queued)} queued cells" in output, output[-4000:]
    assert "Traceback" not in output and "compiling without a cache" not in output, output[-4000:]

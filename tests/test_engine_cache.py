"""The engine cache: outside the bundle, keyed by what compiled it, and never fatal.

The read-only case is the one operators hit: a bundle trained and tried on a
workstation (which left an engine cache in it) mounted read-only where the
service runs as another user. As root, which reads any file, it is reproduced
with a read-only bind mount in a private mount namespace and cache files
OpenVINO cannot load (it then tries to delete them: "cannot remove: Read-only
file system"); as another user, with files that user cannot read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.cache import ENV_VAR, KEY_FILE, cache_root, cpu_identity, engine_cache
from streamer.client import Receiver, Sender
from streamer.testing import Served, config_dict, write_toml

CHANNELS = (3, 6)
BATCH_SIZES = [1, 2]  # few models to compile: the stale cache holds the very ones the service compiles


def test_root_is_the_configured_folder_then_the_variable_then_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tmp_path / "configured") == tmp_path / "configured"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv(ENV_VAR)
    assert cache_root() == tmp_path / "xdg" / "flowsort"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "flowsort"


def test_folders_are_keyed_and_a_foreign_or_unusable_one_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = {"bundle_hash": "ab" * 32, "precision": "fp32", "runtime": "1.0", **cpu_identity()}
    folder = engine_cache("openvino", key, tmp_path)
    assert folder is not None and folder.parent == tmp_path / "openvino"
    assert json.loads((folder / KEY_FILE).read_text()) == key
    assert engine_cache("openvino", key, tmp_path) == folder  # the same key finds its folder again
    other = engine_cache("openvino", {**key, "cpu_flags": "0" * 16}, tmp_path)  # another CPU: another folder
    assert other is not None and other != folder
    caplog.set_level(logging.WARNING, "engines.cache")
    (folder / KEY_FILE).write_text(json.dumps({**key, "runtime": "0.9"}))  # copied from elsewhere
    assert engine_cache("openvino", key, tmp_path) is None
    (folder / KEY_FILE).write_text("{not json")
    assert engine_cache("openvino", key, tmp_path) is None
    (tmp_path / "file").write_text("")
    assert engine_cache("openvino", key, tmp_path / "file") is None  # the root is not a folder
    assert [record.levelname for record in caplog.records] == ["WARNING"] * 3
    assert all("compiling without a cache" in record.getMessage() for record in caplog.records)


def test_an_openvino_engine_serves_without_its_cache(quick_bundle: Path, tmp_path: Path) -> None:
    images = np.load(quick_bundle / "validation.npz")["images"][:8]
    (tmp_path / "not-a-folder").write_text("")
    with engines.load(quick_bundle, "openvino", "fp32", max_batch=8, cache_dir=tmp_path / "not-a-folder") as engine:
        assert engine.infer(images).probabilities.shape == (8, len(engine.bundle.class_names))


def stale_cache_in(bundle: Path, root: bool) -> Path:
    """A cache such as an earlier serve left in the bundle, then made unloadable (root) or unreadable (a user)."""
    stale = bundle / "engines" / "cache"
    with engines.load(bundle, "openvino", "fp32", max_batch=max(BATCH_SIZES), cache_dir=stale):
        pass
    blobs = list(stale.rglob("*.blob"))
    assert blobs
    for blob in blobs:
        blob.chmod(0o640)
        if root:  # root reads any file, so give OpenVINO one it cannot load instead
            blob.write_bytes(os.urandom(1000))
        blob.chmod(0o440 if root else 0o000)
    return stale


def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that execs its command with ``folder`` bind-mounted read-only (root), or nothing."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" "{folder}" && exec "$@"'
    prefix = [unshare or "unshare", "--mount", "--", "sh", "-c", script, "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"cannot mount {folder} read-only in a mount namespace: {probe.stderr.strip()}")
    return prefix


@pytest.fixture
def read_only_bundle(quick_bundle: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, list[str]]]:
    """A read-only copy of the quick bundle holding a stale cache; a prefix for commands that must see it so."""
    bundle = Path(shutil.copytree(quick_bundle, tmp_path / "bundle"))
    stale = stale_cache_in(bundle, os.geteuid() == 0)
    for path in [bundle, *bundle.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        yield bundle, stale, read_only_prefix(bundle)
    finally:
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_serves_a_read_only_bundle_holding_a_cache_it_cannot_use(
    read_only_bundle: tuple[Path, Path, list[str]], quick_bundle: Path, tmp_path: Path
) -> None:
    bundle, stale, prefix = read_only_bundle
    images = np.load(bundle / "validation.npz")["images"]
    # The cache the operator pointed at is the stale one inside the read-only bundle.
    config = write_toml(tmp_path / "s.toml", config_dict(
        engine={"engine": "openvino", "precision": "fp32", "warmup_runs": 1, "cache_dir": str(stale)},
        batching={"batch_sizes": BATCH_SIZES}, deadline={"budget_us": 0.0}, pub={"endpoint": ""}))
    with Served(bundle, config, tmp_path, prefix=prefix, timeout=120) as served:
        receiver, sender = Receiver(served["push"]), Sender(served["ingest"])
        try:
            ids = list(range(40))
            deadline = time.monotonic() + 30
            while not receiver.wait_for([0], 0.2):  # the first cells may go before the connection is up
                assert time.monotonic() < deadline, served.log()
                sender.cells("acq-ro", [0], images[0], CHANNELS)
            for i in ids[1:]:
                sender.cells("acq-ro", [i], images[i % len(images)], CHANNELS)
            assert receiver.wait_for(ids, 20), served.log()
            errors = {i: receiver.rows[i]["error"] for i in ids if receiver.rows[i]["error"]}
            assert not errors, errors
        finally:
            sender.close(linger=0)
            receiver.close()
        served.signal(signal.SIGTERM)
        assert served.process.wait(30) == 0, served.log()
        log = served.log()
    assert log.count("compiling without a cache") == 1, log
    # quantize, the one command that writes into a bundle, refuses a read-only one before any work.
    quantize = subprocess.run(
        [*prefix, sys.executable, "-m", "flowsort", "quantize", str(bundle), str(quick_bundle.parent / "dataset")],
        capture_output=True, text=True, timeout=120)
    assert quantize.returncode != 0 and "not writable" in quantize.stderr, quantize.stderr


def test_openvino_failing_on_a_cache_compiles_without_it(read_only_bundle: tuple[Path, Path, list[str]]) -> None:
    """Handed the stale cache unchecked, as flowsort 0.1 did, OpenVINO fails; the engine compiles anew."""
    bundle, stale, prefix = read_only_bundle
    folder = next(path.parent for path in stale.rglob("*.blob"))
    script = (
        "import logging, sys; from pathlib import Path; import engines, engines.openvino_engine as ov; "
        "logging.basicConfig(); ov.engine_cache = lambda *args: Path(sys.argv[2]); "
        f"engines.load(sys.argv[1], 'openvino', 'fp32', max_batch={max(BATCH_SIZES)}).close(); print('loaded')"
    )
    run = subprocess.run([*prefix, sys.executable, "-c", script, str(bundle), str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr
    assert "OpenVINO failed on the engine cache" in run.stderr and "compiling without a cache" in run.stderr

"""Where engines keep what they compile: a cache folder of this machine's, never the bundle.

Bundles are read-only to flowsort (mounted ``:ro`` in a container, shared between
users, copied from a workstation): an engine's compiled models (OpenVINO blobs,
TensorRT plans) go to a cache root chosen, first found, from the ``cache_dir``
given (``[engine] cache_dir`` in streamer.toml), ``$FLOWSORT_CACHE_DIR``,
``$XDG_CACHE_HOME/flowsort`` and ``~/.cache/flowsort``.

Each engine keeps one folder per key, ``ROOT/ENGINE/DIGEST/``, the digest of
everything its compiled files depend on (bundle hash, precision, runtime
version, CPU model and flags or GPU and compute capability); ``key.json`` in it
says which. A cache made on another machine, by another runtime or for another
model is therefore never read as this one's. A folder this process cannot use
(not writable, holding files it cannot read, a ``key.json`` that does not
match) is left alone with one warning and the engine compiles without a cache:
a cache only ever saves time, so it is never fatal. This matters for OpenVINO,
which deletes cache files it cannot read and fails when it cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

ENV_VAR = "FLOWSORT_CACHE_DIR"
KEY_FILE = "key.json"

log = logging.getLogger(__name__)


def cache_root(configured: str | Path | None = None) -> Path:
    """The cache root: ``configured``, else ``$FLOWSORT_CACHE_DIR``, else the user's cache folder."""
    chosen = configured or os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # Path.home: RuntimeError without a home
    return base / "flowsort"


def cpu_identity() -> dict[str, str]:
    """The CPU's model name and a digest of its feature flags: what compiled CPU code depends on."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        first_cpu = ""
    for line in first_cpu.splitlines():
        name, _, value = (part.strip() for part in line.partition(":"))
        if name == "model name":
            model = value
        elif name in ("flags", "Features"):
            flags = " ".join(sorted(value.split()))
    return {"cpu": model, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def engine_cache(engine: str, key: dict[str, Any], root: str | Path | None = None) -> Path | None:
    """The folder caching ``engine``'s files for ``key`` (made if needed), or None, logged, where it is unusable."""
    try:
        folder = cache_root(root) / engine / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    except RuntimeError as exc:  # no home folder for the default root
        log.warning("no engine cache (%s): set %s or [engine] cache_dir; compiling without a cache", exc, ENV_VAR)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = _problem(folder, key)
    except OSError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log.warning("engine cache %s ignored (%s): compiling without a cache", folder, problem)
        return None
    return folder


def _problem(folder: Path, key: dict[str, Any]) -> str | None:
    """Why this process cannot use ``folder`` as ``key``'s cache, or None (claiming it for ``key`` if new)."""
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return "this user cannot read and write it"
    for path in folder.rglob("*"):
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            return f"this user cannot read {path.name}"
    key_file = folder / KEY_FILE
    if key_file.is_file():
        try:
            found = json.loads(key_file.read_text())
        except (OSError, ValueError) as exc:
            return f"{KEY_FILE} is unreadable: {exc}"
        return None if found == key else f"{KEY_FILE} describes another machine or model: {found}"
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
        json.dump(key, handle, indent=2, sort_keys=True)
    os.replace(handle.name, key_file)  # atomic: a process starting beside this one reads all of it or nothing
    return None

"""Debian tools the deploy tests need (prometheus, promtool, docker-compose), installed when missing.

As root on Debian the tests install the package themselves, so `make test`
alone runs them; elsewhere they skip and say why. In CI (``CI`` set) a failed
install fails the test instead: CI must not pass by skipping what it is there
to check.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

INSTALL_TIMEOUT_S = 600


def _apt_install(package: str) -> str:
    """Install ``package`` with apt-get; '' on success, else why not."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it"
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get (not Debian)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", package]
    result = None
    for step in ([install], [[apt, "update", "-q"], install]):  # a stale package list: update once, retry
        for command in step:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if result.returncode == 0:
            return ""
    return f"`apt-get install {package}` failed:\n{(result.stdout + result.stderr)[-2000:]}"


def require(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` if needed; skips (fails in CI) when it cannot."""
    path = shutil.which(binary)
    if path:
        return path
    reason = _apt_install(package)
    path = shutil.which(binary)
    if path:
        return path
    message = f"{binary} is not installed and could not be: {reason or f'{package} has no {binary}'}"
    if os.environ.get("CI") and reason.startswith("`apt-get"):
        pytest.fail(message)
    pytest.skip(message)

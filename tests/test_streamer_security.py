"""CurveZMQ: `flowsort keys`, client authentication, and the refusal to serve exposed without it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from flowsort.cli import main
from flowsort.errors import UserError
from streamer.client import Receiver, Sender
from streamer.security import is_loopback, load_keypair, load_public_key
from streamer.service import Service, check_exposure
from streamer.testing import config_dict, make_config, metrics, write_toml

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", "instrument", "sorter", "intruder"):
        assert main(["keys", name, "-d", str(folder)]) == 0
    return folder


def test_keys_command_writes_a_usable_pair(keys: Path, capsys: pytest.CaptureFixture) -> None:
    public, secret = load_keypair(keys / "server.key_secret")
    assert len(public) == 40 and len(secret) == 40
    assert load_public_key(str(keys / "server.key")) == public
    assert load_public_key(public.decode()) == public
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    assert main(["keys", "server", "-d", str(keys)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.1:*", True), ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True), ("ipc:///tmp/flowsort.sock", True), ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.20:5555", False),
        ("tcp://instrument.lab:5555", False), ("tcp://eth0:5555", False),
    ],
)
def test_is_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_exposed_endpoint_needs_curve_or_insecure() -> None:
    exposed = make_config(ingest={"endpoint": "tcp://0.0.0.0:*"})
    with pytest.raises(UserError, match="--insecure"):
        check_exposure(exposed, insecure=False)
    check_exposure(exposed, insecure=True)
    check_exposure(make_config(), insecure=False)


def test_serve_refuses_an_exposed_endpoint_without_curve(quick_bundle: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    config = write_toml(tmp_path / "exposed.toml", config_dict(pub={"endpoint": "tcp://0.0.0.0:*"}))
    assert main(["serve", str(quick_bundle), "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "tcp://0.0.0.0:*" in error and "--insecure" in error and "curve" in error.lower()


def test_curve_admits_listed_clients_and_refuses_others(quick_bundle: Path, keys: Path) -> None:
    config = make_config(
        security={"curve": True, "secret_key_file": str(keys / "server.key_secret"),
                  "allowed_clients": [str(keys / "instrument.key"), str(keys / "sorter.key")]},
        pub={"endpoint": ""},
        deadline={"budget_us": 0.0},
    )
    service = Service(quick_bundle, config).start()
    server_public, _ = load_keypair(keys / "server.key_secret")

    def client(name: str) -> tuple[bytes, bytes, bytes]:
        public, secret = load_keypair(keys / f"{name}.key_secret")
        return public, secret, server_public

    context = zmq.Context()
    sorter = Receiver(service.endpoints["push"], context=context, curve=client("sorter"))
    instrument = Sender(service.endpoints["ingest"], context=context, curve=client("instrument"))
    intruder = Sender(service.endpoints["ingest"], context=context, curve=client("intruder"))
    plain = Sender(service.endpoints["ingest"], context=context)
    try:
        cells = np.full((2, 2, 32, 32), 600, np.uint16)
        for nonce in range(100):  # until the sorter's connection is up
            instrument.ping(nonce)
            if sorter.wait_other("pong", 0.1, nonce=nonce):
                break
        instrument.cells("acq", [1, 2], cells, (3, 6))
        for peer, ids in ((intruder, [101, 102]), (plain, [201, 202])):
            # once the server has refused its handshake a peer has no connection to queue on, so a send would block
            peer.socket.setsockopt(zmq.SNDTIMEO, 1000)
            with contextlib.suppress(zmq.Again):
                peer.cells("acq", ids, cells, (3, 6))
        assert sorter.wait_for([1, 2], 20)
        time.sleep(0.5)
        assert not {101, 102, 201, 202} & set(sorter.rows)  # never received, never answered
        counts = metrics(service.endpoints["health"])
        assert counts["flowsort_auth_failures_total"] >= 1
        assert counts["flowsort_cells_received_total"] == 2
        # a monitor without keys cannot listen in on decisions either
        eavesdropper = Receiver(service.endpoints["push"], context=context)
        instrument.cells("acq", [3, 4], cells, (3, 6))
        assert sorter.wait_for([3, 4], 20)
        assert not eavesdropper.rows
        eavesdropper.close()
    finally:
        for peer in (instrument, intruder, plain):
            peer.close(linger=0)
        sorter.close()
        service.stop()
        context.destroy(linger=0)

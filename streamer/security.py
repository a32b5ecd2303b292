"""CurveZMQ: key pairs, socket setup, client authentication, and the loopback rule.

* ``flowsort keys NAME`` writes ``NAME.key`` (public) and ``NAME.key_secret``
  (public + secret) in ZeroMQ's certificate format.
* With ``[security] curve = true`` every socket the service binds is a CURVE
  server holding the service's key pair, and a ZAP authenticator
  (``zmq.auth.thread.ThreadAuthenticator``) admits only the client public keys
  the config lists; every socket it connects is a CURVE client that needs the
  peer's public key (``server_key``).
* Without CURVE, the service refuses any endpoint that is not loopback
  (``127.0.0.0/8``, ``::1``, ``localhost``, ``ipc://``, ``inproc://``) unless
  ``--insecure`` is given: cell images and sort decisions are not for the
  whole network to read or forge.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from flowsort.errors import UserError

log = logging.getLogger(__name__)
Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def make_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into ``directory``; refuses to overwrite."""
    if not zmq.has("curve"):
        raise UserError("this libzmq was built without CURVE support")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise UserError(f"key name {name!r} must be letters, digits, '_', '-' or '.'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise UserError(f"{path} already exists: choose another name or remove it first")
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def load_public_key(value: str, base: Path = Path(".")) -> bytes:
    """A z85 public key given inline (40 characters) or as a .key / .key_secret file."""
    value = value.strip()
    if Z85_KEY.match(value):
        return value.encode("ascii")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{value!r} is neither a 40-character z85 public key nor a readable key file ({exc})") from None
    if public is None:
        raise UserError(f"{path} holds no public key")
    return public


def load_keypair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a .key_secret file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the key pair {path}: {exc}") from None
    if not secret:
        raise UserError(f"{path} holds no secret key: give the .key_secret file of `flowsort keys`")
    return public, secret


def allowed_client_keys(entries: Iterable[str], directory: str, base: Path) -> set[bytes]:
    keys = {load_public_key(entry, base) for entry in entries}
    if directory:
        folder = Path(directory).expanduser()
        folder = folder if folder.is_absolute() else base / folder
        if not folder.is_dir():
            raise UserError(f"allowed_clients_dir {folder} is not a folder")
        keys |= set(zmq.auth.load_certificates(str(folder)).keys())
    return keys


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` stays on this machine."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    # tcp://[interface;]host:port, host maybe [v6]
    host = address.rsplit(":", 1)[0]
    if ";" in host:  # connect with a source interface: judge the destination
        host = host.split(";", 1)[1]
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposed_endpoints(endpoints: Iterable[str]) -> list[str]:
    return [e for e in endpoints if e and not is_loopback(e)]


class ClientKeys:
    """The ZAP credentials provider: admits listed keys, counts and logs the rest."""

    def __init__(self, keys: set[bytes], on_refused: Callable[[], None] | None = None) -> None:
        self.keys = keys
        self.on_refused = on_refused

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        log.warning("refused a CURVE client with an unknown public key %s", key.decode("ascii", "replace"))
        if self.on_refused:
            self.on_refused()
        return False


class Curve:
    """The service's key pair and authenticator; applies CURVE to each socket."""

    def __init__(self, context: zmq.Context, secret_key_file: Path, client_keys: set[bytes],
                 on_refused: Callable[[], None] | None = None) -> None:
        if not zmq.has("curve"):
            raise UserError("[security] curve = true but this libzmq was built without CURVE")
        self.public, self.secret = load_keypair(secret_key_file)
        self.provider = ClientKeys(client_keys, on_refused)
        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger("streamer.zap"))
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="*", credentials_provider=self.provider)

    def server(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def client(self, socket: zmq.Socket, server_key: bytes) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = server_key

    def update_clients(self, keys: set[bytes]) -> None:
        self.provider.keys = keys

    def stop(self) -> None:
        self.authenticator.stop()


def attach(socket: zmq.Socket, endpoint: str, mode: str) -> str:
    """Bind or connect; returns the endpoint actually in use (a bound ephemeral port resolved)."""
    if mode == "bind":
        socket.bind(endpoint)
        return socket.getsockopt_string(zmq.LAST_ENDPOINT)
    socket.connect(endpoint)
    return endpoint


def configure_socket(socket: zmq.Socket, curve: Curve | None, mode: str, server_key: Any) -> None:
    """Make ``socket`` a CURVE server (bind) or client (connect) when CURVE is on."""
    if curve is None:
        return
    if mode == "bind":
        curve.server(socket)
    else:
        if not server_key:
            raise UserError("a socket in connect mode with CURVE needs server_key: the peer's public key")
        curve.client(socket, server_key)

"""`streamer.toml`: the service's configuration, parsed into frozen dataclasses.

Every section and key is optional (defaults below, and in
``deploy/streamer.toml`` with a comment each); unknown keys are refused so a
typo does not silently fall back to a default. Errors name the file, the
section and the key. Keys of earlier versions that no longer do anything
(:data:`RETIRED`) are accepted with a warning, so an upgrade does not stop a
working configuration.
"""

from __future__ import annotations

import logging
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowsort.errors import UserError

if TYPE_CHECKING:
    from streamer.codec import Limits

BIND, CONNECT = "bind", "connect"
DROP_OLDEST, REFUSE = "drop_oldest", "refuse"
# Keys that earlier versions read and this one ignores, per section: why.
RETIRED = {"batching": {"emit_queue_messages": "decisions are sent the moment they are made, with no queue"}}

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class IngestConfig:
    endpoint: str = "tcp://127.0.0.1:5555"
    mode: str = BIND
    server_key: str = ""  # connect mode with CURVE: the instrument's public key (z85 or a .key file)
    hwm: int = 1000  # ZMQ_RCVHWM, messages
    max_message_bytes: int = 64 << 20
    hard_limit_factor: int = 4  # ZMQ_MAXMSGSIZE = factor * max_message_bytes: above it ZeroMQ drops the connection
    max_cells_per_message: int = 4096
    max_image_side: int = 1024

    def limits(self) -> Limits:
        """The per-message limits the service enforces (and the FCS export, so it refuses what the service did)."""
        from streamer.codec import Limits

        return Limits(max_cells=self.max_cells_per_message, max_side=self.max_image_side,
                      max_message_bytes=self.max_message_bytes)


@dataclass(frozen=True)
class OutputConfig:
    """One decision socket (`push` to the sorter controller, `pub` to monitors); an empty endpoint disables it."""

    endpoint: str = ""
    mode: str = BIND
    server_key: str = ""
    hwm: int = 10000  # ZMQ_SNDHWM, messages; a full queue drops (counted), never blocks


@dataclass(frozen=True)
class BatchingConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    max_delay_us: float = 500.0
    adaptive_delay: bool = True  # skip max_delay on an engine where bigger batches cost as much per cell
    queue_cells: int = 8192
    overload: str = DROP_OLDEST

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


CAPTURE, RECEIPT = "capture", "receipt"


@dataclass(frozen=True)
class DeadlineConfig:
    budget_us: float = 10000.0  # for messages without deadline_ns, counted from budget_from; 0 = none
    budget_from: str = CAPTURE  # "capture" (the cell's capture_ns: clocks in sync) or "receipt" (clocks that are not)
    margin_us: float = 0.0  # time reserved for sending: late if it leaves later than deadline - margin


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "auto"
    precision: str = "auto"
    threads: int = 0  # the engine's CPU threads in all; 0 = chosen for this machine (engines.cpu)
    streams: int = 0  # OpenVINO: batches computed at once, one thread each by default; 0 = chosen for this machine
    warmup_runs: int = 3
    max_consecutive_failures: int = 3
    cache_dir: str = ""  # root of the compiled-model cache; "" = $FLOWSORT_CACHE_DIR, else the user's cache folder


@dataclass(frozen=True)
class GateConfig:
    name: str
    classes: tuple[str, ...]
    # Purity first, as sorters run by default: with calibrated probabilities (and sample_prior where the sample's
    # class mix differs from the training data's) every sorted cell is at least this likely to belong to the gate.
    min_probability: float = 0.9
    exclude_dead: bool = True
    stream: int = 1


@dataclass(frozen=True)
class PolicyConfig:
    dead_threshold: float | None = None  # None: the bundle's calibrated threshold
    sample_prior: tuple[tuple[str, float], ...] = ()  # class -> expected frequency in the sample; () = training mix


@dataclass(frozen=True)
class HealthConfig:
    host: str = "127.0.0.1"
    port: int = 9108  # 0 = any free port (see --ready-file)


@dataclass(frozen=True)
class SecurityConfig:
    curve: bool = False
    secret_key_file: str = ""  # this server's key pair (`flowsort keys`): the .key_secret file
    allowed_clients: tuple[str, ...] = ()  # client public keys: z85 strings or .key files
    allowed_clients_dir: str = ""  # or a folder of client .key files


@dataclass(frozen=True)
class LoggingConfig:
    reject_interval_s: float = 1.0  # at most one log line per reason per interval


@dataclass(frozen=True)
class ServiceConfig:
    worker: str = ""  # name in every outgoing message; default host:pid
    drain_timeout_s: float = 10.0
    record: str = ""  # acquisition file appended with every received message (also --record)
    results: str = ""  # FCS 3.1 results written live; {acquisition} gives one file per acquisition (also --results)
    expected_rate: float = 0.0  # cells/s the instrument will send; 0: not set. Checked against the engine at start


@dataclass(frozen=True)
class StreamerConfig:
    ingest: IngestConfig = IngestConfig()
    push: OutputConfig = OutputConfig(endpoint="tcp://127.0.0.1:5556")
    pub: OutputConfig = OutputConfig(endpoint="tcp://127.0.0.1:5557")
    batching: BatchingConfig = BatchingConfig()
    deadline: DeadlineConfig = DeadlineConfig()
    engine: EngineConfig = EngineConfig()
    policy: PolicyConfig = PolicyConfig()
    gates: tuple[GateConfig, ...] = ()
    health: HealthConfig = HealthConfig()
    security: SecurityConfig = SecurityConfig()
    logging: LoggingConfig = LoggingConfig()
    service: ServiceConfig = ServiceConfig()
    source: str = "<defaults>"
    base_dir: Path = field(default=Path("."), compare=False)

    @property
    def worker(self) -> str:
        return self.service.worker or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def engine_cache_dir(self) -> Path | None:
        """The engine cache root the config names (None: the default, see engines.cache)."""
        return self.path(self.engine.cache_dir) if self.engine.cache_dir else None

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


SECTIONS = {
    "ingest": IngestConfig, "push": OutputConfig, "pub": OutputConfig, "batching": BatchingConfig,
    "deadline": DeadlineConfig, "engine": EngineConfig, "policy": PolicyConfig, "health": HealthConfig,
    "security": SecurityConfig, "logging": LoggingConfig, "service": ServiceConfig,
}


def load_config(path: str | Path | None) -> StreamerConfig:
    """The configuration in ``path`` (TOML), or the defaults when ``path`` is None."""
    if path is None:
        return parse_config({}, "<defaults>", Path("."))
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, str(path), path.resolve().parent)


def _coerce(source: str, where: str, name: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the field's default."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {where} {name} must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if type(value) is not int:
            raise bad("an integer")
        return value
    if isinstance(default, float) or (default is None and name == "dead_threshold"):
        if type(value) not in (int, float):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if name == "sample_prior":
        if not isinstance(value, dict) or not all(type(v) in (int, float) for v in value.values()):
            raise bad("a table of class = frequency")
        return tuple((key, float(v)) for key, v in value.items())
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise bad("an array")
        return tuple(value)
    return value


def _section(source: str, name: str, defaults: Any, data: Any) -> Any:
    where = f"[{name}]"
    cls = type(defaults)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a table")
    retired = sorted(set(data) & set(RETIRED.get(name, {})))
    for key in retired:
        log.warning("%s: %s %s is no longer used (%s): remove it", source, where, key, RETIRED[name][key])
    data = {key: value for key, value in data.items() if key not in retired}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: {where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    values = {key: _coerce(source, where, key, value, getattr(defaults, key)) for key, value in data.items()}
    return replace(defaults, **values)


def _gate(source: str, index: int, data: Any) -> GateConfig:
    where = f"[[gates]] #{index + 1}"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a table")
    known = {f.name for f in fields(GateConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: {where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for key in ("name", "classes"):
        if key not in data:
            raise ConfigError(f"{source}: {where} needs {key}")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: {where} name must be a non-empty string, got {name!r}")
    where = f"[[gates]] {name!r}"
    classes = data["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{source}: {where} classes must be a non-empty array of class names, got {classes!r}")
    gate = GateConfig(name=name, classes=tuple(classes))
    for key in ("min_probability", "exclude_dead", "stream"):
        if key in data:
            gate = replace(gate, **{key: _coerce(source, where, key, data[key], getattr(gate, key))})
    if not 0.0 <= gate.min_probability <= 1.0:
        raise ConfigError(f"{source}: {where} min_probability must be between 0 and 1, got {gate.min_probability}")
    if gate.stream < 1:
        raise ConfigError(f"{source}: {where} stream must be a sorter stream number >= 1 (0 means no-sort), got {gate.stream}")
    return gate


def parse_config(data: dict[str, Any], source: str = "<config>", base_dir: Path = Path(".")) -> StreamerConfig:
    """Check a parsed TOML document and build the configuration."""
    unknown = sorted(set(data) - set(SECTIONS) - {"gates"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)} (known: {', '.join([*SECTIONS, 'gates'])})")
    defaults = StreamerConfig()
    sections = {name: _section(source, name, getattr(defaults, name), data[name]) if name in data
                else getattr(defaults, name) for name in SECTIONS}
    raw_gates = data.get("gates", [])
    if not isinstance(raw_gates, list):
        raise ConfigError(f"{source}: gates must be an array of tables ([[gates]])")
    gates = tuple(_gate(source, i, g) for i, g in enumerate(raw_gates))
    names = [g.name for g in gates]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: gate names must be unique, got {names}")
    config = StreamerConfig(**sections, gates=gates, source=source, base_dir=base_dir)
    validate(config)
    return config


def validate(config: StreamerConfig) -> None:
    s = config.source

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{s}: {message}")

    for name in ("ingest", "push", "pub"):
        section = getattr(config, name)
        need(section.mode in (BIND, CONNECT), f"[{name}] mode must be \"bind\" or \"connect\", got {section.mode!r}")
        need(section.hwm >= 1, f"[{name}] hwm must be at least 1, got {section.hwm}")
        if section.endpoint:
            need("://" in section.endpoint, f"[{name}] endpoint must look like tcp://HOST:PORT or ipc://PATH, got {section.endpoint!r}")
    need(bool(config.ingest.endpoint), "[ingest] endpoint must be set")
    ingest = config.ingest
    need(ingest.max_message_bytes >= 1024, f"[ingest] max_message_bytes must be at least 1024, got {ingest.max_message_bytes}")
    need(ingest.hard_limit_factor >= 1, f"[ingest] hard_limit_factor must be at least 1, got {ingest.hard_limit_factor}")
    need(ingest.max_cells_per_message >= 1, f"[ingest] max_cells_per_message must be at least 1, got {ingest.max_cells_per_message}")
    need(ingest.max_image_side >= 1, f"[ingest] max_image_side must be at least 1, got {ingest.max_image_side}")

    batching = config.batching
    sizes = batching.batch_sizes
    need(bool(sizes) and all(type(v) is int and v >= 1 for v in sizes),
         f"[batching] batch_sizes must be positive integers, got {list(sizes)}")
    need(len(set(sizes)) == len(sizes), f"[batching] batch_sizes repeats a size: {list(sizes)}")
    need(1 in sizes, f"[batching] batch_sizes must include 1 (a lone cell must not wait for company), got {list(sizes)}")
    need(max(sizes) <= 4096, f"[batching] batch_sizes must not exceed 4096, got {max(sizes)}")
    need(batching.max_delay_us >= 0, f"[batching] max_delay_us must be >= 0, got {batching.max_delay_us}")
    need(batching.overload in (DROP_OLDEST, REFUSE),
         f"[batching] overload must be \"{DROP_OLDEST}\" or \"{REFUSE}\", got {batching.overload!r}")
    need(batching.queue_cells >= ingest.max_cells_per_message,
         f"[batching] queue_cells ({batching.queue_cells}) must be at least [ingest] max_cells_per_message "
         f"({ingest.max_cells_per_message}), or one message could never fit")

    need(config.deadline.budget_us >= 0, f"[deadline] budget_us must be >= 0 (0 = none), got {config.deadline.budget_us}")
    need(config.deadline.budget_from in (CAPTURE, RECEIPT),
         f"[deadline] budget_from must be \"{CAPTURE}\" or \"{RECEIPT}\", got {config.deadline.budget_from!r}")
    need(config.deadline.margin_us >= 0, f"[deadline] margin_us must be >= 0, got {config.deadline.margin_us}")
    engine = config.engine
    need(engine.threads >= 0, f"[engine] threads must be >= 0 (0 = chosen for this machine), got {engine.threads}")
    need(engine.streams >= 0, f"[engine] streams must be >= 0 (0 = chosen for this machine), got {engine.streams}")
    need(engine.warmup_runs >= 1, f"[engine] warmup_runs must be at least 1, got {engine.warmup_runs}")
    need(engine.max_consecutive_failures >= 1,
         f"[engine] max_consecutive_failures must be at least 1, got {engine.max_consecutive_failures}")
    need(0 <= config.health.port <= 65535, f"[health] port must be 0..65535, got {config.health.port}")
    need(config.logging.reject_interval_s >= 0, f"[logging] reject_interval_s must be >= 0, got {config.logging.reject_interval_s}")
    need(config.service.drain_timeout_s > 0, f"[service] drain_timeout_s must be positive, got {config.service.drain_timeout_s}")
    need(config.service.expected_rate >= 0,
         f"[service] expected_rate must be >= 0 cells/s (0: not set), got {config.service.expected_rate}")
    if config.security.curve:
        need(bool(config.security.secret_key_file),
             "[security] curve = true needs secret_key_file (make a key pair with `flowsort keys NAME`)")
        need(bool(config.security.allowed_clients or config.security.allowed_clients_dir),
             "[security] curve = true needs allowed_clients or allowed_clients_dir (the client public keys)")

"""`flowsort serve BUNDLE [--config streamer.toml]`: the real-time sorting service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamer.service import Service

log = logging.getLogger("streamer.serve")
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="classify cells streamed over ZeroMQ and send sort decisions within their deadline",
        description="Receive cells on a PULL socket (wire protocol v1, docs/protocol.md), classify them in "
        "deadline-aware micro-batches and send columnar decisions on a PUSH socket (sorter controller) and a PUB "
        "socket (monitors). /metrics, /healthz and /readyz on the health port. SIGINT/SIGTERM drain and exit; "
        "SIGHUP reloads the config and the bundle without dropping a cell.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle from `flowsort train`")
    parser.add_argument("--config", type=Path, default=None, help="streamer.toml (default: built-in defaults)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow non-loopback endpoints without CURVE encryption")
    parser.add_argument("--record", type=Path, default=None, metavar="FILE",
                        help="append every received message to this acquisition file")
    parser.add_argument("--results", default=None, metavar="PATH",
                        help="FCS 3.1 results; `{acquisition}` in PATH gives one file per acquisition")
    parser.add_argument("--ready-file", type=Path, default=None, metavar="FILE",
                        help="write the bound endpoints and health URL here (JSON) once ready")
    parser.add_argument("--worker", default=None, help="worker name in outgoing messages (default host:pid)")
    parser.set_defaults(run=run)


def take_signal(service: Service, timeout: float) -> None:
    """Wait up to ``timeout`` for SIGINT/SIGTERM (stop) or SIGHUP (reload), blocked and taken synchronously."""
    received = signal.sigtimedwait(SIGNALS, timeout)
    # A tracer attaching (py-spy, gdb) wakes the wait with no signal: si_signo 0.
    if received is None or received.si_signo not in SIGNALS:
        return
    act(service, received.si_signo)


def act(service: Service, signo: int) -> None:
    if signo == signal.SIGHUP:
        log.info("SIGHUP: reloading the config and the bundle")
        service.request_reload()
    else:
        log.info("%s: draining and stopping", signal.Signals(signo).name)
        service.request_stop()


def run(args: argparse.Namespace) -> int:
    from streamer.config import load_config
    from streamer.service import Service

    config = load_config(args.config)
    if args.worker:
        config = replace(config, service=replace(config.service, worker=args.worker))
    service = Service(args.bundle, config, config_path=args.config, insecure=args.insecure, record=args.record,
                      ready_file=args.ready_file, results=args.results)
    # Signals are taken synchronously: blocked here, before the service starts a thread (every thread started
    # from now on inherits the mask), and picked up by sigtimedwait in the main loop. Besides being simple,
    # this survives libraries that leave a thread with a dangling alternate signal stack (OpenVINO's CPU
    # plugin registers one on the thread that creates it and frees it when the plugin goes away: a reload
    # would otherwise turn the next SIGTERM into a SIGSEGV). A SIGTERM during start-up waits its turn.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    # Threads that imports started before this point (numpy's BLAS pool) do not block them, and the kernel may
    # hand them a signal while the main thread is between two waits: without a handler that would end the
    # process unannounced, queued cells and all. They get a handler (run on such a thread, never on one that
    # OpenVINO gave an alternate stack), which asks for the same as the synchronous wait.
    handlers = {signo: signal.signal(signo, lambda signo, _frame: act(service, signo)) for signo in SIGNALS}

    # The GIL is handed over sooner: the engine's completion callback waits less for the busy service loop.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        service.start()
        return service.run_forever(lambda timeout: take_signal(service, timeout))
    finally:
        service.stop()
        sys.setswitchinterval(interval)
        while signal.sigtimedwait(SIGNALS, 0) is not None:  # consume what arrived during the stop
            pass
        for signo, handler in handlers.items():
            signal.signal(signo, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

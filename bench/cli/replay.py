"""`flowsort replay FILE`: send an acquisition file to a streamer and score what comes back."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.link_arguments import add_link_arguments, link_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="send an acquisition file (flowsort record, serve --record, import --to-acquisition) to a streamer",
        description="Send the messages of an acquisition file to a streamer: with their recorded timing (default; "
        "--speed scales it), at a fixed --rate in messages/s (--poisson for Poisson gaps), or as fast as possible "
        "(--max); --loop repeats it. Cells get fresh capture times and deadlines (shifted with their send time, or "
        "--transit-ms after capture) and, after the first loop, fresh event ids; --verbatim sends every byte as "
        "recorded. Decisions are collected and scored like `flowsort simulate`, with purity and yield where the file "
        "holds ground truth. A torn last record (a recording cut by a crash) is skipped.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="acquisition file")
    add_link_arguments(parser)
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, default=None, help="messages/s, evenly spaced (or --poisson)")
    timing.add_argument("--max", action="store_true", help="as fast as possible")
    timing.add_argument("--speed", type=float, default=None, help="recorded timing, this many times faster")
    parser.add_argument("--poisson", action="store_true", help="with --rate: Poisson gaps instead of even ones")
    parser.add_argument("--loop", type=int, default=1, metavar="N", help="send the file N times (default 1)")
    parser.add_argument("--verbatim", action="store_true",
                        help="send every message byte for byte as recorded (old capture times and deadlines)")
    parser.add_argument("--transit-ms", type=float, default=None,
                        help="give every cell a deadline this long after capture (default: as recorded)")
    parser.add_argument("--no-decisions", action="store_true",
                        help="only send (to a recorder, or a streamer whose decisions go elsewhere)")
    parser.add_argument("--no-dashboard", action="store_true", help="no live dashboard")
    parser.add_argument("--seed", type=int, default=0, help="seed of --poisson")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/replay"),
                        help="folder for replay.json and replay.html (default runs/bench/replay)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.link import open_link
    from bench.replay import load_plan, send_only
    from bench.simulator import live_run, print_summary, write_outputs
    from flowsort.errors import UserError

    if args.loop < 1:
        raise UserError("--loop must be at least 1")
    if args.rate is not None and args.rate <= 0 or args.speed is not None and args.speed <= 0:
        raise UserError("--rate and --speed must be positive")
    if args.poisson and args.rate is None:
        raise UserError("--poisson goes with --rate")
    timing = "max" if args.max else "rate" if args.rate else "recorded"
    plan = load_plan(str(args.file), timing=timing, rate=args.rate, speed=args.speed or 1.0, poisson=args.poisson,
                     loops=args.loop, verbatim=args.verbatim, transit_ms=args.transit_ms, seed=args.seed)
    print(f"replaying {plan.messages:,} messages ({plan.cells:,} cells) over {plan.duration_s:.1f} s "
          f"({timing}{f' {args.rate:g}/s' if args.rate else ''}{', verbatim' if args.verbatim else ''})", flush=True)
    settings = {"file": str(args.file), **plan.description, "transit_ms": args.transit_ms}
    if args.no_decisions:
        import zmq

        from bench.link import _connect_endpoint
        from streamer.config import load_config

        endpoint = args.ingest or _connect_endpoint(load_config(args.config).ingest.endpoint)
        context = zmq.Context()
        try:
            record = send_only(context, endpoint, plan)
        finally:
            context.destroy(linger=0)
        pacing = record.pacing
        print(f"sent {record.messages_sent:,} messages ({record.cells_sent:,} cells) at {pacing.achieved_rate:,.1f} "
              f"messages/s (scheduled {pacing.scheduled_rate:,.1f}, {100 * pacing.rate_error:+.2f}%), "
              f"lag p99 {pacing.lag_p99_us:.0f} µs; sender CPU {record.sender_cpu_s:.2f} s")
        import json
        import time

        from bench.run_summary import describe_machine
        from bench.simulator import _json_default

        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "replay.json"
        path.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": describe_machine(), "settings": settings,
            "summary": {"messages_sent": record.messages_sent, "cells_sent": record.cells_sent,
                        "pacing": pacing.as_dict(), "sender_cpu_s": record.sender_cpu_s,
                        "send_s": float(record.sent_at[-1]) if len(record.sent_at) else 0.0},
        }, indent=2, default=_json_default) + "\n")
        print(f"written {path}")
        return 0
    with open_link(link_options(args), args.out) as link:
        if link.model is None and link.gates:
            print("note: without --bundle (or --serve) the model's classes are unknown: no purity or yield")
        title = f"flowsort replay {args.file.name}"
        _, summary = live_run(link, plan, title=title, dashboard=not args.no_dashboard,
                              target_rate=plan.cells / plan.duration_s if plan.duration_s else None)
    print_summary(summary, args.transit_ms)
    settings.update({"bundle": str(args.serve or args.bundle or ""), "gates": [g.__dict__ for g in link.gates],
                     "engine": summary.get("engine")})
    json_path, html_path = write_outputs(args.out, "replay", f"flowsort replay {args.file.name}", summary, settings,
                                         args.transit_ms)
    print(f"written {json_path} and {html_path}")
    return 0

"""`flowsort export-fcs ACQUISITION BUNDLE -o run.fcs`: a recorded acquisition's results as an FCS 3.1 file."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

ENGINE_CHOICES = ("auto", "tensorrt", "cuda", "openvino", "torch")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-fcs",
        help="classify a recorded acquisition and write the results as an FCS 3.1 file for FlowJo or FlowKit",
        description="Run every cell of an acquisition file (`flowsort serve --record`) through BUNDLE and the "
        "config's sort gates, and write one FCS event per cell with EVENT_ID, TIME, CLASS, PROBABILITY, P_<class>, "
        "DEAD_SCORE, DEAD, GATE, LATE (always 0 offline) and EMB_1..EMB_k. Codes are named in the file's "
        "FLOWSORT_CLASS_<i> and FLOWSORT_GATE_<j> keywords (GATE 0 = no-sort).",
    )
    parser.add_argument("recording", type=Path, metavar="ACQUISITION", help="acquisition file from --record")
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle from `flowsort train`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="FCS file to write (e.g. run.fcs)")
    parser.add_argument("--config", type=Path, default=None,
                        help="streamer.toml: gates, dead threshold, engine and ingest limits (default: built-in)")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default=None, help="engine (default: the config's)")
    parser.add_argument("--precision", default=None, help="engine precision (default: the config's)")
    parser.add_argument("--acquisition", default=None, metavar="NAME",
                        help="the acquisition to export when the file holds several")
    parser.add_argument("--embedding", type=int, default=8, metavar="K",
                        help="embedding components written as EMB_1..EMB_K (default 8, 0 for none)")
    parser.add_argument("--datatype", choices=("F", "D"), default="F",
                        help="F: float32 (default; event ids exact up to 16,777,216); D: float64 (exact to 2^53)")
    parser.add_argument("--batch", type=int, default=256, help="cells per engine call (default 256)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import engines
    from engines.bundle import load_bundle
    from streamer.config import load_config
    from streamer.export import export_fcs
    from streamer.policy import policy_for

    config = load_config(args.config)
    if args.engine or args.precision:
        config = replace(config, engine=replace(config.engine, engine=args.engine or config.engine.engine,
                                                precision=args.precision or config.engine.precision))
    bundle = load_bundle(args.bundle)
    policy = policy_for(bundle, config)
    with engines.load(bundle, engine=config.engine.engine, precision=config.engine.precision, max_batch=args.batch,
                      threads=config.engine.threads or None, cache_dir=config.engine_cache_dir) as engine:
        summary = export_fcs(args.recording, bundle, engine, policy, args.output, limits=config.ingest.limits(),
                             acquisition=args.acquisition, embedding=args.embedding, datatype=args.datatype)
        print(f"wrote {summary.path}: {summary.events} cells of acquisition {summary.acquisition!r} "
              f"({engine.name} {engine.precision})")
    if summary.unclassified:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary.unclassified.items()))
        print(f"{sum(summary.unclassified.values())} cells could not be classified and are not in the file ({reasons})")
    return 0

"""`flowsort keys NAME`: a CurveZMQ key pair for the service or one of its clients."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="make a CurveZMQ key pair (for `flowsort serve` or an instrument / sorter client)",
        description="Write NAME.key (public: give it to the peers) and NAME.key_secret (keep it private, mode 600). "
        "The service's config names its own .key_secret in [security] secret_key_file and lists the public keys "
        "of the clients it admits in allowed_clients.",
    )
    parser.add_argument("name", help="key pair name, e.g. flowsort-server or instrument-1")
    parser.add_argument("-d", "--dir", type=Path, default=Path("."), help="folder to write the keys into (default .)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from streamer.security import load_keypair, make_keypair

    public_file, secret_file = make_keypair(args.dir, args.name)
    public, _ = load_keypair(secret_file)
    print(f"public key  {public_file}  ({public.decode()})")
    print(f"secret key  {secret_file}  (keep it private)")
    return 0

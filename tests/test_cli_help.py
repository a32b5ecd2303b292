"""`flowsort --help` for every command: each option shows its default, and building the parsers stays light."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

from flowsort.cli import build_parser
from flowsort.help_format import has_default


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def test_every_option_with_a_default_shows_it() -> None:
    parsers = list(all_parsers(build_parser()))
    assert {"flowsort train", "flowsort bench e2e", "flowsort import synthetic", "flowsort serve"} <= {
        parser.prog for parser in parsers}
    missing = []
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if has_default(action) and action.help is not argparse.SUPPRESS:
                if "default" not in formatter._expand_help(action).lower():
                    missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options whose help does not show the default:\n" + "\n".join(missing)


def test_train_help_shows_epochs_batch_size_and_patience() -> None:
    (train,) = [parser for parser in all_parsers(build_parser()) if parser.prog == "flowsort train"]
    text = " ".join(train.format_help().split())
    for option, default in (("--epochs EPOCHS", 40), ("--batch-size BATCH_SIZE", 128), ("--patience PATIENCE", 10)):
        assert re.search(re.escape(option) + r" [^-]*\(default: " + str(default) + r"\)", text), option


def test_building_the_parsers_imports_no_heavy_library() -> None:
    code = ("import sys; from flowsort.cli import build_parser; build_parser(); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'openvino', 'matplotlib', 'sklearn', "
            "'scipy', 'zmq', 'tqdm'}); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Help that shows every option's default, for all `flowsort` commands."""

from __future__ import annotations

import argparse


def has_default(action: argparse.Action) -> bool:
    """Whether an option has a value to show: not one that is off unless given (None, False, an empty list)."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    if isinstance(default, (list, tuple)) and not default:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not has_default(action):
            return text
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-command parser under it the defaults-showing help."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if action.help is None and has_default(action):
            action.help = "(default: %(default)s)"  # argparse shows nothing for an option without help
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)

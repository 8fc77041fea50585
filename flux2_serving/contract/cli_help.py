"""The help layout every command-line tool of the project uses (standard library only)."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks (examples), and shows each option's default
    where its help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def prog(module: str) -> str:
    """How the user typed the command: the console script's name (pyproject.toml's [project.scripts], all
    flux2-*) when run as one, else `python -m <module>`."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return typed if typed.startswith("flux2-") else f"python -m {module}"


def command_parser(module: str, doc: str, epilog_extra: str = "") -> argparse.ArgumentParser:
    """The parser of `python -m <module>`: the first paragraph of its docstring `doc` describes it, the
    rest (and `epilog_extra`) follows the options, line breaks kept."""
    description, _, epilog = doc.partition("\n\n")
    epilog = "\n".join(part for part in (epilog.rstrip(), epilog_extra.rstrip()) if part)
    return argparse.ArgumentParser(prog=prog(module), description=description, epilog=epilog or None,
                                   formatter_class=HelpFormatter)

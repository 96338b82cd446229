"""The `--help` layout every command line shares: descriptions and epilogs as written, and each
option's default at the end of its line (`ArgumentDefaultsHelpFormatter`'s "(default: X)",
also for options without help text; left out where the default is None, False or empty ("",
[]): a derived default, which the help text states, or a switch)."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`formatter_class=HelpFormatter` for argparse parsers and sub-parsers."""

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = (
            action.option_strings
            and action.help is not argparse.SUPPRESS
            and default is not argparse.SUPPRESS
            and default is not None
            and default is not False  # a switch (0 is a default to show: `is`, not `in`)
            and not (isinstance(default, str | list | tuple) and not default)
            and "%(default)" not in (action.help or "")
        )
        if shown:
            action = copy.copy(action)
            action.help = (
                f"{action.help} (default: %(default)s)"
                if action.help
                else ("(default: %(default)s)")
            )
        return super()._format_action(action)

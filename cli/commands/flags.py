"""Flags as the command line names them."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def first_given(args: argparse.Namespace, names: Iterable[str]) -> str | None:
    """The command-line name (`--max-num-seqs`) of the first of `names` (argparse destinations)
    that was given, or None: what a one-line refusal names."""
    for name in names:
        if getattr(args, name, None) is not None:
            return "--" + name.replace("_", "-")
    return None

"""Leaving a worker process once its work is done, without the interpreter's teardown."""

from __future__ import annotations

import os
import sys


def leave(code: int) -> None:
    """Exit without the interpreter's teardown once the work is over (every file written and
    closed, the process group destroyed): now and then a C++ thread left running aborted a rank
    in the static destructors ("terminate called without an active exception", SIGABRT), and
    torchrun (or the spawning parent) failed a finished run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

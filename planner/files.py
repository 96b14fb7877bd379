"""Writing output files whole or not at all: write a temporary file beside the target, then
rename it over the target (atomic on POSIX), so a failure never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from costmodel.errors import ConfigError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_output_dir(path: str | Path) -> Path:
    """The output folder `path`, created with its parents; one line where it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write into {path}: {exc.strerror or exc}; give -o a folder you can write") from None
    return path

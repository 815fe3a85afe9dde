"""Crash-safe checkpoint files: write-then-rename saves and loads that fail clearly."""
from __future__ import annotations

import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s directory, fsync, then rename it
    over ``path``: a crash at any moment leaves the previous file or the new one, never a torn
    file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)``, with a ValueError naming the file when it is
    missing, truncated or not a checkpoint."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any failure to unpickle untrusted bytes
        raise ValueError(f"checkpoint {os.fspath(path)!r} is truncated or not a torch checkpoint "
                         f"({type(error).__name__}); use an earlier checkpoint") from None

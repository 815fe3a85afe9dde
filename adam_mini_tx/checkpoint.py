"""Crash-safe checkpoint files: write-then-rename saves and loads that fail clearly."""
from __future__ import annotations

import os
import tempfile
import zipfile
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
    missing, truncated, corrupt or not a checkpoint. ``torch.load`` does not check the CRC-32 that
    the zip format stores for every record, so a flipped byte in a tensor would load silently;
    this checks them first (one extra read of the file)."""
    _check_crcs(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any failure to unpickle untrusted bytes
        raise ValueError(f"checkpoint {os.fspath(path)!r} is truncated or not a torch checkpoint "
                         f"({type(error).__name__}); use an earlier checkpoint") from None


def _check_crcs(path: str | os.PathLike) -> None:
    """Raise a ValueError if a record of the zip archive ``torch.save`` wrote is damaged (wrong
    CRC-32, or headers that disagree). Files that are not zip archives are left to
    ``torch.load`` (legacy format, or truncated before the zip directory)."""
    if not os.path.isfile(path):
        return  # load() reports it
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy format, or cut before the zip directory: torch.load decides
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # noqa: BLE001 - a zip directory that cannot be read is damage
        damaged = f"({type(error).__name__}: {error})"
    if damaged is not None:
        raise ValueError(f"checkpoint {os.fspath(path)!r} is corrupt: record {damaged} does not "
                         f"match its CRC-32 or header (a flipped or torn byte); use an earlier "
                         f"checkpoint")

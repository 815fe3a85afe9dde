"""Crash-safe checkpoint files: write-then-rename saves and loads that fail clearly.

Files are torch's zip format (``torch.save``'s default), whose records carry CRC-32 checksums that
:func:`load` verifies. :func:`load` refuses torch's legacy (non-zip) format: it has no checksums,
so a damaged byte would load as a wrong number.
"""
from __future__ import annotations

import os
import pickle
import re
import secrets
import zipfile
from typing import Any, BinaryIO, Callable

import torch

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy format: pickle protocol 2, then the magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s directory, fsync, then rename it
    over ``path``: a crash at any moment leaves the previous file or the new one, never a torn
    file. The file gets the mode ``open()`` would give (0644 under umask 022)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
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
    """``torch.save(obj)`` (zip format) to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def load(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """``torch.load(path, weights_only=weights_only, map_location="cpu")`` after checking the
    file: a ValueError names the file and the cause when it is missing, truncated, corrupt (a
    record that fails its CRC-32, which ``torch.load`` does not check), in the legacy non-zip
    format (no checksums to verify), or holds objects that ``weights_only`` loading refuses.
    ``weights_only=False`` unpickles arbitrary objects: use it only for files you trust."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            head = handle.read(len(_LEGACY_MAGIC))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {name!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"checkpoint {name!r} cannot be read ({error.strerror})") from None
    _check_format(name, head)
    try:
        return torch.load(name, weights_only=weights_only, map_location="cpu")
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if weights_only and refused:
            raise ValueError(
                f"checkpoint {name!r} is intact but holds {refused.group(1)}, which "
                f"weights_only loading refuses; if you trust the file, load(path, "
                f"weights_only=False), or allow the type with "
                f"torch.serialization.add_safe_globals([{refused.group(1)}])") from None
        raise ValueError(f"checkpoint {name!r} cannot be unpickled ({_cause(error)})") from None
    except Exception as error:  # noqa: BLE001 - any failure to read untrusted bytes
        raise ValueError(f"checkpoint {name!r} is truncated or not a torch checkpoint "
                         f"({_cause(error)}); use an earlier checkpoint") from None


def _check_format(name: str, head: bytes) -> None:
    """Raise a ValueError unless ``name`` is a complete zip archive whose records all match
    their CRC-32 and headers."""
    if head.startswith(_LEGACY_MAGIC):
        raise ValueError(
            f"checkpoint {name!r} is in torch's legacy (non-zip) format, which stores no "
            f"checksums, so damage cannot be detected; convert a copy you trust once with "
            f"torch.save(torch.load(path, weights_only=True), path)")
    if not head.startswith(_ZIP_MAGIC):
        raise ValueError(f"checkpoint {name!r} is truncated or not a torch checkpoint (it does "
                         f"not start with a zip header); use an earlier checkpoint")
    if not zipfile.is_zipfile(name):
        raise ValueError(f"checkpoint {name!r} is truncated or not a torch checkpoint (its zip "
                         f"directory is missing); use an earlier checkpoint")
    try:
        with zipfile.ZipFile(name) as archive:
            damaged = archive.testzip()
    except Exception as error:  # noqa: BLE001 - a zip directory that cannot be read is damage
        damaged = f"({_cause(error)})"
    if damaged is not None:
        raise ValueError(f"checkpoint {name!r} is corrupt: record {damaged} does not match its "
                         f"CRC-32 or header (a flipped or torn byte); use an earlier checkpoint")


def _cause(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__

"""Atomic file and directory writes (temp + ``os.replace``), safetensors/JSON only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for directories) less the umask: the mode ``open``/``mkdir`` give.

    ``tempfile`` makes its files 0600 and directories 0700 whatever the umask; the files written
    here are the user's results, so they get the modes of any file the user creates.
    """
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode(0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to a temp file in the same directory, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from None


def read_tensors(path: str | os.PathLike, what: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises SafetensorError (not exported)
        raise ValueError(f"{what}: {path} is not a valid safetensors file ({exc})") from None


def check_inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved, refusing anything (e.g. a symlink) that points outside ``root``."""
    root_r = root.resolve()
    resolved = path.resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise ValueError(f"{what}: {path} resolves to {resolved}, outside the directory {root_r}")
    return resolved


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``target``; on success it replaces ``target``.

    On error the temp directory is removed and ``target`` is untouched. An
    existing ``target`` is first renamed aside, then the new directory renamed
    into place, then the old one deleted: at every instant a complete
    directory exists (at ``target``, or, in the instant between the renames,
    at the aside name ``.<name>.old-*``).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        file_mode, dir_mode = _umask_mode(0o666), _umask_mode(0o777)
        for f in tmp.rglob("*"):  # whatever wrote them (safetensors writes 0600)
            if f.is_symlink():
                continue
            if f.is_file():
                os.chmod(f, file_mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                os.chmod(f, dir_mode)
        _fsync_dir(tmp)
        if target.exists():
            aside = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

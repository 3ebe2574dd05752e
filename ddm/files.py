"""File helpers every layer uses: one atomic write (temp file beside the target, fsync, rename, fsync of the
folder), hard-link-else-copy, and file hashes. The lowest layer of ``ddm``: it imports nothing of the project.

Every file the project writes goes through :func:`atomic_path` / :func:`atomic_write`, so a crash mid-write never
replaces a good file with a torn one.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["link_or_copy", "fsync_dir", "atomic_path", "atomic_write", "write_parquet_atomic", "atomic_save_torch",
           "file_sha256"]


def link_or_copy(src: str | Path, dst: str | Path, link: bool = True) -> Path:
    """Put ``src`` at ``dst`` as a hard link (same bytes, no space) when ``link`` and the file system allow,
    else as a copy; an existing ``dst`` is replaced. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return dst
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(src, dst)
    return dst


def fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block succeeds it is fsynced, given the usual
    permissions and moved into place (``os.replace``), else removed and ``path`` left untouched.

    The context-manager form of :func:`atomic_write`, for writers that stream into the file over many
    calls (shard tars, videos).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp" then the target's own suffix: writers that pick the format from the name (cv2, PIL) still can.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions (team-readable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``writer(tmp_path)``, then move it into place atomically.

    ``writer`` writes the whole file at the temporary path it is given (same folder, so the final
    ``os.replace`` is a rename on one file system). If ``writer`` raises, the temporary file is
    removed and an existing file at ``path`` is left untouched.
    """
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_parquet_atomic(table: Any, path: str | Path) -> Path:
    """Write the pyarrow ``table`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    import pyarrow.parquet as pq  # here, not at the top: model code imports this module and needs no pyarrow

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def atomic_save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch  # here, not at the top: data-side writers import this module and need no torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (manifest and centroid hashes in export metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- whole folders: assembled beside the target, swapped in when complete ---------------------------------------
def staging_dir(out: Path) -> Path:
    """Where a new folder is assembled before :func:`swap_into_place`: ``.<name>.partial`` beside ``out`` (the
    same file system, so the swap is a rename)."""
    return out.with_name(f".{out.name}.partial")


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree at ``path``; nothing there is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def swap_into_place(staged: Path, out: Path) -> None:
    """Move the complete ``staged`` folder to ``out``; an existing ``out`` is set aside first
    (``.<name>.old``) and removed only once the new folder is in place. If the second rename fails the
    old folder is put back, so at every moment one complete folder exists under ``out`` or ``.<name>.old``."""
    old = out.with_name(f".{out.name}.old")
    remove_path(old)
    had_old = out.exists() or out.is_symlink()
    if had_old:
        os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        if had_old:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if had_old:
        remove_path(old)

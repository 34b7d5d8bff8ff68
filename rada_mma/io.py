"""The one way the package writes files: atomic, durable, with the mode a plain ``open`` gives.

Every file rada_mma writes (adapters, feature caches, checkpoints, results,
splits, plots) goes through :func:`atomic_write`: the bytes go to a temporary
file in the target's folder, which is flushed and fsynced, given the mode
``0o666 & ~umask`` (``0644`` under the usual umask 022; ``mkstemp`` alone would
leave ``0600``), renamed over the target, and the folder is fsynced so that the
rename survives a power cut. A reader sees the old file or the new one, never
a torn one. A temporary left by a killed process is removed by the next write
into its folder.

Lock files too (:class:`exclusive_lock`): one run per folder at a time.

Safetensors files are serialised here too (:func:`safetensors_bytes`), with
tensors and metadata in sorted order, so that the same tensors and metadata
give the same bytes (safetensors' own writer orders the metadata by a hash).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: lock files are created exclusively instead
    fcntl = None

__all__ = [
    "HOST_TAG",
    "LockHeld",
    "atomic_write",
    "default_mode",
    "exclusive_lock",
    "fsync_folder",
    "make_staging_folder",
    "replace_folder",
    "safetensors_bytes",
    "save_safetensors",
    "save_torch",
    "write_json",
    "write_text",
]

# Temporaries are named ".<target name>.<host tag>-<pid>.<random>.tmp": the host and pid say whose it is
HOST_TAG = format(zlib.crc32(socket.gethostname().encode()), "08x")
_TEMPORARY = re.compile(r"^\..+\.([0-9a-f]{8})-(\d+)\.[A-Za-z0-9_]+\.tmp$")

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    return 0o666 & ~_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries (files, and staging folders of :func:`replace_folder`) that a process on this host
    left when it was killed mid-write."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        if match and match.group(1) == HOST_TAG and not _pid_alive(int(match.group(2))):
            stale = Path(folder, name)
            try:
                if stale.is_dir() and not stale.is_symlink():  # a staging folder (make_staging_folder)
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)
            except OSError:  # gone already (another writer cleaned it), or not ours to remove: never fail the write
                pass


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
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


def atomic_write(
    path: str | os.PathLike,
    data: bytes | Callable[[IO[bytes]], Any],
    *,
    overwrite: bool = True,
    sync: bool = True,
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    Args:
        path: the file to write; its folder must exist.
        data: the content, or ``write(fh)`` that writes it.
        overwrite: replace an existing file; ``False`` raises ``FileExistsError`` instead,
            also when another process creates the file while this one writes.
        sync: fsync the file and its folder. Only for the many files of a folder
            that :func:`replace_folder` puts in place, which syncs them all at once.

    Returns:
        ``path``.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist; create it first")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    _remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.chmod(tmp, default_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_folder(folder)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists, without a window in which both could win."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path") from None
    except OSError as err:  # a file system without hard links: check, then rename
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, value: Any, *, overwrite: bool = True) -> Path:
    """Write ``value`` as indented JSON with a final newline, atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n", overwrite=overwrite)


def save_torch(path: str | os.PathLike, value: Any) -> Path:
    """``torch.save(value)`` atomically (for checkpoints: tensors and plain containers only)."""
    return atomic_write(path, lambda fh: torch.save(value, fh))


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, tensors and metadata in sorted order: equal inputs, equal bytes.

    Tensors are stored as they are (dtype, shape), from contiguous CPU copies.
    """
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors files do not hold")
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a safetensors file atomically and deterministically (see :func:`safetensors_bytes`)."""
    return atomic_write(path, safetensors_bytes(tensors, metadata), overwrite=overwrite)


# -- folders -------------------------------------------------------------------------------------


def make_staging_folder(folder: str | os.PathLike) -> Path:
    """An empty folder beside ``folder`` to build its new content in, for :func:`replace_folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the finished folder is meant to be shared
    return staging


def _sync_file_system(path: Path) -> None:
    """Flush every written file of ``path``'s file system to disk (Linux ``syncfs``; elsewhere ``sync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); ``False`` where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Put the finished ``staging`` folder in place of ``folder``; at every instant one of them is there.

    Write the staging folder's files with :func:`atomic_write` (``sync=False``
    is enough: the staging folder's file system is synced here, once, before
    the swap). Where the system can swap two paths atomically (Linux), it does;
    elsewhere the old folder is renamed aside first, and a crash between the
    two renames leaves it beside the target, never deleted.
    """
    staging, folder = Path(staging), Path(folder)
    _sync_file_system(staging)
    if not folder.exists():
        os.replace(staging, folder)
    elif _exchange(staging, folder):
        shutil.rmtree(staging)  # the old content, now at the staging path
    else:
        aside = folder.with_name(f".{folder.name}.{HOST_TAG}-{os.getpid()}.old")
        os.replace(folder, aside)
        os.replace(staging, folder)
        shutil.rmtree(aside)
    fsync_folder(folder.parent)
    return folder


# -- locks ---------------------------------------------------------------------------------------


class LockHeld(BlockingIOError):
    """Another live process holds the lock; ``holder`` is its record (pid, host, started, command)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(errno.EWOULDBLOCK, f"{path} is held by process {holder.get('pid', '?')}")
        self.path, self.holder = path, holder


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 1 << 16).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _take(path: Path) -> int:
    """Open and lock ``path`` (exclusive, non-blocking): its descriptor, or :class:`LockHeld`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # a releasing holder unlinks the file: a lock on its old inode guards nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _take_without_flock(path: Path) -> int:
    """Where ``flock`` is missing (Windows): create the file exclusively; a dead holder's file is taken over."""
    for _ in range(2):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, default_mode())
        except FileExistsError:
            fd = os.open(path, os.O_RDONLY)
            holder = _read_holder(fd)
            os.close(fd)
            if holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0) or 0)):
                raise LockHeld(path, holder) from None
            Path(path).unlink(missing_ok=True)  # its process is gone
    raise LockHeld(path, {})


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` as an exclusive lock file for a ``with`` block; :class:`LockHeld` if another process does.

    The file records the holder (pid, host, start time, command), which the error reports. The lock is
    the kernel's (``flock``), so it ends with its process however that ends: the file a killed process
    leaves behind blocks nothing. Leaving the block, by any exit, releases the lock and removes the file.

    Example:
        >>> with exclusive_lock(run_folder / ".lock"):
        ...     train()
    """
    path = Path(path)
    fd = _take(path) if fcntl is not None else _take_without_flock(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_record()).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still held: nobody can take the file before it is gone
        os.close(fd)

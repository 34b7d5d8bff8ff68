"""The one writer (``rada_mma.io``): atomic, durable, the usual file mode, deterministic safetensors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_save

import rada_mma
from rada_mma import io


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_files_get_the_mode_open_would_give(tmp_path, umask_022):
    io.write_text(tmp_path / "a.txt", "hello")
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.save_torch(tmp_path / "a.pt", {"w": torch.ones(2)})
    io.save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    assert {p.name: oct(mode(p)) for p in tmp_path.iterdir()} == {
        name: oct(0o644) for name in ("a.txt", "a.json", "a.pt", "a.safetensors")
    }
    os.umask(0o077)
    assert mode(io.write_text(tmp_path / "private.txt", "x")) == 0o600  # the caller's umask rules


def test_overwrite_false_refuses_and_leaves_the_file(tmp_path):
    path = io.write_text(tmp_path / "keep.txt", "mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        io.write_text(path, "theirs", overwrite=False)
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["keep.txt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = io.write_text(tmp_path / "f.txt", "old")

    def half_then_fail(fh):
        fh.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        io.write_text(tmp_path / "no" / "f.txt", "x")


def test_safetensors_bytes_are_deterministic_and_readable(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 4),
        "a.half": torch.randn(5).to(torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    metadata = {"z": "last", "a": "first", "config": '{"x": 1}', "unicode": "λ = 0.2"}
    blob = io.safetensors_bytes(tensors, metadata)
    shuffled = io.safetensors_bytes(dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert blob == shuffled  # key order never changes the bytes
    loaded = load_safetensors_bytes(blob)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    path = io.save_safetensors(tmp_path / "t.safetensors", tensors, metadata)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == metadata
    # safetensors' own writer orders metadata by a hash: same content, possibly other bytes; ours agree on tensors
    theirs = load_safetensors_bytes(safetensors_save(tensors, metadata))
    assert all(torch.equal(theirs[k], loaded[k]) for k in tensors)


def test_saved_adapters_are_byte_identical_across_saves(tmp_path):
    module = rada_mma.RationalMask(dim=16, heads=4, generator=torch.Generator().manual_seed(0))
    first = rada_mma.save_adapter(module, tmp_path / "a.safetensors", metadata={"b": "2", "a": "1"})
    second = rada_mma.save_adapter(module, tmp_path / "b.safetensors", metadata={"a": "1", "b": "2"})
    assert first.read_bytes() == second.read_bytes()


def test_replace_folder_swaps_in_the_new_content(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    staging = io.make_staging_folder(folder)
    io.atomic_write(staging / "new.txt", b"new", sync=False)
    io.replace_folder(staging, folder)
    assert sorted(os.listdir(folder)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["task"]
    staging = io.make_staging_folder(tmp_path / "fresh")
    io.write_text(staging / "x.txt", "x")
    io.replace_folder(staging, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "x.txt").read_text() == "x"


def test_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = io.HOST_TAG
    stale = tmp_path / f".adapter.safetensors.{host}-{pid}.abc123xy.tmp"
    stale.write_bytes(b"\0" * 100)
    alive = tmp_path / f".other.json.{host}-{os.getpid()}.zz99yy11.tmp"  # this process: still writing it
    alive.write_bytes(b"\0")
    foreign = tmp_path / ".notes.tmp"  # not ours: never touched
    foreign.write_bytes(b"\0")
    io.write_text(tmp_path / "next.txt", "x")
    assert not stale.exists() and alive.exists() and foreign.exists()


def test_staging_folders_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    """A killed ``replace_folder`` user (e.g. demo.write_task) once made every later write into the folder fail."""
    pid = dead_pid()
    staging = tmp_path / f".task.{io.HOST_TAG}-{pid}.abcd1234.tmp"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "0.png").write_bytes(b"\0" * 10)
    io.write_text(tmp_path / "next.txt", "x")
    assert sorted(os.listdir(tmp_path)) == ["next.txt"]


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_writes_are_durable(tmp_path, monkeypatch):
    """The file's bytes, then the folder's entry, reach the disk before a write returns."""
    synced = []
    fsync = os.fsync

    def record(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    io.save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    assert synced == ["file", "folder"]
    synced.clear()
    staging = io.make_staging_folder(tmp_path / "task")
    io.atomic_write(staging / "x.txt", b"x", sync=False)  # synced all at once by replace_folder (syncfs)
    io.replace_folder(staging, tmp_path / "task")
    assert synced == ["folder"]  # the parent's entry of the swapped-in folder


WRITER = textwrap.dedent(
    """
    import sys
    from rada_mma import io
    path, size = sys.argv[1], int(sys.argv[2])
    i = 0
    print("ready", flush=True)
    while True:
        io.atomic_write(path, bytes([i % 2]) * size)  # all zeros, then all ones, then zeros...
        i += 1
    """
)


def test_a_process_killed_mid_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "big.bin"
    size = 8 << 20
    io.atomic_write(path, bytes([0]) * size)
    for delay in (0.07, 0.23, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        content = path.read_bytes()
        assert len(content) == size and content in (bytes([0]) * size, bytes([1]) * size), "a torn file"
    io.write_text(tmp_path / "after.txt", "x")  # the next write clears the killed writers' temporaries
    assert sorted(os.listdir(tmp_path)) == ["after.txt", "big.bin"]


def test_an_exclusive_lock_names_its_holder_and_goes_with_it(tmp_path):
    lock = tmp_path / ".lock"
    with io.exclusive_lock(lock):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(io.LockHeld) as held, io.exclusive_lock(lock):
            pass
        assert held.value.holder == holder and isinstance(held.value, BlockingIOError)
    assert not lock.exists()
    with pytest.raises(RuntimeError), io.exclusive_lock(lock):  # any exit releases it
        raise RuntimeError
    with io.exclusive_lock(lock):
        pass

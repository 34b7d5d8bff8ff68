"""Start a test file as ``torchrun`` would: one process per rank, with the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), for gloo on the CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(script: str, *args: Path, world: int = 2, timeout: float = 240) -> None:
    """Run ``python script *args`` once per rank and wait; one failing stops the others (it would wait for its
    peer until a timeout). The last argument is a folder: the ranks' logs go to ``rank<r>.log`` there."""
    out = Path(args[-1])
    root = str(Path(__file__).resolve().parents[2])  # the worker imports tests.helpers like the tests do
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "PYTHONPATH": path}
    logs = [out / f"rank{r}.log" for r in range(world)]
    workers = [
        subprocess.Popen([sys.executable, script, *map(str, args)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=logs[r].open("w"), stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(w.poll() is None for w in workers) and all(w.poll() in (None, 0) for w in workers):
            assert time.monotonic() < deadline, f"the workers did not finish in {timeout} s"
            time.sleep(0.05)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for rank, w in enumerate(workers):
        assert w.returncode == 0, f"rank {rank} failed:\n{logs[rank].read_text()[-4000:]}"

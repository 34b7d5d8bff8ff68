"""Test-session settings. Shared helpers live in the ``tests.helpers`` package, imported as modules."""

from __future__ import annotations

import os

import pytest
import torch

GOLDEN = "RADA_MMA_GOLDEN"

# Test tensors are tiny: one thread is faster than two, and does not collapse
# (OpenMP spin-waiting) when other work keeps the machine's cores busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever the one before it set (the CLI's --threads, examples)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say why the parity tests were skipped, without -rs."""
    if not os.environ.get(GOLDEN):
        terminalreporter.write_line(
            f"golden parity tests skipped: set {GOLDEN}=/path/to/golden (the folder of the authors' golden "
            "*.safetensors files) to run them",
            yellow=True,
        )

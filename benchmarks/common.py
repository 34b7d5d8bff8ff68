"""What every benchmark script shares: the machine it ran on, and writing its results.

Scripts put the repository root on ``sys.path`` (they run as ``python benchmarks/<name>.py``)
and import this as ``benchmarks.common``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> str:
    """The CPU model and count, e.g. ``"AMD EPYC 7B13, 2 CPUs"``."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def load_average() -> float | None:
    """The 1-minute load average (how busy other work kept the machine), where the system tells it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The facts a result depends on besides its own parameters."""
    device = torch.device(device)
    return {
        "machine": machine(),
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_results(path: Path, records: Any, markdown: str) -> None:
    """``records`` as JSON at ``path`` and the markdown report beside it (same stem, ``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown)

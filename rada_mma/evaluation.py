"""Base-to-new results: rows, harmonic mean, ``results.json`` and a markdown table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PUBLISHED", "harmonic_mean", "markdown_table", "read_results", "summarize", "write_results"]

# Published base-to-new averages over the 11 datasets (ViT-B/16, 16 shots), as
# stated in METHODS.md: (base, new, hm). Per-dataset numbers are not included.
PUBLISHED: dict[str, tuple[float, float, float]] = {
    "zero-shot": (69.34, 74.22, 71.70),
    "rada": (82.16, 74.14, 77.94),
    "rada+adapter": (84.32, 76.25, 80.08),
}
ROW_KEYS = ("dataset", "method", "seed", "base", "new", "hm")


def harmonic_mean(base: float, new: float) -> float:
    """``2·b·n / (b + n)``, the base-to-new summary (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average ``base``/``new``/``hm`` over seeds per (dataset, method), and over datasets per method."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["method"])].append(row)
    out = []
    for (dataset, method), group in groups.items():
        mean = {k: sum(r[k] for r in group) / len(group) for k in ("base", "new")}
        out.append({"dataset": dataset, "method": method, "seeds": len(group), **mean, "hm": harmonic_mean(**mean)})
    datasets = sorted({r["dataset"] for r in out})
    if len(datasets) > 1:
        for method in dict.fromkeys(r["method"] for r in out):
            per = [r for r in out if r["method"] == method]
            if len(per) == len(datasets):
                mean = {k: sum(r[k] for r in per) / len(per) for k in ("base", "new")}
                hm = sum(r["hm"] for r in per) / len(per)  # the papers average per-dataset HMs
                out.append({"dataset": "average", "method": method, "seeds": per[0]["seeds"], **mean, "hm": hm})
    return out


def markdown_table(rows: Sequence[dict[str, Any]], *, published: bool = True) -> str:
    """Seed-averaged results as a markdown table, with the papers' averages beside them."""
    summary = summarize(rows)
    head = "| dataset | method | seeds | base | new | HM |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['seeds']} | {r['base']:.2f} | {r['new']:.2f} | {r['hm']:.2f} |"
        )
    if published:
        methods = [m for m in dict.fromkeys(r["method"] for r in summary) if m in PUBLISHED]
        if methods:
            lines += ["", "Published averages over the 11 datasets (ViT-B/16, 16 shots), for orientation:", ""]
            lines += ["| method | base | new | HM |", "|---|---:|---:|---:|"]
            for m in methods:
                b, n, h = PUBLISHED[m]
                lines.append(f"| {m} | {b:.2f} | {n:.2f} | {h:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` (the rows) and ``results.md`` (the table) into ``out_dir``."""
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row {row} lacks {missing}")
        for k in ("base", "new", "hm"):
            if not (isinstance(row[k], (int, float)) and math.isfinite(row[k])):
                raise ValueError(f"result row field {k!r} must be a finite number (percent), got {row[k]!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "results.json", json.dumps(list(rows), indent=2) + "\n")
    _atomic_write_text(out / "results.md", markdown_table(rows))
    return out / "results.json"


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows from a ``results.json`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}; run `rada-mma fit` or `bench` with --out first")
    return json.loads(path.read_text())

"""Base-to-new results: rows, harmonic mean, ``results.json`` and a markdown table."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..io import write_json, write_text

__all__ = ["PUBLISHED", "harmonic_mean", "markdown_table", "read_results", "summarize", "write_results"]

# Published base-to-new averages over the 11 datasets (ViT-B/16, 16 shots), as
# stated in docs/methods.md: (base, new, hm). Per-dataset numbers are not included,
# nor MMA's (the MMA paper reports no 11-dataset base-to-new average in this form).
PUBLISHED: dict[str, tuple[float, float, float]] = {
    "zero-shot": (69.34, 74.22, 71.70),
    "rada": (82.16, 74.14, 77.94),
    "rada+adapter": (84.32, 76.25, 80.08),
}
ROW_KEYS = ("dataset", "method", "seed", "base", "new", "hm")
CAPTION = (
    "Accuracy in percent, mean over seeds. base: test images of the base classes (trained on), scored among "
    "the base classes only; new: the unseen classes among themselves; HM: harmonic mean of base and new."
)
CAPTION_ALL = " all: every test image scored among all classes at once (base and new compete)."
CAPTION_RUNS = " runs: each seed's run record (run.json: everything the run resolved), in its run folder."
RUN_RECORD = "run.json"


def harmonic_mean(base: float, new: float) -> float:
    """``2·b·n / (b + n)``, the base-to-new summary (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _mean(group: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the rows, or ``None`` unless every row has it."""
    if not group or any(key not in r for r in group):
        return None
    return sum(r[key] for r in group) / len(group)


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed-averaged rows per (dataset, method), then per-method averages over the datasets.

    ``base`` and ``new`` (and ``all`` where every row has it) are averaged and
    ``hm`` is the harmonic mean of the averages, as the papers compute both
    their per-dataset rows and their 11-dataset average (e.g. CLIP's 69.34 /
    74.22 gives 71.70). The ``"average"`` rows appear when a method has results
    on every dataset (and more than one dataset).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["method"])].append(row)

    def averaged(dataset: str, method: str, group: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
        out = {"dataset": dataset, "method": method, "seeds": seeds, "base": _mean(group, "base"), "new": _mean(group, "new")}
        out["hm"] = harmonic_mean(out["base"], out["new"])
        if (everything := _mean(group, "all")) is not None:
            out["all"] = everything
        if group and all("run" in r and "seed" in r for r in group):
            out["runs"] = [(r["seed"], r["run"]) for r in group]  # the run folders the row averages
        return out

    out = [averaged(d, m, group, len(group)) for (d, m), group in groups.items()]
    datasets = sorted({r["dataset"] for r in out})
    if len(datasets) > 1:
        for method in dict.fromkeys(r["method"] for r in out):
            per = [r for r in out if r["method"] == method]
            if len(per) == len(datasets):
                out.append(averaged("average", method, per, min(r["seeds"] for r in per)))
    return out


def _benchmark_datasets(rows: Iterable[dict[str, Any]]) -> list[str]:
    from .datasets import find_dataset

    return sorted({r["dataset"] for r in rows if find_dataset(r["dataset"]) is not None})


def markdown_table(rows: Sequence[dict[str, Any]], *, published: bool = True, runs: bool = True) -> str:
    """Seed-averaged results (:func:`summarize`) as a markdown table.

    Args:
        rows: result rows (``dataset``, ``method``, ``seed``, ``base``, ``new``, ``hm``, optionally ``all``).
        published: where a dataset is one of the 11 few-shot benchmarks, add the
            papers' published averages for the methods present (ViT-B/16, 16 shots;
            :data:`PUBLISHED` holds the 11-dataset averages only).
        runs: where rows name their run folder (``run``, as :func:`~rada_mma.fewshot.run_grid`
            gives them), a column linking each seed's ``run.json``.

    Example:
        >>> print(markdown_table([{"dataset": "toy", "method": "rada", "seed": 1, "base": 90, "new": 80, "hm": 84.7}]))
        | dataset | method | seeds | base | new | HM |
        |---|---|---:|---:|---:|---:|
        | toy | rada | 1 | 90.00 | 80.00 | 84.71 |
        <BLANKLINE>
        Accuracy in percent, mean over seeds. base: ...
    """
    summary = summarize(rows)
    with_all = bool(summary) and all("all" in r for r in summary)
    with_runs = runs and any("runs" in r for r in summary)
    lines = [
        "| dataset | method | seeds | base | new | HM |" + (" all |" if with_all else "") + (" runs |" if with_runs else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|" if with_all else "") + ("---|" if with_runs else ""),
    ]
    for r in summary:
        cells = [r["dataset"], r["method"], str(r["seeds"])] + [f"{r[k]:.2f}" for k in ("base", "new", "hm")]
        if with_all:
            cells.append(f"{r['all']:.2f}")
        if with_runs:
            cells.append(" ".join(f"[seed {seed}]({run}/{RUN_RECORD})" for seed, run in r.get("runs", ())))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", CAPTION + (CAPTION_ALL if with_all else "") + (CAPTION_RUNS if with_runs else "")]
    benchmarks = _benchmark_datasets(rows) if published else []
    methods = [m for m in dict.fromkeys(r["method"] for r in summary) if m in PUBLISHED]
    if benchmarks and methods:
        lines += [
            "",
            f"Published averages over the 11 datasets (ViT-B/16, 16 shots), beside ours on {', '.join(benchmarks)}:",
            "",
            "| method | base | new | HM |",
            "|---|---:|---:|---:|",
        ]
        for m in methods:
            b, n, h = PUBLISHED[m]
            lines.append(f"| {m} | {b:.2f} | {n:.2f} | {h:.2f} |")
    return "\n".join(lines) + "\n"


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a result row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where}: result row {row} lacks {missing}")
    for k in ("base", "new", "hm", "all"):
        if k in row and not (
            isinstance(row[k], (int, float)) and not isinstance(row[k], bool) and math.isfinite(row[k])
        ):
            raise ValueError(f"{where}: result row field {k!r} must be a finite number (percent), got {row[k]!r}")


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` (the rows) and ``results.md`` (the table) into ``out_dir``, each atomically.

    Every row needs ``dataset``, ``method``, ``seed``, ``base``, ``new`` and
    ``hm``; the accuracies (and ``all``, when present) are finite percentages.
    """
    for index, row in enumerate(rows):
        _check_row(row, f"row {index}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", list(rows))
    write_text(out / "results.md", markdown_table(rows))
    return out / "results.json"


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows from a ``results.json`` (or the folder holding one), checked as :func:`write_results` checks them."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}; run `rada-mma fit` or `bench` with --out first")
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run the command again to rewrite it") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of result rows, got a {type(rows).__name__}")
    for index, row in enumerate(rows):
        _check_row(row, f"{path}, row {index}")
    return rows

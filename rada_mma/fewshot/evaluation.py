"""Results: rows, harmonic mean, ``results.json`` and markdown tables in each setting's published layout.

A row's ``setting`` says which protocol made it (a row without one is
base-to-new, as rows of earlier versions are):

- ``base2new``: ``base``, ``new``, ``hm`` (and ``all``), CoOp's base-to-new table;
- ``all``: ``accuracy`` by ``shots``, a per-shot table (CoOp's few-shot curves as numbers);
- ``transfer`` / ``dg``: ``accuracy`` per target ``dataset`` of an adapter trained on ``source``, the
  papers' cross-dataset and domain-generalisation layout (one column per target, their average);
- ``tta``: ``accuracy`` with and without test-time training, RAda's table 3 layout.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..io import write_json, write_text

__all__ = [
    "PUBLISHED",
    "PUBLISHED_TTA",
    "SETTINGS",
    "accuracy_summary",
    "harmonic_mean",
    "markdown_table",
    "read_results",
    "row_label",
    "setting_of",
    "summarize",
    "write_results",
]

# Published base-to-new averages over the 11 datasets (ViT-B/16, 16 shots), as
# stated in docs/methods.md: (base, new, hm). Per-dataset numbers are not included,
# nor MMA's (the MMA paper reports no 11-dataset base-to-new average in this form).
PUBLISHED: dict[str, tuple[float, float, float]] = {
    "zero-shot": (69.34, 74.22, 71.70),
    "rada": (82.16, 74.14, 77.94),
    "rada+adapter": (84.32, 76.25, 80.08),
}
# RAda's table 3 (ViT-B/16): the OOD average over ImageNet-V2, -Sketch, -A and -R of zero-shot CLIP, TPT, and
# RAda trained at test time from the zero-shot start (few-shot ✗) and after 16-shot training on ImageNet (✓, RAda†).
PUBLISHED_TTA: dict[str, float] = {
    "zero-shot CLIP": 57.20,
    "TPT": 60.81,
    "RAda + TTA, from zero-shot (few-shot ✗)": 63.50,
    "RAda† + TTA (few-shot ✓)": 64.26,
}
ROW_KEYS = ("dataset", "method", "seed", "base", "new", "hm")
SETTINGS = ("base2new", "all", "transfer", "dg", "tta")
REQUIRED: dict[str, tuple[str, ...]] = {  # the fields each setting's rows carry, besides ``setting``
    "base2new": ROW_KEYS,
    "all": ("dataset", "method", "seed", "shots", "accuracy"),
    "transfer": ("dataset", "source", "method", "seed", "accuracy"),
    "dg": ("dataset", "source", "method", "seed", "accuracy"),
    "tta": ("dataset", "method", "seed", "accuracy", "tta", "start"),
}
NUMBERS = ("base", "new", "hm", "all", "accuracy")
CAPTION = (
    "Accuracy in percent, mean over seeds. base: test images of the base classes (trained on), scored among "
    "the base classes only; new: the unseen classes among themselves; HM: harmonic mean of base and new."
)
CAPTION_ALL = " all: every test image scored among all classes at once (base and new compete)."
CAPTION_RUNS = " runs: each seed's run record (run.json: everything the run resolved), in its run folder."
RUN_RECORD = "run.json"


def setting_of(row: dict[str, Any]) -> str:
    """The protocol that made ``row``: its ``setting``, ``"base2new"`` when it has none."""
    return row.get("setting", "base2new")


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


def accuracy_summary(rows: Iterable[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Per distinct value of the fields ``by``: the mean ``accuracy`` over its rows (the seeds), their sample
    standard deviation ``std`` (0 for one row), ``seeds`` (how many rows) and ``spread`` (min, max).

    Example:
        >>> accuracy_summary([{"method": "rada", "accuracy": 70.0}, {"method": "rada", "accuracy": 74.0}], ["method"])
        [{'method': 'rada', 'accuracy': 72.0, 'std': 2.8284271247461903, 'seeds': 2, 'spread': (70.0, 74.0)}]
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(key) for key in by)].append(row["accuracy"])
    return [
        {**dict(zip(by, key, strict=True)), "accuracy": statistics.fmean(values),
         "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values),
         "spread": (min(values), max(values))}
        for key, values in groups.items()
    ]


def markdown_table(rows: Sequence[dict[str, Any]], *, published: bool = True, runs: bool = True) -> str:
    """Seed-averaged results as markdown tables, one per setting in ``rows`` (see the module's docstring).

    Base-to-new rows give the table below (:func:`summarize`); rows of the other settings give their
    papers' layouts (per-shot columns, one column per target, with and without test-time training).

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
    settings = list(dict.fromkeys(setting_of(r) for r in rows)) or ["base2new"]
    tables = {"base2new": lambda r, p: _base_to_new_table(r, p, runs), "all": _shots_table, "transfer": _transfer_table, "dg": _transfer_table,
              "tta": _tta_table}
    return "\n".join(tables[s]([r for r in rows if setting_of(r) == s], published) for s in settings)


def _base_to_new_table(rows: Sequence[dict[str, Any]], published: bool, runs: bool) -> str:
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


def _cell(entry: dict[str, Any] | None, *, spread: bool = False) -> str:
    if entry is None:
        return "—"
    return f"{entry['accuracy']:.2f}" + (f" ± {entry['std']:.2f}" if spread and entry["seeds"] > 1 else "")


def _seeds(rows: Sequence[dict[str, Any]]) -> str:
    return ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))


def _shots_table(rows: Sequence[dict[str, Any]], published: bool) -> str:
    """Few-shot on all classes: a row per (dataset, method), a column per shot count (0: zero-shot CLIP)."""
    shots = sorted({r["shots"] for r in rows})
    cells = {(e["dataset"], e["method"], e["shots"]): e for e in accuracy_summary(rows, ("dataset", "method", "shots"))}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| dataset | method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|---|" + "---:|" * len(shots)]
    for dataset in datasets:
        lines += [f"| {dataset} | {m} | " + " | ".join(_cell(cells.get((dataset, m, k)), spread=True) for k in shots)
                  + " |" for m in methods if any((dataset, m, k) in cells for k in shots)]
    if len(datasets) > 1:
        for m in methods:
            means = [[cells[(d, m, k)]["accuracy"] for d in datasets if (d, m, k) in cells] for k in shots]
            lines.append(f"| average | {m} | " + " | ".join(
                f"{statistics.fmean(v):.2f}" if len(v) == len(datasets) else "—" for v in means) + " |")
    lines += ["", f"Accuracy in percent on the test split, every class at once, by training images per class "
              f"(0-shot: zero-shot CLIP, no training); mean ± sample standard deviation over seeds {_seeds(rows)}."]
    return "\n".join(lines) + "\n"


def _transfer_table(rows: Sequence[dict[str, Any]], published: bool) -> str:
    """An adapter trained on a source, evaluated on every class of each target: a column per target."""
    dg = setting_of(rows[0]) == "dg"
    parts = []
    for source in dict.fromkeys(r["source"] for r in rows):
        of = [r for r in rows if r["source"] == source]
        targets = [d for d in dict.fromkeys(r["dataset"] for r in of) if d != source]
        columns = ([source] if any(r["dataset"] == source for r in of) else []) + targets
        cells = {(e["method"], e["dataset"]): e for e in accuracy_summary(of, ("method", "dataset"))}
        header = ["method", *[f"{c} (source)" if c == source else c for c in columns], "OOD average" if dg else "average"]
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for method in dict.fromkeys(r["method"] for r in of):
            values = [cells.get((method, t)) for t in targets]
            average = f"{statistics.fmean(v['accuracy'] for v in values):.2f}" if values and all(values) else "—"
            lines.append(f"| {method} | " + " | ".join(_cell(cells.get((method, c))) for c in columns) + f" | {average} |")
        what = "Domain generalisation" if dg else "Cross-dataset transfer"
        lines += ["", f"{what}: accuracy in percent, mean over seeds {_seeds(of)}, of adapters trained on every class "
                  f"of {source} and evaluated on every class of each target (its own class set); the average is over "
                  "the targets, not the source."]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def row_label(row: dict[str, Any]) -> str:
    """How a test-time-training row is named in tables and plots (RAda's table 3: † = after few-shot training)."""
    method = row["method"]
    if method == "zero-shot":
        return "zero-shot CLIP"
    if not row["tta"]:
        return f"{method}† (few-shot on {row.get('source')}, no TTA)"
    if row["start"] == "few-shot":
        return f"{method}† + TTA"
    return f"{method} + TTA, from " + ("zero-shot" if row["start"] == "zero-shot" else "its initial weights")


def _tta_table(rows: Sequence[dict[str, Any]], published: bool) -> str:
    """With and without test-time training: a row per start, a column per target, the OOD average, s / image."""
    from .datasets import IMAGENET_VARIANTS

    targets = list(dict.fromkeys(r["dataset"] for r in rows))
    labelled = [{**r, "label": row_label(r)} for r in rows]
    cells = {(e["label"], e["dataset"]): e for e in accuracy_summary(labelled, ("label", "dataset"))}
    header = ["method", "few-shot", "TTA", *targets, "OOD average", "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|---|:-:|:-:|" + "---:|" * (len(targets) + 2)]
    for label in dict.fromkeys(r["label"] for r in labelled):
        first = next(r for r in labelled if r["label"] == label)
        values = [cells.get((label, t)) for t in targets]
        average = f"{statistics.fmean(v['accuracy'] for v in values):.2f}" if all(values) else "—"
        times = [r["seconds_per_image"] for r in labelled if r["label"] == label and "seconds_per_image" in r]
        fewshot = "✓" if first["start"] == "few-shot" and first["method"] != "zero-shot" else "✗"
        lines.append(f"| {label} | {fewshot} | {'✓' if first['tta'] else '✗'} | "
                     + " | ".join(_cell(v) for v in values)
                     + f" | {average} | {f'{statistics.fmean(times):.4f}' if times else '—'} |")
    lines += ["", f"Accuracy in percent, mean over seeds {_seeds(rows)}, on every class of each target. TTA: per test "
              "image, the entropy of the mean prediction over its most confident augmented views is minimised for a "
              "few steps on the adapter's parameters, the original image is predicted, and the adapter is reset (TPT's "
              "protocol). s / image: adaptation time per image, the views' encoding excluded."]
    if published and any(t in IMAGENET_VARIANTS for t in targets):
        lines += ["", "Published OOD averages over ImageNet-V2, -Sketch, -A and -R (RAda's table 3, ViT-B/16):", "",
                  "| method | OOD average |", "|---|---:|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in PUBLISHED_TTA.items()]
    return "\n".join(lines) + "\n"


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a result row must be a JSON object, got {type(row).__name__}")
    setting = setting_of(row)
    if setting not in REQUIRED:
        raise ValueError(f"{where}: result row has setting {setting!r}; known settings: {', '.join(SETTINGS)}")
    missing = [k for k in REQUIRED[setting] if k not in row]
    if missing:
        raise ValueError(f"{where}: result row {row} lacks {missing}")
    for k in NUMBERS:
        if k in row and not (
            isinstance(row[k], (int, float)) and not isinstance(row[k], bool) and math.isfinite(row[k])
        ):
            raise ValueError(f"{where}: result row field {k!r} must be a finite number (percent), got {row[k]!r}")


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` (the rows) and ``results.md`` (the tables) into ``out_dir``, each atomically.

    A base-to-new row needs ``dataset``, ``method``, ``seed``, ``base``, ``new``
    and ``hm``; the other settings' rows the fields in :data:`REQUIRED`; the
    accuracies (``base``, ``new``, ``hm``, ``all``, ``accuracy``) are finite percentages.
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

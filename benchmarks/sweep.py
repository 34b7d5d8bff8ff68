"""A sweep against separate runs: ``rada-mma sweep`` over 12 configurations x 3 seeds on the demo world, and
the 36 ``rada-mma fit`` runs it replaces, on the same feature cache. Both must select the same configuration
and give the same test accuracy.

- ``fits``: one ``rada-mma fit`` process per (configuration, seed), in grid order, one after the other (and,
  with ``--fit-jobs 2``, two at a time: the stronger baseline on a 2-core CPU). The selection is then made as
  the sweep makes it, from each run's ``run.json`` (``val_acc``: the validation accuracy of the adapter it
  wrote): the best mean over the seeds, ties to the first in grid order; its test rows are its runs'
  ``results.json``.
- ``sweep``: one ``rada-mma sweep`` process with ``--workers 1`` and ``--workers 2``: every configuration on the
  features it loads once, then the selected configuration's three runs.

Both ways read one feature cache, filled before either is timed (the training images' five augmented views
per seed, the validation and test images, the class texts: ``--extract`` seconds, reported apart), so the
comparison is of what each way does beyond encoding. Every process runs with ``--threads 1``: on a CPU that
other jobs keep busy, two torch threads per process spin-wait and make a training step up to ~100x slower, and
the sweep trains each configuration on one thread anyway. Timed: each command's wall clock, from its start to
its exit (Python's start-up, imports, model and data loading included: what a user waits for), and its CPU
time (user + system, from ``getrusage`` of the finished children); the machine's 1-minute load average is
recorded before and after each way, as other work shares this machine.

The model is the shipped world CLIP (``--model world-clip``); the data the world's WorldShapes task as the demo
writes it (16 classes, 8 base; 16 shots). The grid is the issue's: lr 1e-4, 1e-3, 1e-2 x alpha 0, 0.1 x
temperature 0.5, 1, RAda's preset otherwise (5 epochs, per-epoch augmented views).

Usage, from the repository root::

    python benchmarks/sweep.py                    # benchmarks/results/sweep_cpu.{json,md}, sweep_world.{md,png}
    python benchmarks/sweep.py --quick --json /tmp/sweep.json      # seconds: 2 configurations, 1 seed, a tiny task
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the repository root, for benchmarks.common

from benchmarks.common import REPO, RESULTS, load_average, machine, write_results  # noqa: E402
from rada_mma.demo import with_world_clip, world, write_task  # noqa: E402
from rada_mma.fewshot import RunSpec, extract  # noqa: E402

GRID = {"lr": ["1e-4", "1e-3", "1e-2"], "alpha": ["0", "0.1"], "temperature": ["0.5", "1"]}
SEEDS = (1, 2, 3)
QUICK_GRID = {"lr": ["1e-3", "1e-2"]}
TARGET = 5.0  # the goal: the sweep at least 5x faster than the separate runs, on the 2-core CPU
OPTIONS = ("alpha", "temperature")  # adapter options; the other keys are training flags


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The configurations in grid order (the first key slowest), as the sweep orders them."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def as_flags(point: dict[str, str]) -> list[str]:
    out = []
    for key, value in point.items():
        out += ["--option", f"{key}={value}"] if key in OPTIONS else [f"--{key.replace('_', '-')}", value]
    return out


def timed(commands: list[list[str]], jobs: int) -> dict:
    """Run ``commands`` (``jobs`` at a time); wall clock and CPU time (user + system) of them all and of each."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    load_before, started = load_average(), time.perf_counter()
    running: list[tuple[subprocess.Popen, float]] = []
    each = []
    for command in commands + [None] * jobs:
        while running and (len(running) >= jobs or command is None):
            proc, began = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(proc.args)} failed:\n{err.decode()[-3000:]}")
            each.append(time.perf_counter() - began)
        if command is not None:
            running.append((subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                            time.perf_counter()))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before, "commands": len(commands),
            "jobs": jobs, "seconds_each": each, "load_before": load_before, "load_after": load_average()}


def select(val: list[list[float]]) -> int:
    """Best mean over seeds, ties to the first in grid order (what the sweep does)."""
    means = [sum(v) / len(v) for v in val]
    return max(range(len(means)), key=lambda i: (means[i], -i))


def method_rows(path: Path) -> list[dict]:
    return [r for r in json.loads(path.read_text()) if r["method"] != "zero-shot"]


def fits_way(args, base: list[str], grid: dict, folder: Path, jobs: int) -> dict:
    """Every (configuration, seed) as one ``rada-mma fit``; the selection from their run.json files."""
    commands, outs = [], []
    for index, point in enumerate(points(grid)):
        for seed in args.seeds:
            outs.append(folder / f"c{index}-seed{seed}")
            commands.append([*base, "fit", *args.common, "--seed", str(seed), *as_flags(point), "--out", str(outs[-1])])
    record = timed(commands, jobs)
    per = len(args.seeds)
    val = [[json.loads((out / "run.json").read_text())["val_acc"] for out in outs[i : i + per]]
           for i in range(0, len(outs), per)]
    selected = select(val)
    rows = [r for out in outs[selected * per : (selected + 1) * per] for r in method_rows(out / "results.json")]
    return {**record, "val_acc": val, "selected": selected, "test_rows": rows}


def sweep_way(args, base: list[str], grid: dict, folder: Path, workers: int) -> dict:
    command = [*base, "sweep", *args.common, "--seeds", *map(str, args.seeds), "--workers", str(workers),
               "--out", str(folder)]
    for key, values in grid.items():
        command += ["--grid", f"{key}={','.join(values)}"]
    record = timed([command], 1)
    sweep = json.loads((folder / "sweep.json").read_text())
    val = [[c["val_acc"][str(s)] for s in args.seeds] for c in sweep["configurations"]]
    return {**record, "workers": workers, "val_acc": val, "selected": sweep["selected"],
            "test_rows": method_rows(folder / "results.json")}


def fill_cache(data: Path, cache: Path, folder: Path, args) -> float:
    """Encode what both ways read (every seed's draw and views, validation, test, texts), untimed by either."""
    started = time.perf_counter()
    for seed in args.seeds:
        spec = with_world_clip(RunSpec(data=str(data), out=str(folder / f"extract-{seed}"), seed=seed, shots=args.shots,
                                       cache_dir=str(cache), device="cpu", progress=False, model="world-clip",
                                       train=args.train))
        extract(spec)
    return time.perf_counter() - started


def run(args) -> dict:
    grid = QUICK_GRID if args.quick else GRID
    base = [sys.executable, "-m", "rada_mma.cli"]
    with tempfile.TemporaryDirectory(prefix="rada_mma_sweep_bench_") as tmp:
        tmp = Path(tmp)
        task = world.TASKS["WorldShapes"]
        if args.quick:
            task = dataclasses.replace(task, counts=(4, 2, 2))
        data, cache = write_task(task, tmp / "data"), tmp / "cache"
        args.common = ["--model", "world-clip", "--data", str(data), "--method", "rada", "--cache-dir", str(cache),
                       "--threads", "1", "--shots", str(args.shots)]
        args.common += [f"--{k}={v}" for k, v in args.train.items()]
        extract_seconds = fill_cache(data, cache, tmp, args)
        ways = {"fits": fits_way(args, base, grid, tmp / "fits", 2 if args.quick else 1)}  # quick: both at once
        if args.fit_jobs > 1:
            ways[f"fits, {args.fit_jobs} at a time"] = fits_way(args, base, grid, tmp / "fits-jobs", args.fit_jobs)
        for workers in args.workers:
            ways[f"sweep --workers {workers}"] = sweep_way(args, base, grid, tmp / f"sweep-w{workers}", workers)
        last = tmp / f"sweep-w{args.workers[-1]}"
        shown = {"table": (last / "sweep.md").read_text(), "results": (last / "results.md").read_text(),
                 "best": json.loads((last / "best.json").read_text())}
        if args.world_out is not None:  # the README's table and plot
            args.world_out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(last / "sweep.png", args.world_out.with_suffix(".png"))
            args.world_out.with_suffix(".md").write_text(shown["table"] + "\n" + shown["results"])
    return compare(ways, grid, extract_seconds, shown, args)


def compare(ways: dict, grid: dict, extract_seconds: float, shown: dict, args) -> dict:
    fits = ways["fits"]
    for way in ways.values():
        way["speedup"] = fits["seconds"] / way["seconds"]
        way["speedup_cpu"] = fits["cpu_seconds"] / way["cpu_seconds"]
        way["same_val_acc"] = way["val_acc"] == fits["val_acc"]
        way["same_selection"] = way["selected"] == fits["selected"]
        way["same_test_rows"] = [(r["seed"], r["base"], r["new"], r["hm"]) for r in way["test_rows"]] == [
            (r["seed"], r["base"], r["new"], r["hm"]) for r in fits["test_rows"]]
    selected = points(grid)[fits["selected"]]
    return {
        "benchmark": "sweep", "machine": machine(), "torch": torch.__version__, "threads_per_process": 1,
        "quick": args.quick, "grid": grid, "seeds": list(args.seeds), "configurations": len(points(grid)),
        "trainings": len(points(grid)) * len(args.seeds), "extract_seconds": extract_seconds,
        "selected": selected, "target": TARGET, "ways": ways, "sweep_table": shown["table"],
        "sweep_results": shown["results"],
        "timed": "each command from start to exit (start-up, imports, model and data loading included); CPU time "
                 "is user + system of the finished processes; the feature cache was filled before either way",
    }


def markdown(result: dict) -> str:
    fits = result["ways"]["fits"]
    sel = ", ".join(f"{k}={v}" for k, v in result["selected"].items())
    lines = [
        f"# A sweep against separate runs: {result['configurations']} configurations x {len(result['seeds'])} seeds "
        "on the demo world",
        "",
        f"Machine: {result['machine']}, one torch thread per process, torch {result['torch']}. Other jobs shared the "
        "machine: each way's load average (1 min) is listed. Timed: " + result["timed"] + f" ({result['extract_seconds']:.1f} s).",
        "",
        "| way | processes | wall (s) | CPU (s) | per process, wall (s) | load before / after | speed-up, wall | "
        "speed-up, CPU | same validation accuracies | same selection | same test rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|",
    ]
    for name, way in result["ways"].items():
        each = way["seconds_each"]
        per = f"{min(each):.1f}–{max(each):.1f}" if len(each) > 1 else f"{each[0]:.1f}"
        yes = {True: "yes", False: "NO"}
        lines.append(f"| {name} | {way['commands']} ({way['jobs']} at a time) | {way['seconds']:.1f} | "
                     f"{way['cpu_seconds']:.1f} | {per} | {way['load_before']:.1f} / {way['load_after']:.1f} | "
                     f"{way['speedup']:.1f}x | {way['speedup_cpu']:.1f}x | {yes[way['same_val_acc']]} | "
                     f"{yes[way['same_selection']]} | {yes[way['same_test_rows']]} |")
    best = max(w["speedup"] for n, w in result["ways"].items() if n.startswith("sweep"))
    lines += [
        "",
        f"Goal: the sweep at least {result['target']:.0f}x faster than the {fits['commands']} separate fits "
        f"(wall clock): {'met' if best >= result['target'] else 'NOT met'} ({best:.1f}x). Selected by both ways: "
        f"{sel} (configuration {fits['selected']}).",
        "",
        "The sweep's validation table (`sweep.md`) and test rows (`results.md`):",
        "",
        result["sweep_table"].strip(),
        "",
        result["sweep_results"].strip(),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 configurations, 1 seed, 2 shots, 2 epochs, a tiny task: seconds (what the test runs)")
    parser.add_argument("--json", type=Path, default=RESULTS / "sweep_cpu.json", help="results (and a .md beside)")
    parser.add_argument("--world-out", type=Path, default=RESULTS / "sweep_world",
                        help="the sweep's table (.md) and plot (.png) for the README; none with --quick")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="sweeps timed, by --workers")
    parser.add_argument("--fit-jobs", type=int, default=2, help="also time the fits this many at a time (1: not)")
    args = parser.parse_args(argv)
    args.seeds, args.shots, args.train = SEEDS, 16, {}
    if args.quick:
        args.seeds, args.shots, args.train, args.world_out = (1,), 2, {"epochs": 2}, None
        args.workers, args.fit_jobs = args.workers[-1:], 1
    result = run(args)
    table = markdown(result)
    write_results(args.json, result, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

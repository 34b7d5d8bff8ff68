"""The ``rada-mma demo`` job: zero-shot CLIP and four adapters, base-to-new, in a few minutes on a CPU.

    rada-mma demo                                   # the shipped world CLIP on the world's tasks
    rada-mma demo --model ViT-B-16 --pretrained ~/clip/vit-b-16.bin --data ~/data/oxford_pets --out runs/pets

By default it runs on what the package ships: the small CLIP pretrained on the
procedurally generated world (``rada_mma/assets/world-clip.*``, see
:mod:`rada_mma.world`) and the world's downstream few-shot tasks, drawn in a
style the pretraining never saw. Each task is written once as a CoOp dataset
folder (images and ``split_zhou_<Task>.json``), then every method and seed is
one :func:`rada_mma.cli.run_fit` run (CoOp's protocol: 16 shots, seeds 1-3,
base classes the first half): few-shot draw, features, training on the base
classes, zero-shot and adapted accuracy on base and new. All runs of a dataset
share one feature cache, so each image is encoded once.

``--out`` receives ``results.json`` (the rows of ``fit`` and ``bench``),
``results.md``, ``world.png`` (the pretraining style beside each task's style),
the data, and one run folder per (task, method, seed) with its adapter and plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import cli, world
from .evaluation import PUBLISHED, markdown_table, summarize, write_results

__all__ = [
    "DEMO_METHODS",
    "WORLD_CONFIG",
    "WORLD_WEIGHTS",
    "add_demo_parser",
    "load_world_clip",
    "run_demo",
    "write_task",
]

log = logging.getLogger("rada_mma")

DEMO_METHODS = ("rada", "mma", "rada+adapter", "mma+rada")
ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_CONFIG = ASSETS / "world-clip.json"  # open_clip names the model after the file: "world-clip"
WORLD_WEIGHTS = ASSETS / "world-clip.safetensors"
TASK_FORMAT = "rada_mma.world_task"


def load_world_clip(device: str = "cpu"):
    """The shipped world CLIP through open_clip, offline: ``(model, preprocess, tokenizer)``.

    Example:
        >>> model, preprocess, tokenizer = load_world_clip()
        >>> model.encode_text(tokenizer(["a photo of a red star."])).shape
        torch.Size([1, 128])
    """
    return cli.load_clip(None, str(WORLD_WEIGHTS), str(WORLD_CONFIG), device)


# -- the data --------------------------------------------------------------------------------


def _task_key(task: world.Task) -> str:
    """What the files of a task depend on: the world's version and the task's definition."""
    return hashlib.sha256(f"{world.WORLD_VERSION}|{task!r}".encode()).hexdigest()


def write_task(task: world.Task, root: str | Path) -> Path:
    """Write ``task`` as a CoOp dataset folder ``root/<task.name>`` and return it; kept when already written.

    The folder holds ``images/<split>/<class>/<index>.png`` and
    ``split_zhou_<task.name>.json`` (``[path, label, class name]`` lists, labels
    in the task's class order, so the first half are the base classes), and a
    ``world_task.json`` manifest: a folder written for another world version or
    task definition is rewritten, a folder without the manifest is never touched.

    Args:
        task: e.g. ``world.TASKS["WorldShapes"]``.
        root: the folder the task's folder goes in.
    """
    folder = Path(root).expanduser() / task.name
    manifest = folder / "world_task.json"
    key = _task_key(task)
    if manifest.is_file():
        try:
            written = json.loads(manifest.read_text()).get("key")
        except (json.JSONDecodeError, AttributeError):
            written = None
        if written == key and (folder / f"split_zhou_{task.name}.json").is_file():
            return folder
        log.info("%s holds another version of %s; writing it again", folder, task.name)
    elif folder.exists():
        raise FileExistsError(
            f"{folder} exists and was not written by the demo (no world_task.json); give another --world-dir "
            "or remove the folder"
        )
    from PIL import Image

    # written beside the destination and renamed into place: an interrupted write leaves no half task
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task.name}.", dir=folder.parent))
    staging.chmod(0o755)
    try:
        names = task.classnames
        content: dict[str, list[list[Any]]] = {}
        for split in ("train", "val", "test"):
            data = task.render(split)
            entries = []
            counters = [0] * len(names)
            for image, label in zip(data.images.numpy(), data.labels.tolist(), strict=True):
                relative = f"{split}/{names[label].replace(' ', '_')}/{counters[label]:04d}.png"
                counters[label] += 1
                path = staging / "images" / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path, compress_level=1)
                entries.append([relative, label, names[label]])
            content[split] = entries
        (staging / f"split_zhou_{task.name}.json").write_text(json.dumps(content) + "\n")
        record = {"format": TASK_FORMAT, "key": key, "world_version": world.WORLD_VERSION, "task": repr(task)}
        (staging / "world_task.json").write_text(json.dumps(record) + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # an older version of the task, written by the demo (it has the manifest)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def write_samples(tasks: Sequence[world.Task], path: Path, *, per_row: int = 10) -> Path:
    """``path``: a row of pretraining-style images, then a row per task in its style (the distribution shift)."""
    g = torch.Generator().manual_seed(0)
    rows = [world.render(world.sample_scenes(per_row, generator=g), generator=g)]
    for task in tasks:
        data = task.render("test", per_class=1)
        rows.append(data.images[:per_row])
    sheet = world.contact_sheet(torch.cat(rows), columns=per_row)
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2))
    sheet.save(path)
    return path


# -- the job ---------------------------------------------------------------------------------


def _uses_world_clip(args: argparse.Namespace) -> bool:
    return args.model is None and args.model_config is None and args.pretrained is None


def _run_args(args: argparse.Namespace, *, data: Path, dataset: str | None, method: str, seed: int,
              out: Path, cache: Path) -> argparse.Namespace:
    run = argparse.Namespace(**vars(args))
    if _uses_world_clip(args):
        run.model_config, run.pretrained = str(WORLD_CONFIG), str(WORLD_WEIGHTS)
    run.data, run.dataset, run.method, run.seed = str(data), dataset, method, seed
    run.out, run.cache_dir = str(out), str(cache)
    return run


def run_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (dataset, method, seed) as one ``fit`` run; rows for ``results.json`` (zero-shot once per seed).

    Args:
        args: the ``demo`` command's arguments (:func:`add_demo_parser`).

    Returns:
        The rows written to ``OUT/results.json``: one ``zero-shot`` row per (dataset, seed) and one row
        per (dataset, method, seed), each with ``base``, ``new``, ``hm`` and ``all``.
    """
    from tqdm.auto import tqdm

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if _uses_world_clip(args) and not WORLD_WEIGHTS.is_file():
        raise cli.UserError(
            f"the world CLIP's weights are missing ({WORLD_WEIGHTS}); reinstall rada_mma, or remake them with "
            "scripts/pretrain_world_clip.py --out rada_mma/assets"
        )
    if args.data:
        datasets = [(Path(args.data).expanduser(), args.dataset)]
    else:
        tasks = [world.TASKS[name] for name in args.tasks]
        world_dir = Path(args.world_dir).expanduser() if args.world_dir else out / "data"
        datasets = [(write_task(task, world_dir), task.name) for task in tasks]
        write_samples(tasks, out / "world.png")
    rows: list[dict[str, Any]] = []
    total = len(datasets) * len(args.seeds) * len(args.methods)
    bar = tqdm(total=total, desc="demo runs", unit="run", disable=not args.progress)
    for data_path, dataset in datasets:
        folder = out / (dataset or data_path.name)
        cache = Path(args.cache_dir).expanduser() / folder.name if args.cache_dir else folder / "cache"
        for seed in args.seeds:
            for index, method in enumerate(args.methods):
                bar.set_postfix_str(f"{folder.name} {method} seed {seed}")
                run = _run_args(args, data=data_path, dataset=dataset, method=method, seed=seed,
                                out=folder / f"{method.replace('+', '_')}-seed{seed}", cache=cache)
                for row in cli.run_fit(run):
                    if row["method"] != "zero-shot" or index == 0:
                        rows.append(row)
                bar.update()
    bar.close()
    write_results(rows, out)
    return rows


def published_table(methods: Sequence[str]) -> str:
    """The papers' published 11-dataset averages (ViT-B/16, 16 shots) for the methods that have them."""
    known = [m for m in methods if m in PUBLISHED]
    lines = ["| method | base | new | HM |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {PUBLISHED[m][0]:.2f} | {PUBLISHED[m][1]:.2f} | {PUBLISHED[m][2]:.2f} |" for m in known]
    return "\n".join(lines) + "\n"


def gains(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (dataset, adapter): seed-averaged base and HM minus zero-shot's, in points."""
    summary = summarize(rows)
    zero = {r["dataset"]: r for r in summary if r["method"] == "zero-shot"}
    return {
        (r["dataset"], r["method"]): (r["base"] - zero[r["dataset"]]["base"], r["hm"] - zero[r["dataset"]]["hm"])
        for r in summary
        if r["method"] != "zero-shot" and r["dataset"] in zero
    }


def cmd_demo(args: argparse.Namespace) -> None:
    """``rada-mma demo``: run, then print the table beside the published averages."""
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_demo(args)
    print()
    print(markdown_table(rows, published=False))
    changes = ", ".join(f"{m} {b:+.1f} / {h:+.1f}" for (_, m), (b, h) in gains(rows).items())
    print(f"Change over zero-shot (base / HM points, mean over seeds {', '.join(map(str, args.seeds))}): {changes}")
    print()
    print("For orientation only, the papers' published averages over 11 real datasets (ViT-B/16, 16 shots);")
    print("the world is a demonstration, not a benchmark, and its numbers are not comparable:")
    print()
    print(published_table(["zero-shot", *args.methods]))
    clip = "the shipped world CLIP" if _uses_world_clip(args) else f"{cli.model_name(args)}"
    data = "the world's tasks" if not args.data else str(args.data)
    minutes = (time.time() - started) / 60
    print(f"{len(rows)} rows ({clip} on {data}) in {minutes:.1f} min: results.json, results.md, plots and adapters "
          f"in {args.out}")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` command to ``rada-mma``'s subparsers; its ``func`` is :func:`cmd_demo`."""
    p = subparsers.add_parser(
        "demo",
        help="zero-shot, RAda, MMA, RAda+Adapter and MMA+RAda base-to-new on the shipped world (or your CLIP and data)",
        description=(
            "Runs zero-shot CLIP and each adapter with CoOp's base-to-new protocol and prints one table. Without "
            "--model/--model-config/--pretrained it uses the small CLIP shipped with rada_mma, pretrained on a "
            "procedurally generated world; without --data, the world's few-shot tasks (drawn in a style the "
            "pretraining never saw). A demonstration default, not a benchmark."
        ),
    )
    p.add_argument("--model", default=None, help="open_clip model name (default: the shipped world CLIP)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local weights file")
    p.add_argument("--model-config", default=None, help="a local open_clip JSON config for a custom architecture")
    p.add_argument("--data", default=None, help="your dataset folder (ImageFolder or CoOp layout); default: the world's tasks")
    p.add_argument("--split-file", default=None, help="CoOp split_zhou_<Dataset>.json (default: found in --data)")
    p.add_argument("--dataset", default=None, help="dataset name for templates and class names (default: detected)")
    p.add_argument("--tasks", nargs="+", default=list(world.TASKS), choices=list(world.TASKS),
                   help="the world's tasks to run (without --data)")
    p.add_argument("--world-dir", default=None, help="where the world's tasks are written (default OUT/data)")
    p.add_argument("--template", action="append", default=None, help="prompt template with {}; repeat for an ensemble")
    p.add_argument("--shots", type=int, default=16, help="shots per class (default 16)")
    p.add_argument("--views", type=int, default=0, help="augmented views per training image in the cache")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default OUT/<dataset>/cache)")
    p.add_argument("--extract-batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rounding", choices=("ceil", "floor"), default="ceil", help="base classes: ceil(C/2) (CoOp) or floor")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is fastest on a CPU that other jobs keep busy")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the demo's run counter")
    cli._add_training(p, many=True)
    p.set_defaults(func=cmd_demo, methods=list(DEMO_METHODS))
    return p


"""``rada-mma demo``: zero-shot CLIP and four adapters, base-to-new, in a few minutes on a CPU.

By default it runs on what the package ships: the small CLIP pretrained on the
procedurally generated world (``rada_mma/demo/assets/world-clip.*``, see
:mod:`rada_mma.demo.world`) and the world's downstream few-shot tasks, drawn in
a style the pretraining never saw. Each task is written once as a CoOp dataset
folder (images and ``split_zhou_<Task>.json``), then every method and seed is
one :func:`rada_mma.fewshot.run_base_to_new` run (CoOp's protocol: 16 shots,
seeds 1-3, base classes the first half) through
:func:`rada_mma.fewshot.run_grid`. All runs of a dataset share one feature
cache, so each image is encoded once.

``OUT`` receives ``results.json`` and ``results.md`` (the rows of ``fit`` and
``bench``), ``results.png`` (base / new / HM per method with the spread over
seeds), ``world.png`` (the pretraining style beside each task's style), the
data, and one run folder per (task, method, seed) with its adapter and plots.

With ``setting=`` the same grid runs the papers' other protocols on the world
(:data:`DEMO_SETTINGS`): every class of WorldShapes over 1-16 shots, transfer to
``world.TARGETS``, domain generalisation to ``world.SHIFTS`` and test-time
training on them, through :mod:`rada_mma.fewshot.settings` and :mod:`rada_mma.fewshot.tta`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fewshot.evaluation import PUBLISHED, summarize
from ..fewshot.models import load_clip
from ..fewshot.protocol import RunSpec, run_grid
from ..fewshot.settings import run_shot_sweep, run_transfer_grid
from ..fewshot.tta import TTAConfig, run_tta_grid
from ..io import atomic_write, make_staging_folder, replace_folder, write_json
from . import world

__all__ = [
    "DEMO_METHODS",
    "DEMO_SETTINGS",
    "DEMO_SHOTS",
    "WORLD_CONFIG",
    "WORLD_MODEL",
    "WORLD_WEIGHTS",
    "gains",
    "load_world_clip",
    "planned_runs",
    "published_table",
    "run_demo",
    "with_world_clip",
    "write_samples",
    "write_task",
]

log = logging.getLogger(__name__)

DEMO_METHODS = ("rada", "mma", "rada+adapter", "mma+rada")
DEMO_SETTINGS = ("base2new", "all", "cross-dataset", "dg", "tta")
DEMO_SHOTS = (1, 2, 4, 8, 16)  # the all-class setting's sweep, as the papers plot it
DEMO_SOURCE = "WorldShapes"  # what the transfer, domain-generalisation and test-time settings train on
ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_MODEL = "world-clip"  # open_clip names the model after its config file
WORLD_CONFIG = ASSETS / "world-clip.json"
WORLD_WEIGHTS = ASSETS / "world-clip.safetensors"
TASK_FORMAT = "rada_mma.world_task"


def load_world_clip(device: str = "cpu"):
    """The shipped world CLIP through open_clip, offline: ``(model, preprocess, tokenizer)``.

    Example:
        >>> model, preprocess, tokenizer = load_world_clip()
        >>> model.encode_text(tokenizer(["a photo of a red star."])).shape
        torch.Size([1, 128])
    """
    return load_clip(None, str(WORLD_WEIGHTS), str(WORLD_CONFIG), device)


def with_world_clip(spec: RunSpec) -> RunSpec:
    """``spec`` on the shipped world CLIP when it names no other model (or names ``"world-clip"``)."""
    if spec.model_config is not None or spec.model not in (None, WORLD_MODEL):
        return spec
    if not WORLD_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the world CLIP's weights are missing ({WORLD_WEIGHTS}); reinstall rada_mma, or remake them with "
            "scripts/pretrain_world_clip.py --out rada_mma/demo/assets"
        )
    return spec.replace(model=None, model_config=str(WORLD_CONFIG), pretrained=spec.pretrained or str(WORLD_WEIGHTS))


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
    # written beside the destination and swapped into place: an interrupted write leaves no half task
    staging = make_staging_folder(folder)
    try:
        _render_task(task, staging, key)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _render_task(task: world.Task, staging: Path, key: str) -> None:
    """The task's images, split file and manifest, written into ``staging``."""
    from PIL import Image

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
            atomic_write(path, _png(Image.fromarray(image)), sync=False)  # replace_folder syncs them all
            entries.append([relative, label, names[label]])
        content[split] = entries
    write_json(staging / f"split_zhou_{task.name}.json", content)
    record = {"format": TASK_FORMAT, "key": key, "world_version": world.WORLD_VERSION, "task": repr(task)}
    write_json(staging / "world_task.json", record)


def _png(image) -> Callable:
    """A writer of ``image`` as a PNG, for :func:`rada_mma.io.atomic_write`."""
    return lambda fh: image.save(fh, format="PNG", compress_level=1)


def write_samples(tasks: Sequence[world.Task], path: Path, *, per_row: int = 10) -> Path:
    """``path``: a row of pretraining-style images, then a row per task in its style (the distribution shift)."""
    g = torch.Generator().manual_seed(0)
    rows = [world.render(world.sample_scenes(per_row, generator=g), generator=g)]
    for task in tasks:
        images = task.render("test", per_class=1).images[:per_row]
        blank = torch.full((per_row - len(images), *images.shape[1:]), 255, dtype=torch.uint8)
        rows.append(torch.cat([images, blank]))  # a task with fewer classes than a row keeps its own row
    sheet = world.contact_sheet(torch.cat(rows), columns=per_row)
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2))
    return atomic_write(path, _png(sheet))


# -- the job ---------------------------------------------------------------------------------


def run_demo(
    spec: RunSpec,
    *,
    out: str | Path = "runs/demo",
    methods: Sequence[str] = DEMO_METHODS,
    seeds: Sequence[int] = (1, 2, 3),
    tasks: Sequence[str] = tuple(world.TASKS),
    world_dir: str | Path | None = None,
    on_run: Callable[[RunSpec], None] | None = None,
    setting: str = "base2new",
    tta: TTAConfig | None = None,
) -> list[dict[str, Any]]:
    """Every (task, method, seed) as one run of ``setting``; rows for ``results.json`` (zero-shot once per seed).

    Args:
        spec: what every run shares (shots, training overrides, ...). Without a
            model it runs on the shipped world CLIP (:func:`with_world_clip`);
            with ``data`` it runs on that dataset instead of the world's tasks (base-to-new and all-class only).
        out: the demo's folder: results, ``results.png``, ``world.png``, data, run folders.
        methods, seeds: the grid.
        tasks: the world's tasks to run (names in :data:`world.TASKS`) for base-to-new, without ``spec.data``.
        world_dir: where the tasks are written (default ``OUT/data``).
        on_run: called with each run's spec before it starts.
        setting: ``"base2new"`` (the default: every task's base and new classes); ``"all"`` (every class of
            each task, :data:`DEMO_SHOTS` shots); ``"cross-dataset"`` (trained on WorldShapes' classes,
            evaluated on :data:`world.TARGETS`); ``"dg"`` (the same adapters on :data:`world.SHIFTS`,
            WorldShapes in held-out styles); ``"tta"`` (test-time training on the shifts, from the untrained
            adapter and from the WorldShapes adapter).
        tta: the test-time training of ``"tta"`` (default TPT's, with crops as for ImageNet's variants).

    Returns:
        The rows written to ``OUT/results.json``: for base-to-new one ``zero-shot`` row per (dataset, seed) and
        one row per (dataset, method, seed), each with ``base``, ``new``, ``hm`` and ``all``; the other
        settings' rows (:mod:`rada_mma.fewshot.evaluation`).
    """
    if setting not in DEMO_SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(DEMO_SETTINGS)}, got {setting!r}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = with_world_clip(spec)
    folder = Path(world_dir).expanduser() if world_dir else out / "data"
    grid = {"methods": methods, "seeds": seeds, "out": out, "on_run": on_run}
    if setting in ("base2new", "all"):
        if spec.data:
            datasets = [(spec.data, spec.dataset)]
        else:
            chosen = [world.TASKS[name] for name in tasks]
            datasets = [(str(write_task(task, folder)), task.name) for task in chosen]
            write_samples(chosen, out / "world.png")
        if setting == "all":
            return run_shot_sweep(spec, datasets, shots=DEMO_SHOTS, **grid)
        return run_grid(spec, datasets, **grid)
    if spec.data:
        raise ValueError(f"the demo's {setting} setting runs on the world; for your data run rada-mma bench "
                         "--setting with --source and --targets")
    targets = world.TARGETS if setting == "cross-dataset" else world.SHIFTS
    chosen = [world.TASKS[DEMO_SOURCE], *targets.values()]
    (source, *written) = [(str(write_task(task, folder)), task.name) for task in chosen]
    write_samples(chosen, out / "world.png")
    if setting == "tta":
        tta = tta or TTAConfig(augment="crop")
        if tta.augment == "auto":  # the shifts stand for ImageNet's variants, where TPT uses crops
            tta = dataclasses.replace(tta, augment="crop")
        return run_tta_grid(spec, written, source=source, config=tta, **grid)
    return run_transfer_grid(spec, source, written, setting="transfer" if setting == "cross-dataset" else "dg", **grid)


def planned_runs(setting: str, methods: Sequence[str], seeds: Sequence[int], tasks: Sequence[str]) -> int:
    """How many runs (trainings and evaluations) :func:`run_demo` makes, for a progress bar."""
    per = {"base2new": len(tasks), "all": len(DEMO_SHOTS), "cross-dataset": 1 + len(world.TARGETS),
           "dg": 1 + len(world.SHIFTS), "tta": 1 + 2 * len(world.SHIFTS)}[setting]
    return per * len(methods) * len(seeds)


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

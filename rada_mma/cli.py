"""The ``rada-mma`` command: argparse only. Each command builds a :class:`~rada_mma.fewshot.RunSpec`
and hands it to :mod:`rada_mma.fewshot.protocol` (or :mod:`rada_mma.demo`); an input error is
printed as one line, exit status 2.

    rada-mma fit --model ViT-B-16 --pretrained openai --data ~/data/oxford_pets \\
        --method rada --shots 16 --seed 1 --out runs/pets-rada
    rada-mma fit --model world-clip --data runs/demo/data/WorldShapes --out runs/ws-rada   # the shipped CLIP
    rada-mma predict --adapter runs/ws-rada/adapter.safetensors --images photos/ --out preds.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import METHODS
from .demo import (
    DEMO_METHODS,
    DEMO_SETTINGS,
    WORLD_MODEL,
    gains,
    planned_runs,
    published_table,
    run_demo,
    with_world_clip,
    world,
)
from .fewshot import distributed
from .fewshot.cache import DATA_HASHES
from .fewshot.evaluation import markdown_table
from .fewshot.models import RANDOM_WEIGHTS
from .fewshot.predict import predict_images, with_adapter_base
from .fewshot.protocol import DRAWS, RunSpec, extract, run_base_to_new, run_grid
from .fewshot.settings import BENCH_SETTINGS, evaluate, run_all_classes, run_shot_sweep, run_transfer_grid
from .fewshot.sweep import SWEEP_SETTINGS, Grid, read_best, run_sweep, run_sweeps, sweep_table
from .fewshot.train import CHOICES, TrainConfig
from .fewshot.tta import AUGMENTS, TTAConfig, run_tta, run_tta_grid

log = logging.getLogger("rada_mma")

# Python argument names in library errors, as the flags that set them
_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "model_config", "split_file", "cache_dir", "pretrained", "adapter", "device", "model", "data", "shots", "source",
    "extract_batch_size", "data_hash", "batch_size", "weight_decay", "warmup_epochs", "warmup_lr",
    "images", "classes", "overwrite",
)}
_FLAGS["out_dir"] = _FLAGS["out"] = "--out"


# -- argument groups -------------------------------------------------------------------------


def _add_model(p: argparse.ArgumentParser, *, default_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"open_clip architecture (e.g. ViT-B-16), or {WORLD_MODEL!r} for the shipped small CLIP; "
                        + default_help)
    g.add_argument("--pretrained", default=None,
                   help=f"open_clip pretrained tag (e.g. openai) or a local weights file; {RANDOM_WEIGHTS!r} for "
                        f"random weights on purpose (default for {WORLD_MODEL}: its shipped weights)")
    g.add_argument("--model-config", default=None, help="a local open_clip JSON config for a custom architecture")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is fastest on a CPU that other jobs keep busy")


def _add_data(p: argparse.ArgumentParser, *, many: bool = False, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, nargs="+" if many else None,
                   help="dataset folder(s): an ImageFolder root (train/, val/, test/) or a CoOp dataset folder")
    g.add_argument("--split-file", default=None, help="CoOp split_zhou_<Dataset>.json (default: found in --data)")
    g.add_argument("--dataset", default=None, help="dataset name for templates and class names (default: detected)")
    g.add_argument("--template", action="append", default=None,
                   help="prompt template with {}; repeat for an ensemble (default: the dataset's)")
    if many:  # bench: a sweep of shots in the all-class setting
        g.add_argument("--shots", type=int, nargs="+", default=[16],
                       help="training images per class; 0: all (default 16); several with --setting all (a sweep)")
    else:
        g.add_argument("--shots", type=int, default=16, help="training images per class; 0: all (default 16)")
    g.add_argument("--draw", choices=DRAWS, default="coop",
                   help="few-shot draw: coop (Dassl's: K per class, then the base half; default) or mma (MMA's: the "
                        "base half, then a stratified draw of K x C training and K x C validation images from the "
                        "training split; --seed 42 is MMA's own draw)")
    g.add_argument("--rounding", choices=("ceil", "floor"), default=None,
                   help="base classes: the first ceil(C/2) (CoOp) or floor(C/2) (MMA) (default: the draw's own)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default OUT/cache)")
    g.add_argument("--data-hash", choices=DATA_HASHES, default="content",
                   help="how image files enter the cache's fingerprint: every byte (default; an edited image is "
                        "always noticed) or stat: size and modification time (faster on huge datasets)")
    g.add_argument("--extract-batch-size", type=int, default=128,
                   help="images per forward pass of the image encoder when filling the cache (default 128)")


def _add_method(p: argparse.ArgumentParser, *, many: bool = False, default_methods: Sequence[str] = ("rada", "mma"),
                seeds: bool = False) -> None:
    g = p.add_argument_group("method")
    if many:
        g.add_argument("--methods", nargs="+", default=list(default_methods), choices=METHODS,
                       help=f"adapters to run (default: {' '.join(default_methods)})")
    else:
        g.add_argument("--method", default="rada", choices=METHODS, help="the adapter (default rada)")
    if many or seeds:
        g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                       help="few-shot draws and training seeds (default 1 2 3)")
    else:
        g.add_argument("--seed", type=int, default=1, help="seed of the few-shot draw and of training (default 1)")
    g.add_argument("--option", action="append", default=None,
                   help="adapter option KEY=VALUE, e.g. alpha=0.1 or softmax=row (repeatable)")


def _add_training(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (but the seed): each overrides the method's preset."""
    g = p.add_argument_group("training (each overrides the method's preset)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "seed":
            continue
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.metadata.get("parse") is not None:
            g.add_argument(flag, type=_flag_type(f.metadata["parse"]), default=None, help=help)
        elif f.name in CHOICES:
            g.add_argument(flag, choices=CHOICES[f.name], default=None, help=help)
        else:
            g.add_argument(flag, type={"int": int, "float": float}[f.type], default=None, help=help)


def _flag_type(parse: Any) -> Any:
    """``parse`` as an argparse type: its ValueError becomes argparse's own usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def _add_tta(p: argparse.ArgumentParser, *, switch: bool = False) -> None:
    """One ``--tta-*`` flag per TTAConfig field (TPT's defaults); ``--tta`` itself where it is a choice (eval)."""
    g = p.add_argument_group("test-time training (TPT's protocol, on the adapter's parameters)")
    if switch:
        g.add_argument("--tta", action="store_true",
                       help="test-time training on each test image (without --adapter: from the method's initial "
                            "weights, for rada exactly zero-shot CLIP)")
    for f in dataclasses.fields(TTAConfig):
        flag, help = "--tta-" + f.name.replace("_", "-"), f.metadata["help"] + f" (default {f.default})"
        if f.name == "augment":
            g.add_argument(flag, choices=AUGMENTS, default=None, help=help)
        else:
            g.add_argument(flag, type={"int": int, "float": float}[f.type], default=None, help=help)


def tta_from_args(args: argparse.Namespace) -> TTAConfig:
    """The test-time training the ``--tta-*`` flags ask for (TPT's defaults for the others)."""
    given = {f.name: getattr(args, "tta_" + f.name, None) for f in dataclasses.fields(TTAConfig)}
    return TTAConfig(**{k: v for k, v in given.items() if v is not None})


def _add_out(p: argparse.ArgumentParser, *, default: str | None = None, help: str = "run folder") -> None:
    p.add_argument("--out", required=default is None, default=default, help=help)


# -- specs -----------------------------------------------------------------------------------


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            options[key] = value  # a word such as softmax=row
    return options


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run the flags describe; ``--model world-clip`` is the shipped CLIP and its weights."""
    data = args.data[0] if isinstance(args.data, list) else args.data
    templates = args.template or getattr(args, "config_templates", None)  # given flags replace --config's
    spec = RunSpec(
        data=data, out=args.out, method=getattr(args, "method", "rada"), seed=getattr(args, "seed", 1),
        shots=args.shots[0] if isinstance(args.shots, list) else args.shots, model=args.model,
        pretrained=args.pretrained, model_config=args.model_config,
        split_file=args.split_file, dataset=args.dataset, templates=tuple(templates) if templates else None,
        draw=args.draw, rounding=args.rounding, cache_dir=args.cache_dir, data_hash=args.data_hash,
        extract_batch_size=args.extract_batch_size, device=args.device, options=_adapter_options(args),
        train=_train_overrides(args), adapter=getattr(args, "adapter", None), progress=getattr(args, "progress", True),
    )
    return with_world_clip(spec) if spec.model == WORLD_MODEL else spec


# -- commands --------------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    written = extract(spec, setting=args.setting)
    if distributed.is_main():
        shapes = ", ".join(str(tuple(t.shape)) for t in written)
        print(f"features {shapes} in {spec.cache_folder()}")


def cmd_fit(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    rows = run_all_classes(spec) if args.setting == "all" else run_base_to_new(spec)
    if distributed.is_main():
        print(markdown_table(rows))
        print(f"adapter, results and plots in {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    if args.tta:
        if args.setting is not None:
            raise ValueError("--tta is a setting of its own (rows with setting 'tta'); leave --setting out")
        rows = run_tta(spec, tta_from_args(args), source=args.source)
    else:
        rows = evaluate(spec, setting=args.setting, source=args.source)
    if distributed.is_main():
        print(markdown_table(rows))


def _bench_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid ``bench --setting`` asks for."""
    spec, grid = spec_from_args(args), {"methods": args.methods, "seeds": args.seeds, "out": args.out}
    if args.setting != "all" and len(args.shots) > 1:
        raise ValueError(f"--shots takes one value with --setting {args.setting}; a sweep of shots is --setting all")
    if args.setting in ("base2new", "all"):
        if not args.data:
            raise ValueError(f"--setting {args.setting} needs --data (the datasets)")
        datasets = [(path, args.dataset) for path in args.data]
        if args.setting == "all":
            return run_shot_sweep(spec, datasets, shots=args.shots, **grid)
        return run_grid(spec, datasets, **grid)
    if not args.targets or (args.setting != "tta" and not args.source):
        raise ValueError(f"--setting {args.setting} needs --source DATA (trained on, all classes) and --targets DATA "
                         "... (evaluated on); with --setting tta --source is optional (the † rows)")
    targets = [(path, None) for path in args.targets]
    source = (args.source, args.dataset) if args.source else None
    if args.setting == "tta":
        return run_tta_grid(spec, targets, source=source, config=tta_from_args(args), **grid)
    return run_transfer_grid(spec, source, targets, setting=BENCH_SETTINGS[args.setting], **grid)


def cmd_bench(args: argparse.Namespace) -> None:
    """Every run of the setting's grid as one run folder; zero-shot once per (dataset, seed); one table."""
    rows = _bench_rows(args)
    if distributed.is_main():
        out = Path(args.out)
        print(markdown_table(rows, runs=False))
        print(f"results of {len(rows)} runs in {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")


def cmd_predict(args: argparse.Namespace) -> None:
    """``rada-mma predict``: the model from the flags, or the one the adapter file records."""
    spec = RunSpec(
        model=args.model, pretrained=args.pretrained, model_config=args.model_config, device=args.device,
        adapter=args.adapter, templates=tuple(args.template) if args.template else None, progress=args.progress,
    )
    spec = with_adapter_base(spec)
    spec = with_world_clip(spec) if spec.model == WORLD_MODEL else spec
    summary = predict_images(spec, args.images, args.out, k=args.k, batch_size=args.batch_size, classes=args.classes,
                             overwrite=args.overwrite, strict=args.strict)
    unreadable = f"; {summary.failed} unreadable, reported on their lines" if summary.failed else ""
    print(f"{summary.images - summary.failed} images classified{unreadable}: {summary.out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Every configuration of the grid with every seed, selected on validation; then the selected one on test."""
    if len(args.shots) > 1:
        raise ValueError("--shots takes one value in a sweep (sweep the shots with bench --setting all)")
    spec = spec_from_args(args)
    grid = Grid.parse(spec.method, args.grid)
    common = {"seeds": args.seeds, "setting": args.setting, "workers": args.workers}
    if len(args.data) == 1:
        sweeps = [run_sweep(spec, grid, **common)]
    else:
        sweeps = run_sweeps(spec, [(path, args.dataset) for path in args.data], grid, out=args.out, **common)
    if distributed.is_main():
        for sweep in sweeps:
            print(f"{sweep.best['dataset']}: validation accuracy of each configuration (in {sweep.folder / 'sweep.md'})")
            print(sweep_table(sweep.configurations, grid.keys, sweep.selected))
        print(markdown_table([r for s in sweeps for r in s.rows], runs=False))
        best = ", ".join(str(s.folder / "best.json") for s in sweeps)
        print(f"selected configuration in {best} (rada-mma fit --config FILE); test rows in {Path(args.out) / 'results.md'}")


def cmd_demo(args: argparse.Namespace) -> None:
    """``rada-mma demo``: run, then print the table (base-to-new: beside the published averages)."""
    from tqdm.auto import tqdm

    started = time.time()
    spec = with_world_clip(spec_from_args(args))
    out = Path(args.out or ("runs/demo" if args.setting == "base2new" else f"runs/demo-{args.setting}"))
    total = planned_runs(args.setting, args.methods, args.seeds, [args.data] if args.data else args.tasks)
    with tqdm(total=total, desc="demo runs", unit="run", disable=not args.progress) as bar:
        def on_run(run: RunSpec) -> None:
            bar.set_postfix_str(f"{Path(run.out).parent.name} {run.method} seed {run.seed}")
            bar.update()

        rows = run_demo(spec.replace(progress=False), out=out, methods=args.methods, seeds=args.seeds,
                        tasks=args.tasks, world_dir=args.world_dir, on_run=on_run, setting=args.setting,
                        tta=tta_from_args(args))
    print()
    print(markdown_table(rows, published=False, runs=False))
    if args.setting == "base2new":
        changes = ", ".join(f"{m} {b:+.1f} / {h:+.1f}" for (_, m), (b, h) in gains(rows).items())
        print(f"Change over zero-shot (base / HM points, mean over seeds {', '.join(map(str, args.seeds))}): {changes}")
        print()
        print("For orientation only, the papers' published averages over 11 real datasets (ViT-B/16, 16 shots);")
        print("the world is a demonstration, not a benchmark, and its numbers are not comparable:")
        print()
        print(published_table(["zero-shot", *args.methods]))
    clip = "the shipped world CLIP" if spec.model_config and Path(spec.model_config).stem == WORLD_MODEL else spec.model
    data = "the world's tasks" if not args.data else str(args.data)
    minutes = (time.time() - started) / 60
    runs = "<dataset>/<method>-seed<N>/" if args.setting == "base2new" else "<dataset>/<run>-seed<N>/"
    print(f"{len(rows)} rows ({clip} on {data}, setting {args.setting}) in {minutes:.1f} min. In {out}: results.json, "
          f"results.md and results.png (the methods side by side); each run's folder in {out}/{runs}")


# -- parser ----------------------------------------------------------------------------------


def config_defaults(path: str) -> dict[str, Any]:
    """The defaults ``fit --config FILE`` takes from a configuration file (a sweep's ``best.json``): its flags'
    values, which flags given on the command line override, as a file of defaults does in most tools."""
    best = read_best(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    unknown = sorted(set(best.get("train") or {}) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training setting(s) {unknown}; known: {', '.join(sorted(known))}")
    defaults = {k: best[k] for k in ("method", "shots", "draw", "rounding", "setting") if k in best}
    defaults.update(best.get("train") or {})
    defaults["option"] = [f"{k}={json.dumps(v)}" for k, v in (best.get("options") or {}).items()] or None
    defaults["config_templates"] = best.get("templates")
    return defaults


def build_parser(fit_config: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The ``rada-mma`` parser; ``fit_config``: defaults of ``fit``'s flags (from ``--config``, :func:`config_defaults`)."""
    fit_config = fit_config or {}
    parser = argparse.ArgumentParser(prog="rada-mma", description="RAda and MMA adapters for CLIP: few-shot runs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pipeline does")
    sub = parser.add_subparsers(dest="command", required=True)
    need = "required (with --pretrained) unless --model-config is given"

    p = sub.add_parser("extract", help="encode a dataset's images and class texts once, into the feature cache")
    _add_model(p, default_help=need)
    _add_data(p)
    p.add_argument("--method", default="rada", choices=METHODS,
                   help="the method whose preset says which prompts and augmented views fit will read (default rada)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the few-shot draw and the augmented views whose images are encoded (default 1)")
    p.add_argument("--setting", choices=("base2new", "all"), default="base2new",
                   help="whose training images to encode: the base classes' (default) or every class's (fit --setting all)")
    _add_training(p)
    _add_out(p, help="run folder (the few-shot draw goes to OUT/split, the cache to OUT/cache unless --cache-dir)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("fit", help="train an adapter on the base classes (or every class); evaluate it and zero-shot")
    _add_model(p, default_help=need)
    _add_data(p)
    p.add_argument("--setting", choices=("base2new", "all"), default="base2new",
                   help="base2new: train on the base classes, test base and new (default); all: train and test on "
                        "every class (CoOp's few-shot setting)")
    _add_method(p)
    _add_training(p)
    p.add_argument("--config", default=None,
                   help="a configuration file, e.g. a sweep's OUT/best.json: its method, options, training settings, "
                        "shots, draw, rounding, templates and setting, each overridden by a flag given here "
                        "(--option KEY=VALUE per key)")
    _add_out(p)
    p.set_defaults(func=cmd_fit, **fit_config)

    p = sub.add_parser("eval", help="evaluate a saved adapter (OUT/adapter.safetensors or --adapter) on base and new")
    _add_model(p, default_help=need)
    _add_data(p)
    _add_method(p)
    p.add_argument("--adapter", default=None,
                   help="the adapter file to evaluate (default OUT/adapter.safetensors, written by fit)")
    p.add_argument("--setting", choices=("base2new", "all", "transfer", "dg"), default=None,
                   help="base2new, all (every class), transfer (every class of --data, another dataset than the "
                        "adapter's) or dg (the same, for a domain shift); default: from the adapter's run.json "
                        "(its own setting in its own folder, transfer elsewhere; base2new without one)")
    p.add_argument("--source", default=None,
                   help="for transfer and test-time rows: the dataset the adapter was trained on (default: its run.json)")
    _add_tta(p, switch=True)
    _add_out(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="a setting over several datasets, methods and seeds; one table, one plot")
    _add_model(p, default_help=need)
    _add_data(p, many=True, required=False)
    g = p.add_argument_group("setting")
    g.add_argument("--setting", choices=tuple(BENCH_SETTINGS), default="base2new",
                   help="base2new (default) or all (a sweep over --shots) on each --data; cross-dataset, dg or tta: "
                        "train on every class of --source, evaluate on every --targets (tta: with test-time training, "
                        "also from the untrained adapter)")
    g.add_argument("--source", default=None, help="cross-dataset, dg, tta: the dataset folder trained on (e.g. ImageNet)")
    g.add_argument("--targets", nargs="+", default=None, help="cross-dataset, dg, tta: the dataset folders evaluated on")
    _add_method(p, many=True)
    _add_training(p)
    _add_tta(p)
    _add_out(p, help="folder of the runs (OUT/<dataset>/<run>-seed<N>), the table and the plot")
    p.set_defaults(func=cmd_bench)

    _add_predict(sub)
    _add_sweep(sub)
    _add_demo(sub)
    return parser


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a saved adapter: one line per image (path, top-k classes, probabilities)",
        description="Loads the adapter file (its method, weights and classes) onto its CLIP and writes the top-k "
                    "classes of every image to a .jsonl or .csv file. Without --model the CLIP is the one the file "
                    "records (e.g. world-clip, or an open_clip name and pretrained tag).",
    )
    p.add_argument("--adapter", required=True, help="the adapter file (e.g. OUT/adapter.safetensors written by fit)")
    p.add_argument("--images", required=True, nargs="+", help="image files and folders (searched for images at any depth)")
    p.add_argument("--out", required=True, help="the predictions file: .jsonl or .csv")
    p.add_argument("--k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names to score instead of those the adapter file holds (with --template)")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for --classes; repeat for an ensemble (default: the file's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--strict", action="store_true",
                   help="an adapter trained on another base model is an error (default: a warning)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _add_model(p, default_help="default: the base model the adapter file records")
    p.set_defaults(func=cmd_predict)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="a grid of training settings and adapter options: select on validation only, then test",
        description=(
            "Trains every configuration of the grid with every seed on features encoded once (augmented views "
            "included), selects the configuration with the best mean validation accuracy over the seeds (ties: the "
            "first in grid order), and only then runs it on the test split, once per seed, as fit does. The test "
            "split is not read before the selection. OUT: sweep.json, sweep.md, sweep.png, best.json (fit --config "
            "OUT/best.json), results.json, results.md, best-seed<N>/ (the selected runs)."
        ),
    )
    _add_model(p, default_help="required (with --pretrained) unless --model-config is given")
    _add_data(p, many=True)
    p.add_argument("--setting", choices=SWEEP_SETTINGS, default="base2new",
                   help="base2new: select on the base classes' validation images, test base and new (default); "
                        "all: every class")
    _add_method(p, seeds=True)
    g = p.add_argument_group("sweep")
    g.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a swept key and its values, e.g. lr=1e-4,1e-3,1e-2 (repeat for more keys; the grid is every "
                        "combination): any training setting (the flags below, as lr, epochs, views) or an adapter "
                        "option of the method (alpha, temperature, ...)")
    g.add_argument("--workers", type=int, default=1,
                   help="configurations trained at once, in worker processes (CPU; each trains on one thread, so the "
                        "results do not depend on it). Under torchrun the ranks share the configurations too")
    _add_training(p)
    _add_out(p, help="the sweep's folder (with several --data: OUT/<dataset>/ each, and OUT/results.md)")
    p.set_defaults(func=cmd_sweep)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="zero-shot, RAda, MMA, RAda+Adapter and MMA+RAda base-to-new on the shipped world (or your CLIP and data)",
        description=(
            "Runs zero-shot CLIP and each adapter with CoOp's base-to-new protocol and prints one table. Without "
            "--model/--model-config it uses the small CLIP shipped with rada_mma, pretrained on a procedurally "
            "generated world; without --data, the world's few-shot tasks (drawn in a style the pretraining never "
            "saw). A demonstration default, not a benchmark."
        ),
    )
    _add_model(p, default_help=f"default: the shipped {WORLD_MODEL}")
    _add_data(p, required=False)
    p.add_argument("--setting", choices=DEMO_SETTINGS, default="base2new",
                   help="base2new (default); all: every class, 1 2 4 8 16 shots; cross-dataset: trained on WorldShapes, "
                        "tested on WorldTextures; dg: tested on WorldShapes in four held-out styles; tta: test-time "
                        "training on those styles")
    p.add_argument("--tasks", nargs="+", default=list(world.TASKS), choices=list(world.TASKS),
                   help="the world's tasks to run (without --data)")
    p.add_argument("--world-dir", default=None, help="where the world's tasks are written (default OUT/data)")
    _add_method(p, many=True, default_methods=DEMO_METHODS)
    _add_training(p)
    _add_tta(p)
    p.add_argument("--out", default=None, help="output folder (default runs/demo; runs/demo-<setting> for the others)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the demo's run counter")
    p.set_defaults(func=cmd_demo)


# -- main ------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The error as one line, Python argument names written as the flags that set them."""
    message = " ".join(str(err).split()) or type(err).__name__
    message = re.sub(r"\b(" + "|".join(_FLAGS) + r")=True\b", lambda m: _FLAGS[m.group(1)], message)  # switches
    message = re.sub(r"\b(" + "|".join(_FLAGS) + r")=", lambda m: _FLAGS[m.group(1)] + " ", message)
    snake = [name for name in _FLAGS if "_" in name]  # plain words such as "model" stay words
    return re.sub(r"\b(" + "|".join(snake) + r")\b", lambda m: _FLAGS[m.group(1)], message)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.init_from_env()
    with warnings.catch_warnings():
        # a warning (e.g. an adapter loaded onto another base model) is one line too
        warnings.showwarning = lambda message, *_, **__: print(
            f"rada-mma {args.command}: warning: {_one_line(message)}", file=sys.stderr
        )
        try:
            if getattr(args, "config", None):  # parsed again with the file's values as defaults
                args = build_parser(config_defaults(args.config)).parse_args(argv)
            args.func(args)
        except (OSError, ValueError, TypeError) as err:
            print(f"rada-mma {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

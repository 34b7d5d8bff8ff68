"""The ``rada-mma`` command: extract, fit, eval, bench.

    rada-mma fit --model ViT-B-16 --pretrained openai --data ~/data/oxford_pets \\
        --method rada --shots 16 --seed 1 --out runs/pets-rada

A run folder holds ``adapter.safetensors``, ``results.json``, ``results.md``,
the plots, the sampled few-shot split and the feature cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import METHODS
from .evaluation import harmonic_mean, markdown_table, write_results
from .train import TrainConfig, fit, preset

log = logging.getLogger("rada_mma")


class UserError(Exception):
    """A problem with the command's inputs: printed as one line, exit status 2."""


# -- model ---------------------------------------------------------------------------------


def load_clip(name: str, pretrained: str | None, model_config: str | None, device: str):
    """An open_clip model, its eval preprocessing and tokenizer, without touching the network."""
    import open_clip

    if model_config:
        path = Path(model_config)
        if not path.is_file():
            raise UserError(f"--model-config {path} does not exist")
        open_clip.add_model_config(path)
        name = name or path.stem
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().replace("/", "-") in m.lower()][:8]
        raise UserError(
            f"open_clip does not know the model {name!r}"
            + (f"; did you mean one of {close}?" if close else "")
            + " Pass --model-config CONFIG.json for a custom architecture."
        )
    if pretrained and not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(
            f"--pretrained {pretrained!r} is neither a local weights file nor a tag open_clip knows for {name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)})"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    except RuntimeError as err:
        raise UserError(f"cannot load weights {pretrained!r} into {name}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # downloads fail offline: say what to do instead
        if pretrained and not Path(pretrained).is_file():
            raise UserError(
                f"could not fetch the {pretrained!r} weights for {name} ({type(err).__name__}); without network, "
                "pass --pretrained /path/to/weights (a .pt/.bin/.safetensors file)"
            ) from err
        raise
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


# -- one run -------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "patience": args.patience,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    return preset(args.method, **overrides)


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        if not _:
            raise UserError(f"--option takes KEY=VALUE, got {item!r}")
        options[key] = json.loads(value) if value[:1] in "0123456789-.[{tf" and value not in ("", "-") else value
    return options


def run_fit(args: argparse.Namespace, *, train: bool = True) -> list[dict[str, Any]]:
    """Few-shot base-to-new: features once, train on base, evaluate base and new; rows for results.json."""
    from . import cache, data, templates
    from .plots import plot_adapter, plot_history
    from .train import accuracy
    from .wrapper import wrap

    out = Path(args.out)
    rank = _rank()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    splits = data.load_data(Path(args.data).expanduser(), split_file=args.split_file, name=args.dataset)
    dataset = splits.name
    fewshot = data.few_shot(splits, args.shots, args.seed, save_dir=out / "split")
    base = data.subsample_classes(fewshot, "base", rounding=args.rounding)
    new = data.subsample_classes(fewshot, "new", rounding=args.rounding)
    prompts = templates.templates_for(dataset, args.template)

    clip, preprocess, tokenizer = load_clip(args.model, args.pretrained, args.model_config, device)
    model = wrap(clip, method=args.method, generator=torch.Generator().manual_seed(args.seed), **_adapter_options(args))
    model.adapter.to(device)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)

    def features(split: data.Splits, part: str, tag: str, views: int = 0):
        items = getattr(split, part)
        return cache.extract_image_features(
            model, split, items, preprocess, views=views, batch_size=args.extract_batch_size,
            device=device, cache_path=cache_dir / f"{tag}-{part}-v{views}.safetensors", progress=rank == 0,
        )

    base_text = cache.encode_class_texts(
        model, base.classnames, prompts, tokenizer=tokenizer, cache_path=cache_dir / "base-classes.safetensors"
    )
    new_text = cache.encode_class_texts(
        model, new.classnames, prompts, tokenizer=tokenizer, cache_path=cache_dir / "new-classes.safetensors"
    )
    base_test, new_test = features(base, "test", "base"), features(new, "test", "new")

    model.set_classes(text_features=base_text)
    result = None
    if train:
        train_feats = features(base, "train", "base", views=args.views)
        val_feats = features(base, "val", "base") if base.val else None
        config = _train_config(args)
        result = fit(
            model, train_feats.image, train_feats.labels, config=config,
            val_features=None if val_feats is None else val_feats.image,
            val_labels=None if val_feats is None else val_feats.labels,
            out_dir=out, progress=rank == 0, data_fingerprint=train_feats.fingerprint,
        )
    else:
        model.load_adapter(args.adapter or out / "adapter.safetensors")

    rows = []
    common = {"dataset": dataset, "seed": args.seed, "shots": args.shots, "model": args.model}
    for method, enabled in (("zero-shot", False), (args.method, True)):
        model.set_classes(text_features=base_text)
        with model.disable_adapter() if not enabled else contextlib.nullcontext():
            b = accuracy(model, base_test.image, base_test.labels)
            model.set_classes(text_features=new_text)
            n = accuracy(model, new_test.image, new_test.labels)
        rows.append({**common, "method": method, "base": b, "new": n, "hm": harmonic_mean(b, n)})
    model.set_classes(text_features=base_text)
    if rank == 0:
        if train:
            model.save_adapter(out / "adapter.safetensors", overwrite=True)
            (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            if result is not None and result.history:
                _maybe_plot(plot_history, result.history, out / "training.png", title=f"{dataset} {args.method}")
        _maybe_plot(plot_adapter, model, base_test.image, out / "adapter.png", classnames=base.classnames)
        write_results(rows, out)
    return rows


def _maybe_plot(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ImportError as err:
        log.warning("%s; skipping %s", err, args[-1] if args else "plot")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_distributed() -> None:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


# -- commands ------------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> None:
    from . import cache, data, templates

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    splits = data.load_data(Path(args.data).expanduser(), split_file=args.split_file, name=args.dataset)
    if args.shots:
        splits = data.few_shot(splits, args.shots, args.seed, save_dir=out / "split")
    clip, preprocess, tokenizer = load_clip(args.model, args.pretrained, args.model_config, device)
    from .wrapper import wrap

    model = wrap(clip, method="rada")  # only the encoders are used
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for part in ("train", "val", "test"):
        items = getattr(splits, part)
        if items:
            views = args.views if part == "train" else 0
            feats = cache.extract_image_features(
                model, splits, items, preprocess, views=views, batch_size=args.extract_batch_size, device=device,
                cache_path=cache_dir / f"all-{part}-v{views}.safetensors", progress=_rank() == 0,
            )
            log.info("%s: %s features -> %s", part, tuple(feats.image.shape), cache_dir)
    prompts = templates.templates_for(splits.name, args.template)
    text = cache.encode_class_texts(
        model, splits.classnames, prompts, tokenizer=tokenizer, cache_path=cache_dir / "all-classes.safetensors"
    )
    log.info("classes: %s text features (K, templates, D) -> %s", tuple(text.shape), cache_dir)


def cmd_fit(args: argparse.Namespace) -> None:
    rows = run_fit(args)
    if _rank() == 0:
        print(markdown_table(rows))
        print(f"adapter, results and plots in {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    rows = run_fit(args, train=False)
    if _rank() == 0:
        print(markdown_table(rows))


def cmd_bench(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for data_path in args.data:
        for seed in args.seeds:
            for method in args.methods:
                run = argparse.Namespace(**vars(args))
                run.data, run.seed, run.method = data_path, seed, method
                run.out = str(out / Path(data_path).name / f"{method.replace('+', '_')}-seed{seed}")
                for row in run_fit(run):
                    if row["method"] != "zero-shot" or method == args.methods[0]:
                        rows.append(row)
    if _rank() == 0:
        write_results(rows, out)
        print(markdown_table(rows))


# -- parser --------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, data_nargs: str | None = None) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local weights file")
    p.add_argument("--model-config", default=None, help="a local open_clip JSON config for a custom architecture")
    p.add_argument("--data", required=True, nargs=data_nargs, help="dataset folder (ImageFolder or CoOp layout)")
    p.add_argument("--split-file", default=None, help="CoOp split_zhou_<Dataset>.json (default: found in --data)")
    p.add_argument("--dataset", default=None, help="dataset name for templates and class names (default: detected)")
    p.add_argument("--template", action="append", default=None, help="prompt template with {}; repeat for an ensemble")
    p.add_argument("--shots", type=int, default=16, help="shots per class (default 16)")
    p.add_argument("--views", type=int, default=0, help="augmented views per training image in the cache")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default OUT/cache)")
    p.add_argument("--extract-batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rounding", choices=("ceil", "floor"), default="ceil", help="base classes: ceil(C/2) (CoOp) or floor (MMA)")
    p.add_argument("--out", required=True, help="run folder")


def _add_training(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:
        p.add_argument("--methods", nargs="+", default=["rada", "mma"], choices=METHODS)
        p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    else:
        p.add_argument("--method", default="rada", choices=METHODS)
        p.add_argument("--seed", type=int, default=1)
    p.add_argument("--option", action="append", help="adapter option KEY=VALUE, e.g. alpha=0.1 (repeatable)")
    for name, kind in (("epochs", int), ("lr", float), ("batch-size", int), ("weight-decay", float), ("patience", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the method's preset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rada-mma", description="RAda and MMA adapters for CLIP: few-shot runs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="encode a dataset's images and class texts once, into the feature cache")
    _add_common(p)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_extract, shots=0)
    p = sub.add_parser("fit", help="train an adapter on the base classes; evaluate base, new and zero-shot")
    _add_common(p)
    _add_training(p)
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", help="evaluate a saved adapter (OUT/adapter.safetensors or --adapter) on base and new")
    _add_common(p)
    _add_training(p)
    p.add_argument("--adapter", default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="base-to-new over several datasets, methods and seeds; one table")
    _add_common(p, data_nargs="+")
    _add_training(p, many=True)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _init_distributed()
    try:
        args.func(args)
    except (UserError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"rada-mma {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

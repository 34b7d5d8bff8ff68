"""The ``rada-mma`` command: demo, extract, fit, eval, bench.

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
from .evaluation import _atomic_write_text, harmonic_mean, markdown_table, write_results
from .train import TrainConfig, fit, preset

log = logging.getLogger("rada_mma")


class UserError(Exception):
    """A problem with the command's inputs: printed as one line, exit status 2."""


# -- model ---------------------------------------------------------------------------------

DEFAULT_MODEL = "ViT-B-16"


def _register_config(path: Path, name: str | None) -> str:
    """Register a local open_clip JSON config; its model name is the file's stem, as open_clip names it."""
    import open_clip

    if not path.is_file():
        raise UserError(f"--model-config {path} does not exist; give an open_clip model config (.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--model-config {path} is not valid JSON ({err}); give an open_clip model config") from err
    needed = ("embed_dim", "vision_cfg", "text_cfg")
    if path.suffix != ".json" or not isinstance(config, dict) or not all(k in config for k in needed):
        raise UserError(
            f"--model-config {path} is not an open_clip model config: it must be a .json file with "
            f"{', '.join(needed)} (see open_clip's model_configs/ for examples)"
        )
    if name and name != path.stem:
        raise UserError(
            f"--model-config {path} defines the model {path.stem!r} (open_clip names a config by its file name) "
            f"but --model is {name!r}; leave out --model, or give --model {path.stem}"
        )
    open_clip.add_model_config(path)
    return path.stem


def model_name(args: argparse.Namespace) -> str:
    """The open_clip model a command uses: --model, else the --model-config file's stem, else ViT-B-16."""
    if args.model_config:
        return Path(args.model_config).expanduser().stem
    return args.model or DEFAULT_MODEL


def load_clip(name: str | None, pretrained: str | None, model_config: str | None, device: str):
    """An open_clip model, its eval preprocessing and tokenizer, without touching the network.

    Args:
        name: an open_clip model name (``None``: the config's, or ViT-B-16).
        pretrained: an open_clip pretrained tag, or a local weights file.
        model_config: a local open_clip JSON config for a custom architecture.
        device: where the model goes.
    """
    import open_clip

    if model_config:
        name = _register_config(Path(model_config).expanduser(), name)
    name = name or DEFAULT_MODEL
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().replace("/", "-") in m.lower()][:8]
        raise UserError(
            f"open_clip does not know the model {name!r}"
            + (f"; did you mean one of {close}?" if close else ";")
            + " pass --model-config CONFIG.json for a custom architecture"
        )
    local = bool(pretrained) and Path(pretrained).expanduser().is_file()
    if pretrained and not local:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            if any(sep in pretrained for sep in "/\\") or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
                raise UserError(f"--pretrained {pretrained}: no such weights file")
            raise UserError(
                f"--pretrained {pretrained!r} is neither a local weights file nor a tag open_clip knows for {name} "
                f"(tags: {tags})"
            )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but no CUDA device is available; use --device cpu")
    weights = str(Path(pretrained).expanduser()) if local else pretrained or None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except Exception as err:
        first = _first_detail(err)
        if local:  # a shape mismatch, a failed size assertion, or not a weights file at all
            raise UserError(
                f"the weights in {pretrained} do not fit the model {name}, or are not a weights file "
                f"({type(err).__name__}: {first}); give the --model / --model-config they were trained with, "
                "or weights of this architecture"
            ) from err
        if pretrained:  # downloads fail offline: say what to do instead
            raise UserError(
                f"could not fetch the {pretrained!r} weights for {name} ({type(err).__name__}: {first}); without "
                "network, pass --pretrained /path/to/weights (a .pt/.bin/.safetensors file)"
            ) from err
        raise
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _first_detail(err: Exception, limit: int = 200) -> str:
    """The first informative line of an error (torch's state-dict errors open with a bare header)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")
    return detail[:limit] + ("..." if len(detail) > limit else "")


# -- one run -------------------------------------------------------------------------------

TRAIN_OPTIONS = ("epochs", "lr", "batch_size", "weight_decay", "patience", "warmup_epochs", "schedule", "select", "optimizer")


def _train_config(args: argparse.Namespace, method: str) -> TrainConfig:
    overrides = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k, None) is not None}
    return preset(method, seed=args.seed, **overrides)


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            options[key] = value  # a word such as softmax=row
    return options


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_splits(args: argparse.Namespace):
    from . import data

    return data.load_data(Path(args.data).expanduser(), split_file=args.split_file, name=args.dataset)


class _Cache:
    """The feature caches of one dataset, under names that every command shares.

    ``extract`` writes what ``fit``, ``eval`` and ``bench`` read: the test split
    and the class texts of all classes once, the few-shot training and
    validation images of the base classes per (shots, seed). Every file is
    fingerprinted, so one made by another model or from other data is rebuilt.
    """

    def __init__(self, args: argparse.Namespace, model, preprocess, tokenizer, folder: Path):
        self.args, self.model, self.preprocess, self.tokenizer = args, model, preprocess, tokenizer
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def images(self, splits, part: str, tag: str, views: int = 0):
        from . import cache

        return cache.extract_image_features(
            self.model, splits, getattr(splits, part), self.preprocess, views=views,
            batch_size=self.args.extract_batch_size, device=_device(self.args),
            cache_path=self.folder / f"{tag}-{part}-v{views}.safetensors", progress=_rank() == 0,
        )

    def texts(self, splits):
        from . import cache, templates

        prompts = templates.templates_for(splits.name, self.args.template)
        return cache.encode_class_texts(
            self.model, splits.classnames, prompts, tokenizer=self.tokenizer,
            cache_path=self.folder / "all-classes.safetensors",
        )

    def few_shot_tag(self) -> str:
        return f"base-{self.args.shots}shot-seed{self.args.seed}-{self.args.rounding}"


def _cache_dir(args: argparse.Namespace, out: Path) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else out / "cache"


def run_fit(args: argparse.Namespace, *, train: bool = True) -> list[dict[str, Any]]:
    """Few-shot base-to-new: features once, train on base, evaluate base, new and all; rows for results.json.

    Rows: zero-shot CLIP and the adapter, each with ``base``, ``new`` (the new
    classes alone), ``hm`` and ``all`` (every test image among all classes).
    """
    from . import data
    from .plots import plot_adapter, plot_history
    from .train import accuracy
    from .wrapper import wrap

    out = Path(args.out)
    rank = _rank()
    splits = _load_splits(args)
    dataset = splits.name
    fewshot = data.few_shot(splits, args.shots, args.seed, save_dir=out / "split")
    everything = data.subsample_classes(fewshot, "all")
    base = data.subsample_classes(fewshot, "base", rounding=args.rounding)
    cut = base.num_classes  # base classes are labels [0, cut), new ones [cut, C)
    config = _train_config(args, args.method) if train else None
    adapter = None if train else Path(args.adapter) if args.adapter else out / "adapter.safetensors"
    if adapter is not None and not adapter.is_file():
        raise UserError(f"no adapter at {adapter}; run `rada-mma fit --out {out}` first, or give --adapter FILE")
    name = model_name(args)

    clip, preprocess, tokenizer = load_clip(args.model, args.pretrained, args.model_config, _device(args))
    model = wrap(clip, method=args.method, generator=torch.Generator().manual_seed(args.seed), **_adapter_options(args))
    model.adapter.to(_device(args))
    caches = _Cache(args, model, preprocess, tokenizer, _cache_dir(args, out))
    text = caches.texts(everything)  # (C, T, D)
    test = caches.images(everything, "test", "all")
    is_base = test.labels < cut
    base_test = (test.image[is_base], test.labels[is_base])
    new_test = (test.image[~is_base], test.labels[~is_base] - cut)
    if not len(base_test[1]) or not len(new_test[1]):
        raise UserError(
            f"{dataset}'s test split has no images of the {'base' if not len(base_test[1]) else 'new'} classes; "
            "base-to-new needs test images of every class"
        )

    model.set_classes(text_features=text[:cut])
    result = None
    if train:
        train_feats = caches.images(base, "train", caches.few_shot_tag(), views=args.views)
        val_feats = caches.images(base, "val", caches.few_shot_tag()) if base.val else None
        result = fit(
            model, train_feats.image, train_feats.labels, config=config,
            val_features=None if val_feats is None else val_feats.image,
            val_labels=None if val_feats is None else val_feats.labels,
            out_dir=out, progress=rank == 0, data_fingerprint=train_feats.fingerprint,
        )
    else:
        model.load_adapter(adapter)

    rows = []
    common = {"dataset": dataset, "seed": args.seed, "shots": args.shots, "model": name}
    for method, enabled in (("zero-shot", False), (args.method, True)):
        with model.disable_adapter() if not enabled else contextlib.nullcontext():
            model.set_classes(text_features=text[:cut])
            b = accuracy(model, *base_test)
            model.set_classes(text_features=text[cut:])
            n = accuracy(model, *new_test)
            model.set_classes(text_features=text)
            a = accuracy(model, test.image, test.labels)
        rows.append({**common, "method": method, "base": b, "new": n, "hm": harmonic_mean(b, n), "all": a})
    model.set_classes(text_features=text[:cut])
    if rank == 0:
        if train:
            model.save_adapter(out / "adapter.safetensors", overwrite=True)
            _atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            if result is not None and result.history:
                _maybe_plot(plot_history, result.history, out / "training.png", title=f"{dataset} {args.method}")
        _maybe_plot(plot_adapter, model, base_test[0], out / "adapter.png", classnames=base.classnames)
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
    """The caches ``fit`` reads: all test images and class texts; with --shots, the few-shot base split."""
    from . import data
    from .wrapper import wrap

    out = Path(args.out)
    splits = _load_splits(args)
    clip, preprocess, tokenizer = load_clip(args.model, args.pretrained, args.model_config, _device(args))
    caches = _Cache(args, wrap(clip, method="rada"), preprocess, tokenizer, _cache_dir(args, out))  # encoders only
    written = [caches.texts(splits)]
    if splits.test:
        written.append(caches.images(splits, "test", "all").image)
    if args.shots:
        fewshot = data.few_shot(splits, args.shots, args.seed, save_dir=out / "split")
        base = data.subsample_classes(fewshot, "base", rounding=args.rounding)
        written.append(caches.images(base, "train", caches.few_shot_tag(), views=args.views).image)
        if base.val:
            written.append(caches.images(base, "val", caches.few_shot_tag()).image)
    else:
        written.append(caches.images(splits, "train", "all", views=args.views).image)
        if splits.val:
            written.append(caches.images(splits, "val", "all").image)
    if _rank() == 0:
        shapes = ", ".join(str(tuple(t.shape)) for t in written)
        print(f"features {shapes} in {caches.folder}")


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
    """Every (dataset, seed, method) as one run folder; zero-shot once per (dataset, seed); one table."""
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for data_path in args.data:
        folder = Path(data_path).expanduser().name
        cache_dir = Path(args.cache_dir).expanduser() / folder if args.cache_dir else out / folder / "cache"
        for seed in args.seeds:
            for method in args.methods:
                run = argparse.Namespace(**vars(args))
                run.data, run.seed, run.method, run.cache_dir = data_path, seed, method, str(cache_dir)
                run.out = str(out / folder / f"{method.replace('+', '_')}-seed{seed}")
                for row in run_fit(run):
                    if row["method"] != "zero-shot" or method == args.methods[0]:
                        rows.append(row)
    if _rank() == 0:
        write_results(rows, out)
        print(markdown_table(rows))
        print(f"results of {len(rows)} runs in {out / 'results.json'} and {out / 'results.md'}")


# -- parser --------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, data_nargs: str | None = None) -> None:
    p.add_argument("--model", default=None, help="open_clip model name (default: the --model-config's, else ViT-B-16)")
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
    for name, kind in (("epochs", int), ("lr", float), ("batch-size", int), ("weight-decay", float), ("patience", int),
                       ("warmup-epochs", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the method's preset")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=None, help="override the method's preset")
    p.add_argument("--select", choices=("last", "best_val"), default=None, help="keep the last or the best-val epoch")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=None, help="override the method's preset")


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
    from .demo import add_demo_parser  # here: demo builds on this module

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _init_distributed()
    try:
        args.func(args)
    except (UserError, OSError, ValueError, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the error held
        print(f"rada-mma {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

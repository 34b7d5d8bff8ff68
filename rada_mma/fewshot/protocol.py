"""Few-shot runs end to end: a :class:`RunSpec` in, a run folder and result rows out.

:func:`run_base_to_new` is one run of CoOp's base-to-new protocol (what
``rada-mma fit`` and ``eval`` do), :func:`run_grid` every (dataset, seed,
method) of a benchmark (``rada-mma bench`` and the demo), and
:func:`extract` fills the feature cache they share.

>>> spec = RunSpec(data="~/data/oxford_pets", out="runs/pets-rada", model="ViT-B-16", pretrained="openai")
>>> rows = run_base_to_new(spec)            # zero-shot and RAda rows: base, new, HM, all
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import write_json
from ..wrapper import AdaptedCLIP, wrap
from . import data as fsdata
from .cache import Features, encode_class_texts, extract_image_features
from .datasets import templates_for
from .distributed import is_main
from .evaluation import harmonic_mean, write_results
from .models import load_clip, model_name
from .train import FitResult, TrainConfig, accuracy, fit, preset

__all__ = ["FeatureStore", "RunSpec", "extract", "run_base_to_new", "run_grid"]

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"


@dataclass(frozen=True)
class RunSpec:
    """Everything one few-shot run depends on; the command line builds one from its flags.

    ``options`` are adapter options (``AdapterConfig`` fields, e.g. ``alpha``);
    ``train`` overrides fields of the method's :func:`~rada_mma.fewshot.preset`.
    """

    data: str | None = None  # dataset folder (ImageFolder or CoOp layout) or split file
    out: str | None = None  # the run folder
    method: str = "rada"
    seed: int = 1  # the few-shot draw's seed and the training seed
    shots: int = 16  # per class; 0 keeps every training image
    model: str | None = None  # open_clip architecture, e.g. "ViT-B-16"
    pretrained: str | None = None  # open_clip tag, weights file, or "random"
    model_config: str | None = None  # a local open_clip JSON config
    split_file: str | None = None  # CoOp split_zhou_<Dataset>.json when not found in data
    dataset: str | None = None  # dataset name for templates and class-name fixes (default: detected)
    templates: tuple[str, ...] | None = None  # prompt templates with {} (default: the dataset's)
    views: int = 0  # augmented views per training image in the cache
    rounding: str = "ceil"  # base classes: ceil(C/2) (CoOp) or floor (MMA)
    cache_dir: str | None = None  # feature cache folder (default OUT/cache)
    extract_batch_size: int = 128
    device: str | None = None  # default: cuda when available
    options: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # evaluation only: the adapter file (default OUT/adapter.safetensors)
    progress: bool = True

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @property
    def device_name(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def out_dir(self) -> Path:
        if not self.out:
            raise ValueError("the run has no out folder; give out=<run folder>")
        return Path(self.out).expanduser()

    def train_config(self) -> TrainConfig:
        """The method's preset with this run's seed and overrides."""
        return preset(self.method, **{"seed": self.seed, **self.train})

    def cache_folder(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else self.out_dir / "cache"


# -- data and features -----------------------------------------------------------------------


@dataclass
class _Data:
    """A run's data: every class (for zero-shot rows and the test split) and the base half it trains on."""

    everything: fsdata.Splits
    base: fsdata.Splits

    @property
    def cut(self) -> int:  # base classes are labels [0, cut), new ones [cut, C)
        return self.base.num_classes


def load_splits(spec: RunSpec) -> fsdata.Splits:
    if not spec.data:
        raise ValueError("the run has no data; give data=<dataset folder or split file>")
    return fsdata.load_data(Path(spec.data).expanduser(), split_file=spec.split_file, name=spec.dataset)


def _base_to_new_data(spec: RunSpec) -> _Data:
    splits = load_splits(spec)
    drawn = fsdata.few_shot(splits, spec.shots, spec.seed, save_dir=spec.out_dir / "split")
    base = fsdata.subsample_classes(drawn, "base", rounding=spec.rounding)
    return _Data(everything=drawn, base=base)


class FeatureStore:
    """The feature caches of one dataset, under names that ``extract``, ``fit``, ``eval`` and ``bench`` share.

    The test split and the class texts of all classes are cached once; the
    few-shot training and validation images of the base classes per (shots,
    seed, rounding). Every file is fingerprinted, so one made by another model
    or from other data is rebuilt, never reused.
    """

    def __init__(self, spec: RunSpec, model: AdaptedCLIP, preprocess: Callable, tokenizer: Callable):
        self.spec, self.model, self.preprocess, self.tokenizer = spec, model, preprocess, tokenizer
        self.folder = spec.cache_folder()
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def few_shot_tag(self) -> str:
        s = self.spec
        return f"base-{s.shots}shot-seed{s.seed}-{s.rounding}"

    def images(self, splits: fsdata.Splits, part: str, tag: str, views: int = 0) -> Features:
        return extract_image_features(
            self.model, splits, splits.split(part), self.preprocess, views=views,
            batch_size=self.spec.extract_batch_size, device=self.spec.device_name,
            cache_path=self.folder / f"{tag}-{part}-v{views}.safetensors", progress=self.spec.progress and is_main(),
        )

    def templates(self, splits: fsdata.Splits) -> list[str]:
        """The run's prompt templates: ``--template``'s, else the dataset's."""
        return templates_for(splits.name, list(self.spec.templates) if self.spec.templates else None)

    def texts(self, splits: fsdata.Splits) -> Tensor:
        """Raw class text features ``(C, T, D)`` of every class in the run's templates."""
        return encode_class_texts(
            self.model, splits.classnames, self.templates(splits), tokenizer=self.tokenizer,
            cache_path=self.folder / "all-classes.safetensors",
        )


def _wrapped(spec: RunSpec) -> tuple[AdaptedCLIP, Callable, Callable]:
    clip, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    generator = torch.Generator().manual_seed(spec.seed)
    # the base's name and weights travel into the adapter file: `rada-mma predict` needs no --model then
    model = wrap(clip, method=spec.method, generator=generator, base_name=model_name(spec.model, spec.model_config),
                 pretrained=spec.pretrained, **dict(spec.options))
    model.adapter.to(spec.device_name)
    return model, preprocess, tokenizer


# -- one run -----------------------------------------------------------------------------------


def run_base_to_new(spec: RunSpec, *, train: bool = True) -> list[dict[str, Any]]:
    """CoOp's base-to-new protocol: features once, train on the base classes, evaluate base, new and all.

    Args:
        spec: the run.
        train: ``False`` evaluates the adapter in ``spec.adapter`` (default
            ``OUT/adapter.safetensors``) instead of training one.

    Returns:
        Rows for ``results.json``: zero-shot CLIP and the adapter, each with
        ``base``, ``new`` (the new classes alone), ``hm`` and ``all`` (every
        test image among all classes), in percent.
    """
    adapter_file = None if train else Path(spec.adapter).expanduser() if spec.adapter else spec.out_dir / ADAPTER_FILE
    if adapter_file is not None and not adapter_file.is_file():
        raise FileNotFoundError(
            f"no adapter at {adapter_file}; train one first (rada-mma fit --out {spec.out}), or give adapter=FILE"
        )
    config = spec.train_config() if train else None
    run_data = _base_to_new_data(spec)
    model, preprocess, tokenizer = _wrapped(spec)
    store = FeatureStore(spec, model, preprocess, tokenizer)
    text = store.texts(run_data.everything)  # (C, T, D)
    test = store.images(run_data.everything, "test", "all")
    _check_test_covers_both_halves(run_data, test)
    model.set_classes(text_features=text[: run_data.cut])
    result = None
    if train:
        result = _train(spec, model, store, run_data.base, config)
    else:
        model.load_adapter(adapter_file)
    rows = _evaluate(spec, model, text, test, run_data)
    # the base classes, named: the adapter file carries them (rada-mma predict, rada_mma.load)
    model.set_classes(text_features=text[: run_data.cut], names=run_data.base.classnames,
                      templates=store.templates(run_data.everything))
    if is_main():
        _write_run(spec, model, config, result, rows, run_data, test)
    return rows


def _check_test_covers_both_halves(run_data: _Data, test: Features) -> None:
    is_base = test.labels < run_data.cut
    for half, present in (("base", bool(is_base.any())), ("new", bool((~is_base).any()))):
        if not present:
            raise ValueError(
                f"{run_data.everything.name}'s test split has no images of the {half} classes; base-to-new needs "
                "test images of every class"
            )


def _train(spec: RunSpec, model: AdaptedCLIP, store: FeatureStore, base: fsdata.Splits, config: TrainConfig) -> FitResult:
    train = store.images(base, "train", store.few_shot_tag, views=spec.views)
    val = store.images(base, "val", store.few_shot_tag) if base.val else None
    return fit(
        model, train.image, train.labels, config=config,
        val_features=None if val is None else val.image, val_labels=None if val is None else val.labels,
        out_dir=spec.out_dir, progress=spec.progress and is_main(), data_fingerprint=train.fingerprint,
    )


def _evaluate(spec: RunSpec, model: AdaptedCLIP, text: Tensor, test: Features, run_data: _Data) -> list[dict[str, Any]]:
    """Zero-shot and adapted rows: base and new classes apart, then all classes together."""
    cut = run_data.cut
    is_base = test.labels < cut
    parts = {
        "base": (text[:cut], test.image[is_base], test.labels[is_base]),
        "new": (text[cut:], test.image[~is_base], test.labels[~is_base] - cut),
        "all": (text, test.image, test.labels),
    }
    common = {
        "dataset": run_data.everything.name,
        "seed": spec.seed,
        "shots": spec.shots,
        "model": model_name(spec.model, spec.model_config),
    }
    rows = []
    for method, enabled in (("zero-shot", False), (spec.method, True)):
        scores = {}
        with contextlib.nullcontext() if enabled else model.disable_adapter():
            for part, (classes, images, labels) in parts.items():
                model.set_classes(text_features=classes)
                scores[part] = accuracy(model, images, labels)
        hm = harmonic_mean(scores["base"], scores["new"])
        rows.append({**common, "method": method, "base": scores["base"], "new": scores["new"], "hm": hm,
                     "all": scores["all"]})
    return rows


def _write_run(spec: RunSpec, model: AdaptedCLIP, config: TrainConfig | None, result: FitResult | None,
               rows: list[dict[str, Any]], run_data: _Data, test: Features) -> None:
    """The run folder: adapter, training configuration, plots, results."""
    from .plots import plot_adapter, plot_history

    out = spec.out_dir
    if config is not None:
        model.save_adapter(out / ADAPTER_FILE, overwrite=True, include_classes=True)
        write_json(out / "train_config.json", dataclasses.asdict(config))
        if result is not None and result.history:
            _maybe_plot(plot_history, result.history, out / "training.png", title=f"{run_data.everything.name} {spec.method}")
    base_images = test.image[test.labels < run_data.cut]
    _maybe_plot(plot_adapter, model, base_images, out / "adapter.png", classnames=run_data.base.classnames)
    write_results(rows, out)


def _maybe_plot(fn: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except ImportError as err:
        log.warning("%s; skipping %s", err, args[-1] if args else "plot")


# -- many runs ---------------------------------------------------------------------------------


def run_folder(out: Path, dataset: str, method: str, seed: int) -> Path:
    """Where one run of a grid writes: ``OUT/<dataset>/<method>-seed<seed>`` (``+`` written ``_``)."""
    return out / dataset / f"{method.replace('+', '_')}-seed{seed}"


def run_grid(
    spec: RunSpec,
    datasets: Sequence[tuple[str, str | None]],
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    on_run: Callable[[RunSpec], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (dataset, seed, method) as one :func:`run_base_to_new`; zero-shot once per (dataset, seed).

    Args:
        spec: what every run shares (model, shots, options, ...); ``data``,
            ``dataset``, ``method``, ``seed`` and ``out`` are set per run.
        datasets: ``(data folder, dataset name or None)`` pairs.
        methods, seeds: the grid.
        out: runs go to ``OUT/<dataset folder>/<method>-seed<seed>``; all runs of
            a dataset share ``OUT/<dataset folder>/cache`` (or
            ``spec.cache_dir/<dataset folder>``), so each image is encoded once.
        on_run: called with each run's spec before it starts (progress reports).

    Returns:
        The rows, also written to ``OUT/results.json`` and ``OUT/results.md``, and
        drawn in ``OUT/results.png`` (base / new / HM per method, spread over seeds).
    """
    out = Path(out).expanduser()
    rows: list[dict[str, Any]] = []
    for data_path, name in datasets:
        folder = name or Path(data_path).expanduser().name
        cache = Path(spec.cache_dir).expanduser() / folder if spec.cache_dir else out / folder / "cache"
        for seed in seeds:
            for index, method in enumerate(methods):
                run = spec.replace(data=str(data_path), dataset=name, method=method, seed=seed,
                                   out=str(run_folder(out, folder, method, seed)), cache_dir=str(cache))
                if on_run is not None:
                    on_run(run)
                rows += [r for r in run_base_to_new(run) if r["method"] != "zero-shot" or index == 0]
    if is_main():
        from .plots import plot_summary

        write_results(rows, out)
        _maybe_plot(plot_summary, rows, out / "results.png")
    return rows


def extract(spec: RunSpec) -> list[Tensor]:
    """Fill the cache ``fit``, ``eval`` and ``bench`` read: the class texts and test images of every class,
    and the few-shot training (and validation) images of the base classes (every training image when
    ``spec.shots`` is 0). Returns the feature tensors."""
    splits = load_splits(spec)
    model, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    store = FeatureStore(spec, wrap(model, method="rada"), preprocess, tokenizer)  # the encoders only
    written = [store.texts(splits)]
    if splits.test:
        written.append(store.images(splits, "test", "all").image)
    if spec.shots:
        drawn = fsdata.few_shot(splits, spec.shots, spec.seed, save_dir=spec.out_dir / "split")
        part, tag = fsdata.subsample_classes(drawn, "base", rounding=spec.rounding), store.few_shot_tag
    else:
        part, tag = splits, "all"
    written.append(store.images(part, "train", tag, views=spec.views).image)
    if part.val:
        written.append(store.images(part, "val", tag).image)
    return written

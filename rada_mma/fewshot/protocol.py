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
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import write_json
from ..wrapper import AdaptedCLIP, wrap
from . import data as fsdata
from . import runs
from .cache import DATA_HASHES, Features, default_augment, encode_class_texts, extract_image_features
from .datasets import templates_for
from .distributed import is_main
from .evaluation import harmonic_mean, write_results
from .models import load_clip, model_name
from .record import RUN_RECORD, read_run_record, write_run_record
from .runs import ADAPTER_FILE
from .train import RELEASED_PROMPT, FitResult, TrainConfig, accuracy, fit, preset

__all__ = [
    "DRAWS",
    "RUN_RECORD",
    "FeatureStore",
    "RunSpec",
    "adapter_templates",
    "base_classes",
    "dataset_runs",
    "few_shot_all",
    "extract",
    "maybe_plot",
    "recorded_templates",
    "run_base_to_new",
    "run_folder",
    "run_grid",
    "saved_adapter",
    "train_on_store",
    "trained_record",
    "wrap_clip",
    "wrapped_model",
    "write_training",
    "zero_shot_templates",
]

log = logging.getLogger(__name__)

DRAWS = ("coop", "mma")  # CoOp's few-shot draw, or MMA's (data.mma_draw)



@dataclass(frozen=True)
class RunSpec:
    """Everything one few-shot run depends on; the command line builds one from its flags.

    ``options`` are adapter options (``AdapterConfig`` fields, e.g. ``alpha``);
    ``train`` overrides fields of the method's :func:`~rada_mma.fewshot.preset`
    (among them what the training images look like: ``views``, ``crop_scale``,
    ``interpolation``; the adapter's ``prompt``; ``extract_amp``). What a run
    resolved all of this to is its :func:`run_record`, written as ``run.json``.
    """

    data: str | None = None  # dataset folder (ImageFolder or CoOp layout) or split file
    out: str | None = None  # the run folder
    method: str = "rada"
    seed: int = 1  # the few-shot draw's seed, the training seed and the augmented views' seed
    shots: int = 16  # per class; 0 keeps every training image
    model: str | None = None  # open_clip architecture, e.g. "ViT-B-16"
    pretrained: str | None = None  # open_clip tag, weights file, or "random"
    model_config: str | None = None  # a local open_clip JSON config
    split_file: str | None = None  # CoOp split_zhou_<Dataset>.json when not found in data
    dataset: str | None = None  # dataset name for templates and class-name fixes (default: detected)
    # prompt templates with {}, for the adapter and the zero-shot rows alike (default: the adapter's
    # come from its preset's prompt, "a photo of a {}." for RAda; zero-shot rows use the dataset's CoOp template)
    templates: tuple[str, ...] | None = None
    draw: str = "coop"  # few-shot draw: "coop" (Dassl's, then base/new) or "mma" (base classes, then MMA's draw)
    rounding: str | None = None  # base classes: "ceil" (CoOp's ceil(C/2)) or "floor" (MMA's); None: the draw's
    cache_dir: str | None = None  # feature cache folder (default OUT/cache)
    data_hash: str = "content"  # image files in the cache's fingerprint: every byte, or "stat" (size, mtime)
    extract_batch_size: int = 128
    device: str | None = None  # default: cuda when available
    options: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # evaluation only: the adapter file (default OUT/adapter.safetensors)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seed", "shots", "extract_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.seed < 1 << 63:
            raise ValueError(f"seed must lie in [0, 2**63) (torch's generators take 64 bits), got {self.seed}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0 (0: every image), got {self.shots}")
        if self.extract_batch_size < 1:
            raise ValueError(f"extract_batch_size must be >= 1, got {self.extract_batch_size}")
        if self.data_hash not in DATA_HASHES:
            raise ValueError(f"data_hash must be one of {', '.join(DATA_HASHES)}, got {self.data_hash!r}")

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

    @property
    def base_rounding(self) -> str:
        """How many classes are base: the run's ``rounding``, else the draw's own (CoOp ceil, MMA floor)."""
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(map(repr, DRAWS))}, got {self.draw!r}")
        return self.rounding or ("floor" if self.draw == "mma" else "ceil")

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
    return _Data(everything=splits, base=base_classes(spec, splits))


def base_classes(spec: RunSpec, splits: fsdata.Splits) -> fsdata.Splits:
    """The base classes' few-shot training (and validation) items, drawn as ``spec.draw`` says.

    CoOp draws K shots of every class first and keeps the base half second;
    MMA keeps the base half first (``floor(C/2)``) and draws second (:func:`~rada_mma.fewshot.data.mma_draw`).
    """
    save_dir = spec.out_dir / "split"
    rounding = spec.base_rounding
    if spec.draw == "mma":
        return fsdata.mma_draw(fsdata.subsample_classes(splits, "base", rounding=rounding), spec.shots, spec.seed,
                               save_dir=save_dir)
    drawn = fsdata.few_shot(splits, spec.shots, spec.seed, save_dir=save_dir)
    return fsdata.subsample_classes(drawn, "base", rounding=rounding)


def few_shot_all(spec: RunSpec, splits: fsdata.Splits) -> fsdata.Splits:
    """Every class's few-shot training (and validation) items, drawn as ``spec.draw`` says (the all-class setting)."""
    save_dir = spec.out_dir / "split"
    if spec.draw == "mma":
        return fsdata.mma_draw(splits, spec.shots, spec.seed, save_dir=save_dir)
    return fsdata.few_shot(splits, spec.shots, spec.seed, save_dir=save_dir)


def adapter_templates(spec: RunSpec, config: TrainConfig, dataset: str | None) -> list[str]:
    """The adapter's class prompts: ``spec.templates``, else the preset's (RAda's released prompt or the dataset's)."""
    if spec.templates:
        return templates_for(dataset, list(spec.templates))
    return [RELEASED_PROMPT] if config.prompt == "released" else templates_for(dataset)


def zero_shot_templates(spec: RunSpec, dataset: str | None) -> list[str]:
    """Zero-shot CLIP's prompts: ``spec.templates``, else the dataset's CoOp template (how 69.34 / 74.22 were made)."""
    return templates_for(dataset, list(spec.templates) if spec.templates else None)


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
        self.sealed: set[str] = set()  # parts that may not be read now (see seal)

    @contextlib.contextmanager
    def seal(self, part: str) -> Iterator[None]:
        """Within the block, reading ``part``'s features (``"test"``) is an error, from the cache or not.

        A sweep selects its configuration with the test split sealed: nothing of it is read before the
        selection has ended.
        """
        self.sealed.add(part)
        try:
            yield
        finally:
            self.sealed.discard(part)

    @property
    def few_shot_tag(self) -> str:
        s = self.spec
        draw = "-mma" if s.draw == "mma" else ""
        return f"base-{s.shots}shot-seed{s.seed}-{s.base_rounding}{draw}"

    @property
    def all_classes_tag(self) -> str:
        """The few-shot draw of every class (the all-class setting's training images)."""
        return f"all-{self.spec.shots}shot-seed{self.spec.seed}"

    def images(self, splits: fsdata.Splits, part: str, tag: str, config: TrainConfig | None = None) -> Features:
        """Features of ``splits``' ``part``; the training part with ``config``'s augmented views.

        Files are named by what tells them apart within a folder: draw, part, views and
        their crop, bf16; everything else is in their fingerprint.
        """
        if part in self.sealed:
            raise PermissionError(f"the {part} split is sealed: its features may not be read now (a sweep reads "
                                  "them only once it has selected its configuration on the validation split)")
        views = config.view_count if config is not None and part == "train" else 0
        augment = None
        if views:
            augment = default_augment(self.preprocess, scale=(config.crop_scale, 1.0), interpolation=config.interpolation)
        return extract_image_features(
            self.model, splits, splits.split(part), self.preprocess, views=views, augment=augment,
            seed=self.spec.seed, autocast=self._amp(config), batch_size=self.spec.extract_batch_size,
            device=self.spec.device_name, data_hash=self.spec.data_hash,
            cache_path=self.folder / self.cache_name(part, tag, config), progress=self.spec.progress and is_main(),
        )

    def cache_name(self, part: str, tag: str, config: TrainConfig | None = None) -> str:
        """The file :meth:`images` keeps these features in: two calls with the same name read the same features."""
        views = config.view_count if config is not None and part == "train" else 0
        name = f"{tag}-{part}-v{views}"
        if views:
            name += f"-rrc{config.crop_scale:g}-{config.interpolation}"
        return f"{name}{'-bf16' if self._amp(config) else ''}.safetensors"

    def _amp(self, config: TrainConfig | None) -> bool:
        return (config.extract_amp if config is not None else True) and torch.device(self.spec.device_name).type == "cuda"

    def texts(self, splits: fsdata.Splits, templates: Sequence[str]) -> Tensor:
        """Raw class text features ``(C, T, D)`` of every class in ``templates`` (one cache file per template set)."""
        key = hashlib.sha256(json.dumps(list(templates)).encode()).hexdigest()[:12]
        return encode_class_texts(
            self.model, splits.classnames, templates, tokenizer=self.tokenizer,
            cache_path=self.folder / f"all-classes-{key}.safetensors",
        )


def wrapped_model(spec: RunSpec) -> tuple[AdaptedCLIP, Callable, Callable]:
    clip, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    return wrap_clip(spec, clip), preprocess, tokenizer


def wrap_clip(spec: RunSpec, clip: torch.nn.Module) -> AdaptedCLIP:
    """``spec``'s adapter on ``clip`` (loaded once, wrapped any number of times), its weights drawn from ``spec.seed``."""
    generator = torch.Generator().manual_seed(spec.seed)
    # the base's name and weights travel into the adapter file: `rada-mma predict` needs no --model then
    model = wrap(clip, method=spec.method, generator=generator, base_name=model_name(spec.model, spec.model_config),
                 pretrained=spec.pretrained, **dict(spec.options))
    model.adapter.to(spec.device_name)
    return model


# -- one run -----------------------------------------------------------------------------------


def run_base_to_new(spec: RunSpec, *, train: bool = True) -> list[dict[str, Any]]:
    """CoOp's base-to-new protocol: features once, train on the base classes, evaluate base, new and all.

    Args:
        spec: the run.
        train: ``False`` evaluates the adapter in ``spec.adapter`` (default
            ``OUT/adapter.safetensors``) instead of training one, with the prompts
            its run recorded in ``run.json`` beside it (else its preset's).

    Returns:
        Rows for ``results.json``: zero-shot CLIP and the adapter, each with
        ``base``, ``new`` (the new classes alone), ``hm`` and ``all`` (every
        test image among all classes), in percent. A training run also writes
        ``run.json`` (:func:`run_record`).
    """
    adapter_file = None if train else saved_adapter(spec)
    config = spec.train_config()
    # one process per run folder; an evaluation of another adapter writes a folder of its own
    with runs.claim(spec, train=train, adapter=adapter_file) as spec:
        return _base_to_new(spec, config, adapter_file)


def _base_to_new(spec: RunSpec, config: TrainConfig, adapter_file: Path | None) -> list[dict[str, Any]]:
    train = adapter_file is None  # else: evaluate that adapter
    run_data = _base_to_new_data(spec)
    model, preprocess, tokenizer = wrapped_model(spec)
    store = FeatureStore(spec, model, preprocess, tokenizer)
    name = run_data.everything.name
    prompts = (adapter_templates(spec, config, name) if train else recorded_templates(spec, config, name, adapter_file),
               zero_shot_templates(spec, name))
    text = store.texts(run_data.everything, prompts[0])  # (C, T, D)
    zero_text = text if prompts[1] == prompts[0] else store.texts(run_data.everything, prompts[1])
    test = store.images(run_data.everything, "test", "all", config)
    _check_test_covers_both_halves(run_data, test)
    model.set_classes(text_features=text[: run_data.cut])
    result = None
    if train:
        result, features = train_on_store(spec, model, store, run_data.base, config)
    else:
        model.load_adapter(adapter_file)
    rows = _evaluate(spec, model, {"zero-shot": zero_text, spec.method: text}, test, run_data)
    # the base classes, named: the adapter file carries them (rada-mma predict, rada_mma.load)
    model.set_classes(text_features=text[: run_data.cut], names=run_data.base.classnames, templates=prompts[0])
    if is_main():
        _write_run(spec, model, config if train else None, result, rows, run_data, test)
        if train:
            write_run_record(
                spec, spec.out_dir, config=config, adapter=model.adapter.config, setting="base2new", dataset=name,
                prompt_templates=prompts[0], zero_shot_templates=prompts[1], **trained_record(result, features),
            )
    return rows


def recorded_templates(spec: RunSpec, config: TrainConfig, dataset: str, adapter_file: Path) -> list[str]:
    """An adapter's prompts for evaluation on its own dataset: ``spec.templates``, else those its ``run.json``
    records, else the preset's."""
    if not spec.templates:
        try:
            recorded = (read_run_record(adapter_file.parent) or {}).get("prompt_templates")
        except ValueError:
            recorded = None
        if isinstance(recorded, list) and recorded and all(isinstance(t, str) for t in recorded):
            return recorded
        log.warning("%s records no prompt templates; evaluating with the %s preset's", adapter_file.parent, spec.method)
    return adapter_templates(spec, config, dataset)


def saved_adapter(spec: RunSpec) -> Path:
    """The adapter an evaluation loads: ``spec.adapter``, else ``OUT/adapter.safetensors``; an error when missing."""
    path = Path(spec.adapter).expanduser() if spec.adapter else spec.out_dir / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {path}; train one first (rada-mma fit --out {spec.out}), or give adapter=FILE")
    return path


def trained_record(result: FitResult, features: Features) -> dict[str, Any]:
    """What ``run.json`` adds for a run that trained: its training images, their fingerprint, and the
    validation accuracy of the adapter it wrote (``None`` without a val split), the number a sweep selects on."""
    val = result.val_acc
    return {"train_images": len(features), "data_fingerprint": features.fingerprint,
            "val_acc": None if math.isnan(val) else val}


def _check_test_covers_both_halves(run_data: _Data, test: Features) -> None:
    is_base = test.labels < run_data.cut
    for half, present in (("base", bool(is_base.any())), ("new", bool((~is_base).any()))):
        if not present:
            raise ValueError(
                f"{run_data.everything.name}'s test split has no images of the {half} classes; base-to-new needs "
                "test images of every class"
            )


def train_on_store(
    spec: RunSpec, model: AdaptedCLIP, store: FeatureStore, base: fsdata.Splits, config: TrainConfig,
    tag: str | None = None,
) -> tuple[FitResult, Features]:
    """:func:`fit` on the cached features of ``base``'s few-shot train (and val) images (cache ``tag``, default
    the base-to-new draw's), the training images with ``config``'s augmented views; the result and the
    training features."""
    tag = tag or store.few_shot_tag
    train = store.images(base, "train", tag, config)
    val = store.images(base, "val", tag, config) if base.val else None
    result = fit(
        model, train.image, train.labels, config=config,
        val_features=None if val is None else val.image, val_labels=None if val is None else val.labels,
        out_dir=spec.out_dir, progress=spec.progress and is_main(), data_fingerprint=train.fingerprint,
    )
    return result, train


def _evaluate(
    spec: RunSpec, model: AdaptedCLIP, texts: Mapping[str, Tensor], test: Features, run_data: _Data
) -> list[dict[str, Any]]:
    """Zero-shot and adapted rows, each with its own class texts: base and new classes apart, then all together."""
    cut = run_data.cut
    is_base = test.labels < cut
    common = {
        "dataset": run_data.everything.name,
        "seed": spec.seed,
        "shots": spec.shots,
        "model": model_name(spec.model, spec.model_config),
    }
    rows = []
    for method, text in texts.items():
        parts = {
            "base": (text[:cut], test.image[is_base], test.labels[is_base]),
            "new": (text[cut:], test.image[~is_base], test.labels[~is_base] - cut),
            "all": (text, test.image, test.labels),
        }
        scores = {}
        with model.disable_adapter() if method == "zero-shot" else contextlib.nullcontext():
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
    from .plots import plot_adapter

    out = spec.out_dir
    write_training(spec, model, config, result, title=f"{run_data.everything.name} {spec.method}")
    base_images = test.image[test.labels < run_data.cut]
    maybe_plot(plot_adapter, model, base_images, out / "adapter.png", classnames=run_data.base.classnames)
    write_results(rows, out)


def write_training(spec: RunSpec, model: AdaptedCLIP, config: TrainConfig | None, result: FitResult | None, *,
                   title: str) -> None:
    """A trained run's adapter, training configuration and training curves (nothing for an evaluation)."""
    from .plots import plot_history

    if config is not None:
        # with the classes it was trained for, named: rada-mma predict and rada_mma.load use them as they are
        model.save_adapter(spec.out_dir / ADAPTER_FILE, overwrite=True, include_classes=True)
        write_json(spec.out_dir / "train_config.json", dataclasses.asdict(config))
        if result is not None and result.history:
            maybe_plot(plot_history, result.history, spec.out_dir / "training.png", title=title)


def maybe_plot(fn: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except ImportError as err:
        log.warning("%s; skipping %s", err, args[-1] if args else "plot")


# -- many runs ---------------------------------------------------------------------------------


def run_folder(out: Path, dataset: str, method: str, seed: int) -> Path:
    """Where one run of a grid writes: ``OUT/<dataset>/<method>-seed<seed>`` (``+`` written ``_``)."""
    return out / dataset / f"{method.replace('+', '_')}-seed{seed}"


def dataset_runs(spec: RunSpec, datasets: Sequence[tuple[str, str | None]], out: Path) -> list[tuple[str, str | None, str, Path]]:
    """Per ``(data, name)`` of a grid: the data, its name, its folder under ``out`` (the name, else the data
    folder's) and the feature cache its runs share (``out/<folder>/cache``, or ``spec.cache_dir/<folder>``)."""
    runs = []
    for data_path, name in datasets:
        folder = name or Path(data_path).expanduser().name
        cache = Path(spec.cache_dir).expanduser() / folder if spec.cache_dir else out / folder / "cache"
        runs.append((str(data_path), name, folder, cache))
    return runs


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
        Each row's ``run`` is its run folder relative to ``OUT`` (its ``run.json``
        says what it ran); the table links every row to them.
    """
    out = Path(out).expanduser()
    rows: list[dict[str, Any]] = []
    with runs.hold(out):  # each run holds its own folder too
        for data_path, name, folder, cache in dataset_runs(spec, datasets, out):
            for seed in seeds:
                for index, method in enumerate(methods):
                    run = spec.replace(data=str(data_path), dataset=name, method=method, seed=seed,
                                       out=str(run_folder(out, folder, method, seed)), cache_dir=str(cache))
                    if on_run is not None:
                        on_run(run)
                    link = Path(run.out).relative_to(out).as_posix()  # results.md links each row to its run folder
                    rows += [{**r, "run": link} for r in run_base_to_new(run) if r["method"] != "zero-shot" or index == 0]
        if is_main():
            from .plots import plot_summary

            write_results(rows, out)
            maybe_plot(plot_summary, rows, out / "results.png")
    return rows


def extract(spec: RunSpec, *, setting: str = "base2new") -> list[Tensor]:
    """Fill the cache ``fit``, ``eval`` and ``bench`` read: the class texts (the adapter's and zero-shot's
    prompts) and test images of every class, and the few-shot training (with the preset's augmented
    views) and validation images of the base classes (of every class with ``setting="all"``; every
    training image, un-augmented, when ``spec.shots`` is 0). Returns the feature tensors."""
    splits = load_splits(spec)
    config = spec.train_config()
    model, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    store = FeatureStore(spec, wrap(model, method="rada"), preprocess, tokenizer)  # the encoders only
    with runs.hold(spec.out_dir) if spec.out else contextlib.nullcontext():
        templates = {tuple(adapter_templates(spec, config, splits.name)), tuple(zero_shot_templates(spec, splits.name))}
        written = [store.texts(splits, list(t)) for t in sorted(templates)]
        if splits.test:
            written.append(store.images(splits, "test", "all", config).image)
        if not splits.train:  # a test-only dataset (a target such as ImageNet-A) has nothing more to encode
            return written
        if spec.shots and setting == "all":
            part, tag = few_shot_all(spec, splits), store.all_classes_tag
        elif spec.shots:
            part, tag = base_classes(spec, splits), store.few_shot_tag
        else:
            part, tag, config = splits, "all", dataclasses.replace(config, views=0)
        written.append(store.images(part, "train", tag, config).image)
        if part.val:
            written.append(store.images(part, "val", tag, config).image)
    return written

"""The papers' other protocols, from a :class:`~rada_mma.fewshot.RunSpec`: few-shot on every class,
cross-dataset transfer and domain generalisation (test-time training is in :mod:`.tta`).

- **All classes** (CoOp's ``SUBSAMPLE_CLASSES all``): :func:`run_all_classes` draws K shots per class
  with Dassl's sampler, trains on every class and scores the test split among every class (``rada-mma fit
  --setting all``); :func:`run_shot_sweep` repeats it over shots, seeds and methods (``bench --setting all``).
- **Transfer** (CoOp's cross-dataset protocol, and domain generalisation when the targets are a source's
  shifted domains): :func:`run_transfer` evaluates a trained adapter on every class of a target; the
  adapter is class-set agnostic, the target's classes are set at evaluation (``rada-mma eval --adapter
  RUN/adapter.safetensors --data TARGET``). :func:`run_transfer_grid` trains on the source and evaluates
  every target (``bench --setting cross-dataset`` or ``dg``).
- :func:`evaluate` is ``rada-mma eval``: the setting is the adapter's unless given.

Each run writes the folder base-to-new writes (adapter, ``run.json``, ``results.json``, ``results.md``,
plots); rows carry ``setting`` and ``accuracy`` (:mod:`.evaluation` lays them out as the papers do).

>>> src = RunSpec(data="~/data/imagenet", out="runs/in-rada", model="ViT-B-16", pretrained="openai")
>>> run_all_classes(src)                                              # 16 shots, all 1000 classes
>>> run_transfer(src.replace(data="~/data/imagenet-adversarial", out="runs/in-rada-a",
...                          adapter="runs/in-rada/adapter.safetensors"))  # its 200 classes
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..wrapper import AdaptedCLIP
from . import runs
from .cache import Features
from .distributed import is_main
from .evaluation import write_results
from .models import model_name
from .protocol import (
    ADAPTER_FILE,
    FeatureStore,
    RunSpec,
    adapter_templates,
    dataset_runs,
    few_shot_all,
    load_splits,
    maybe_plot,
    recorded_templates,
    run_base_to_new,
    run_folder,
    saved_adapter,
    train_on_store,
    trained_record,
    wrapped_model,
    write_training,
    zero_shot_templates,
)
from .record import read_run_record, write_run_record
from .train import TrainConfig, accuracy

__all__ = [
    "BENCH_SETTINGS",
    "adapter_setting",
    "evaluate",
    "run_all_classes",
    "run_shot_sweep",
    "run_transfer",
    "run_transfer_grid",
    "train_source",
    "trained_run",
]

log = logging.getLogger(__name__)

# ``bench --setting``: what each runs, and the ``setting`` its rows carry
BENCH_SETTINGS: dict[str, str] = {
    "base2new": "base2new",
    "all": "all",
    "cross-dataset": "transfer",
    "dg": "dg",
    "tta": "tta",
}


# -- one run -------------------------------------------------------------------------------------


def _accuracies(model: AdaptedCLIP, test: Features, zero_text: Tensor, text: Tensor) -> tuple[float, float]:
    """Zero-shot accuracy with its class texts, then the adapter's with its own (``(C, T, D)`` each)."""
    model.set_classes(text_features=zero_text)
    with model.disable_adapter():
        zero = accuracy(model, test.image, test.labels)
    model.set_classes(text_features=text)
    return zero, accuracy(model, test.image, test.labels)


def _rows(spec: RunSpec, common: dict[str, Any], zero: float, adapted: float, shots: int) -> list[dict[str, Any]]:
    """Zero-shot's row and the adapter's: ``common`` (setting, dataset, source), then the run, then the score."""
    model = model_name(spec.model, spec.model_config)
    return [{**common, "method": method, "seed": spec.seed, "shots": k, "model": model, "accuracy": score}
            for method, k, score in (("zero-shot", 0, zero), (spec.method, shots, adapted))]


def _write(spec: RunSpec, model: AdaptedCLIP, rows: list[dict[str, Any]], test: Features, classnames: list[str], *,
           config: TrainConfig | None = None, result: Any = None, **record: Any) -> None:
    """The run folder: adapter and training curves (when trained), ``adapter.png``, results, ``run.json``."""
    from .plots import plot_adapter

    spec.out_dir.mkdir(parents=True, exist_ok=True)
    write_training(spec, model, config, result, title=f"{rows[0]['dataset']} {spec.method}")
    maybe_plot(plot_adapter, model, test.image, spec.out_dir / "adapter.png", classnames=classnames)
    write_results(rows, spec.out_dir)
    write_run_record(spec, spec.out_dir, config=config, adapter=model.adapter.config, **record)


def run_all_classes(spec: RunSpec, *, train: bool = True) -> list[dict[str, Any]]:
    """Few-shot on every class: K shots per class (Dassl's draw, saved in ``OUT/split``), train, test on all.

    Args:
        spec: the run; ``spec.shots`` per class (the papers: 1, 2, 4, 8, 16).
        train: ``False`` evaluates the adapter in ``spec.adapter`` (default ``OUT/adapter.safetensors``).

    Returns:
        A ``zero-shot`` row and the adapter's: ``setting: "all"``, ``accuracy`` in percent on the test split
        among every class, ``shots`` (0 for zero-shot), ``classes``.
    """
    adapter_file = None if train else saved_adapter(spec)
    config = spec.train_config()
    with runs.claim(spec, train=train, adapter=adapter_file) as spec:  # one process per run folder
        return _all_classes(spec, config, adapter_file)


def _all_classes(spec: RunSpec, config: TrainConfig, adapter_file: Path | None) -> list[dict[str, Any]]:
    train = adapter_file is None  # else: evaluate that adapter
    splits = few_shot_all(spec, load_splits(spec))
    model, preprocess, tokenizer = wrapped_model(spec)
    store = FeatureStore(spec, model, preprocess, tokenizer)
    prompts = (adapter_templates(spec, config, splits.name) if train
               else recorded_templates(spec, config, splits.name, adapter_file), zero_shot_templates(spec, splits.name))
    text, zero_text = store.texts(splits, prompts[0]), store.texts(splits, prompts[1])
    test = store.images(splits, "test", "all", config)
    model.set_classes(text_features=text)
    result = features = None
    if train:
        result, features = train_on_store(spec, model, store, splits, config, tag=store.all_classes_tag)
    else:
        model.load_adapter(adapter_file)
    common = {"setting": "all", "dataset": splits.name, "classes": splits.num_classes}
    rows = _rows(spec, common, *_accuracies(model, test, zero_text, text), shots=spec.shots)
    # the classes, named: the adapter file carries them (rada-mma predict, rada_mma.load)
    model.set_classes(text_features=text, names=splits.classnames, templates=prompts[0])
    if is_main() and not (adapter_file is not None and _own_folder(spec, adapter_file)):
        trained = {} if features is None else trained_record(result, features)
        _write(spec, model, rows, test, splits.classnames, config=config if train else None, result=result,
               setting="all", dataset=splits.name, prompt_templates=prompts[0], zero_shot_templates=prompts[1],
               **trained)
    elif is_main():
        write_results(rows, spec.out_dir)  # re-evaluated in its own folder: the training record stays
    return rows


def _own_folder(spec: RunSpec, adapter_file: Path) -> bool:
    return adapter_file.parent.resolve() == spec.out_dir.resolve()


def run_transfer(spec: RunSpec, *, source: str | None = None, setting: str = "transfer") -> list[dict[str, Any]]:
    """Evaluate a trained adapter on every class of another dataset's test split (CoOp's cross-dataset protocol).

    The target's classes are its own (ImageNet-A's 200, in ImageNet's order); the adapter, class-set agnostic,
    meets them at evaluation. On the source's own data this gives the source run's all-class accuracy.

    Args:
        spec: ``data`` the target, ``adapter`` the trained adapter (default ``OUT/adapter.safetensors``),
            ``method`` its method.
        source: the dataset the adapter was trained on; default: the ``run.json`` beside the adapter says.
        setting: ``"transfer"`` or ``"dg"`` (domain generalisation: the targets are the source's shifted domains).

    Returns:
        A ``zero-shot`` row and the adapter's, with ``setting``, ``source`` and ``accuracy``.
    """
    if setting not in ("transfer", "dg"):
        raise ValueError(f"setting must be 'transfer' or 'dg', got {setting!r}")
    adapter_file = saved_adapter(spec)
    trained = read_run_record(adapter_file.parent) or {}
    source = source or trained.get("dataset")
    if not source:
        raise ValueError(
            f"{adapter_file.parent} has no run.json naming the dataset the adapter was trained on; give source=NAME"
        )
    with runs.claim(spec, train=False, adapter=adapter_file) as spec:  # one process per run folder
        return _transfer(spec, adapter_file, source, setting, trained)


def _transfer(spec: RunSpec, adapter_file: Path, source: str, setting: str,
              trained: dict[str, Any]) -> list[dict[str, Any]]:
    splits = load_splits(spec)
    log.info("%s adapter %s (trained on %s) on %s: %d test images, %d classes", setting, adapter_file, source,
             splits.name, len(splits.test), splits.num_classes)
    model, preprocess, tokenizer = wrapped_model(spec)
    store = FeatureStore(spec, model, preprocess, tokenizer)
    # the adapter meets the target with its preset's kind of prompt (RAda's released one on every dataset,
    # MMA's the target's own template); zero-shot CLIP with the target's template
    prompts = (adapter_templates(spec, spec.train_config(), splits.name), zero_shot_templates(spec, splits.name))
    text, zero_text = store.texts(splits, prompts[0]), store.texts(splits, prompts[1])
    test = store.images(splits, "test", "all")
    model.set_classes(text_features=text)
    model.load_adapter(adapter_file)
    common = {"setting": setting, "source": source, "dataset": splits.name, "classes": splits.num_classes}
    rows = _rows(spec, common, *_accuracies(model, test, zero_text, text), shots=trained.get("shots", spec.shots))
    if is_main():
        _write(spec, model, rows, test, splits.classnames, setting=setting, dataset=splits.name, source=source,
               prompt_templates=prompts[0], zero_shot_templates=prompts[1], adapter_file=str(adapter_file),
               adapter_run=trained or None)
    return rows


def adapter_setting(spec: RunSpec) -> str:
    """The setting ``rada-mma eval`` runs for ``spec``'s adapter: base-to-new for a base-to-new adapter (or one
    without ``run.json``); for an adapter trained on every class, ``"all"`` in its own run folder and
    ``"transfer"`` anywhere else (another dataset, or the source's test set seen as a target)."""
    adapter_file = saved_adapter(spec)
    trained = (read_run_record(adapter_file.parent) or {}).get("setting", "base2new")
    if trained == "base2new":
        return "base2new"
    return "all" if _own_folder(spec, adapter_file) else "transfer"


def evaluate(spec: RunSpec, *, setting: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
    """``rada-mma eval``: the adapter of ``spec`` (``spec.adapter`` or ``OUT/adapter.safetensors``) on ``spec.data``.

    Args:
        spec: the run.
        setting: ``"base2new"``, ``"all"``, ``"transfer"`` or ``"dg"``; default :func:`adapter_setting`.
        source: for transfer rows, the adapter's training dataset (default: its ``run.json``).
    """
    setting = setting or adapter_setting(spec)
    if setting == "base2new":
        return run_base_to_new(spec, train=False)
    if setting == "all":
        return run_all_classes(spec, train=False)
    if setting in ("transfer", "dg"):
        return run_transfer(spec, source=source, setting=setting)
    raise ValueError(f"eval's setting must be base2new, all, transfer or dg, got {setting!r} (test-time training: tta=)")


# -- many runs -------------------------------------------------------------------------------------


def trained_run(spec: RunSpec, out: Path, folder: str, method: str, seed: int, shots: int) -> RunSpec:
    """The all-class run of ``method`` that a sweep or a transfer grid trains: ``OUT/<folder>/<method>-<K>shot-seed<N>``."""
    return spec.replace(method=method, seed=seed, shots=shots, out=str(run_folder(out, folder, f"{method}-{shots}shot", seed)))


def train_source(spec: RunSpec, source: tuple[str, str | None, str, Path], out: Path, method: str, seed: int,
                 on_run: Callable[[RunSpec], None] | None = None) -> tuple[RunSpec, list[dict[str, Any]]]:
    """The all-class run on a grid's source (a :func:`~rada_mma.fewshot.protocol.dataset_runs` entry) that its
    transfer or test-time runs start from: its spec and rows (a finished run resumes from its checkpoint)."""
    data_path, name, folder, cache = source
    trained = trained_run(spec.replace(data=data_path, dataset=name, cache_dir=str(cache)), out, folder, method, seed,
                          spec.shots)
    if on_run is not None:
        on_run(trained)
    return trained, run_all_classes(trained)


def run_shot_sweep(
    spec: RunSpec,
    datasets: Sequence[tuple[str, str | None]],
    *,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    on_run: Callable[[RunSpec], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (dataset, seed, shots, method) as one :func:`run_all_classes`; zero-shot once per (dataset, seed).

    Each K is its own draw from the seed (Dassl draws K images per class with ``random.sample`` from a
    generator seeded once, so the 1-shot draw is not the first image of the 16-shot draw).

    Returns:
        The rows, also in ``OUT/results.json`` and ``OUT/results.md`` (a column per K) and drawn in
        ``OUT/results.png`` (accuracy against shots, the spread over seeds shaded).
    """
    from .plots import plot_shots

    out, rows = Path(out).expanduser(), []
    for data_path, name, folder, cache in dataset_runs(spec, datasets, out):
        shared = spec.replace(data=data_path, dataset=name, cache_dir=str(cache))
        for seed, (k_index, k), (index, method) in itertools.product(seeds, enumerate(shots), enumerate(methods)):
            run = trained_run(shared, out, folder, method, seed, k)
            if on_run is not None:
                on_run(run)
            first = index == 0 and k_index == 0  # zero-shot depends on neither the shots nor the method
            rows += [r for r in run_all_classes(run) if r["method"] != "zero-shot" or first]
    if is_main():
        write_results(rows, out)
        maybe_plot(plot_shots, rows, out / "results.png")
    return rows


def _as_target(rows: list[dict[str, Any]], source: str, setting: str) -> list[dict[str, Any]]:
    """All-class rows of the source run as the source column of a transfer table (equal by construction: tested)."""
    return [{**r, "setting": setting, "source": source} for r in rows]


def run_transfer_grid(
    spec: RunSpec,
    source: tuple[str, str | None],
    targets: Sequence[tuple[str, str | None]],
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    setting: str = "transfer",
    on_run: Callable[[RunSpec], None] | None = None,
) -> list[dict[str, Any]]:
    """Train on every class of ``source`` (``spec.shots`` shots), then evaluate on every target, per method and seed.

    Args:
        spec: what every run shares.
        source, targets: ``(data folder, dataset name or None)``.
        methods, seeds: the grid.
        out: source runs in ``OUT/<source>/<method>-<K>shot-seed<N>`` (what :func:`run_shot_sweep` writes, so a
            sweep in the same folder is reused), target evaluations in ``OUT/<target>/<method>-from-<source>-seed<N>``.
        setting: ``"transfer"`` (cross-dataset) or ``"dg"`` (domain generalisation).
        on_run: called with each run's spec before it starts.

    Returns:
        The rows (the source's own test accuracy as its column), also in ``OUT/results.{json,md,png}``.
    """
    from .plots import plot_targets

    out = Path(out).expanduser()
    src, *target_runs = dataset_runs(spec, [source, *targets], out)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for index, method in enumerate(methods):
            trained, source_rows = train_source(spec, src, out, method, seed, on_run)
            name = source_rows[0]["dataset"]
            rows += _as_target([r for r in source_rows if r["method"] != "zero-shot" or index == 0], name, setting)
            for data_path, target, folder, cache in target_runs:
                run = spec.replace(data=data_path, dataset=target, method=method, seed=seed, cache_dir=str(cache),
                                   adapter=str(trained.out_dir / ADAPTER_FILE),
                                   out=str(run_folder(out, folder, f"{method}-from-{src[2]}", seed)))
                if on_run is not None:
                    on_run(run)
                rows += [r for r in run_transfer(run, source=name, setting=setting)
                         if r["method"] != "zero-shot" or index == 0]
    if is_main():
        write_results(rows, out)
        title = "domain generalisation" if setting == "dg" else "cross-dataset transfer"
        maybe_plot(plot_targets, rows, out / "results.png", title=f"{title} from {rows[0]['source']}")
    return rows

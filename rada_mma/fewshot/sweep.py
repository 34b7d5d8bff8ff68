"""Sweeps: every configuration of a grid trained on one feature cache, selected on validation only, tested once.

:func:`run_sweep` (``rada-mma sweep``) encodes a dataset's few-shot training images (with their
augmented views) and validation images once, trains every configuration of a :class:`Grid` of training
settings and adapter options for every seed on those features, and selects the configuration with the
best mean validation accuracy over the seeds (ties: the first in grid order). Only then is the test split
read: the selected configuration runs as ``rada-mma fit`` runs it, once per seed, and its test rows are
the sweep's results.

- **The test split is sealed** until the selection has ended (:meth:`FeatureStore.seal`): nothing of it is
  read, not even from the cache. In base-to-new the selection trains and validates on the base classes
  only; no image of a new class is read before the final runs.
- **Resumable**: each finished (configuration, seed) is written atomically to ``OUT/scores/``, keyed by
  everything its score depends on; an interrupted sweep continues where it stopped and selects the same
  configuration.
- **Parallel**: configurations are independent, so ``workers`` processes (CPU) and ``torchrun`` ranks share
  them. On the CPU each configuration trains on one torch thread wherever it runs, so its score does not
  depend on how the work was shared: parallel sweeps equal serial ones.

A sweep's folder ``OUT``: ``sweep.json`` (every configuration's validation accuracy per seed),
``sweep.md`` (the same as a table), ``sweep.png`` (validation accuracy over the grid), ``best.json`` (the
selected configuration: ``rada-mma fit --config OUT/best.json``, or ``RunSpec(..., **load_best(path))``),
``results.json`` / ``results.md`` (test rows of the selected configuration, and zero-shot CLIP's),
``best-seed<N>/`` (each seed's run of the selected configuration, a ``fit`` run folder), ``scores/``
and ``cache/``.

>>> spec = RunSpec(data="~/data/dtd", out="runs/dtd-sweep", model="ViT-B-16", pretrained="openai")
>>> sweep = run_sweep(spec, {"lr": [1e-4, 1e-3, 1e-2], "alpha": [0, 0.1]}, seeds=(1, 2, 3))
>>> sweep.best["train"], sweep.rows                     # the selected lr, and its test rows
>>> rows = run_base_to_new(spec.replace(out="runs/dtd-best", **load_best("runs/dtd-sweep/best.json")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..config import METHODS, AdapterConfig, option_names, parse_field
from ..io import write_json, write_text
from ..wrapper import wrap
from . import data as fsdata
from . import runs
from .cache import Features
from .distributed import broadcast_object, gather_objects, is_main, rank_world, single_process
from .evaluation import write_results
from .models import load_clip
from .protocol import (
    FeatureStore,
    RunSpec,
    adapter_templates,
    base_classes,
    dataset_runs,
    few_shot_all,
    load_splits,
    maybe_plot,
    run_base_to_new,
    wrap_clip,
)
from .record import read_run_record
from .settings import run_all_classes
from .train import TrainConfig, TrainingDiverged, fit

__all__ = [
    "BEST_FILE",
    "SWEEP_FILE",
    "SWEEP_SETTINGS",
    "Grid",
    "Sweep",
    "grid_keys",
    "load_best",
    "read_best",
    "run_sweep",
    "run_sweeps",
    "select_configuration",
    "sweep_table",
]

log = logging.getLogger(__name__)

SWEEP_SETTINGS = ("base2new", "all")  # what a sweep selects for: fit's settings
SWEEP_FILE, BEST_FILE, SCORES = "sweep.json", "best.json", "scores"
SWEEP_FORMAT, BEST_FORMAT, SCORE_FORMAT = "rada_mma.sweep", "rada_mma.sweep_best", "rada_mma.sweep_score"
# the RunSpec fields best.json sets (RunSpec(..., **load_best(path))); "setting" is fit's --setting
BEST_FIELDS = ("method", "options", "train", "shots", "draw", "rounding", "templates")


def grid_keys(method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a grid of ``method`` may sweep: every training setting (:class:`TrainConfig` field but the seed,
    which is the sweep's ``seeds``), and every adapter option of the method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"), option_names(method)


def _check_key(method: str, key: str) -> bool:
    """Whether ``key`` is a training setting (``True``) or an adapter option (``False``) of ``method``."""
    train, options = grid_keys(method)
    if key == "seed":
        raise ValueError("seed is not a grid key: every configuration trains with each of the sweep's seeds (--seeds)")
    if key not in train + options:
        spelled = [", ".join(k.replace("_", "-") for k in keys) for keys in (train, options)]  # - or _ alike
        raise ValueError(f"unknown grid key {key!r}: sweep a training setting ({spelled[0]}) or an option of {method} "
                         f"({spelled[1]})")
    return key in train


@dataclass(frozen=True)
class Grid:
    """A sweep's configurations: every combination of the keys' values, in grid order (the first key varies
    slowest, as in ``itertools.product``). Keys are training settings or adapter options (:func:`grid_keys`).

    Example:
        >>> grid = Grid.parse("rada", ["lr=1e-3,1e-2", "softmax=flat,row"])
        >>> grid.points()[:2]
        [{'lr': 0.001, 'softmax': 'flat'}, {'lr': 0.001, 'softmax': 'row'}]
    """

    method: str
    values: Mapping[str, Sequence[Any]]

    def __post_init__(self) -> None:
        if not isinstance(self.values, Mapping) or not self.values:
            raise ValueError("the grid is empty; give each key to sweep with its values, e.g. {'lr': [1e-4, 1e-3]}")
        values = {}
        for key, given in self.values.items():
            key = key.replace("-", "_")  # warmup-epochs, as the command line spells it, is warmup_epochs
            _check_key(self.method, key)
            if key in values:
                raise ValueError(f"grid key {key} is given twice; list all its values once")
            if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given:
                raise ValueError(f"grid key {key} needs a non-empty list of values, got {given!r}")
            repeated = [v for i, v in enumerate(given) if v in given[:i]]
            if repeated:
                raise ValueError(f"grid key {key} lists {repeated[0]!r} twice")
            values[key] = tuple(given)
        object.__setattr__(self, "values", values)

    @classmethod
    def parse(cls, method: str, items: Sequence[str]) -> Grid:
        """The grid of ``KEY=V1,V2,...`` items (the command line's ``--grid``), each value read with its
        field's type (:func:`rada_mma.config.parse_field`)."""
        values: dict[str, tuple[Any, ...]] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key or not text.strip():
                raise ValueError(f"--grid takes KEY=V1,V2,... (e.g. lr=1e-4,1e-3), got {item!r}")
            if key in values:
                raise ValueError(f"grid key {key} is given twice; list all its values in one --grid {key}=...")
            kind = TrainConfig if _check_key(method, key) else AdapterConfig
            values[key] = tuple(parse_field(kind, key, value) for value in text.split(","))
        return cls(method=method, values=values)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.values)

    def points(self) -> list[dict[str, Any]]:
        """Every configuration, in grid order, as ``{key: value}``."""
        return [dict(zip(self.keys, combo, strict=True)) for combo in itertools.product(*self.values.values())]

    def apply(self, spec: RunSpec, point: Mapping[str, Any]) -> RunSpec:
        """``spec`` with the configuration ``point``: its training settings and adapter options set."""
        train = {k: v for k, v in point.items() if _check_key(self.method, k)}
        options = {k: v for k, v in point.items() if k not in train}
        return spec.replace(train={**spec.train, **train}, options={**spec.options, **options})

    def to_json(self) -> dict[str, list[Any]]:
        return {key: list(values) for key, values in self.values.items()}


@dataclass
class Sweep:
    """What :func:`run_sweep` did: each configuration's validation accuracies, the selection, the test rows.

    ``configurations[i]`` holds ``index``, ``values`` (the grid keys' values), ``val_acc`` (seed ->
    validation accuracy in percent of the weights training kept; ``None`` where it diverged), ``mean``
    (over the seeds; ``None`` when a seed diverged) and ``diverged`` (seed -> why). ``best`` is what
    ``best.json`` holds; ``rows`` the test rows of the selected configuration's runs and of zero-shot CLIP.
    """

    folder: Path
    configurations: list[dict[str, Any]]
    selected: int
    best: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def select_configuration(means: Sequence[float | None]) -> int:
    """The index of the highest mean validation accuracy; a tie goes to the first in grid order, and a
    configuration that diverged on a seed (``None``) is never selected.

    Example:
        >>> select_configuration([70.0, 75.0, None, 75.0])
        1
    """
    best = None
    for index, mean in enumerate(means):
        if mean is not None and (best is None or mean > means[best]):
            best = index
    if best is None:
        raise TrainingDiverged("every configuration of the sweep diverged on some seed; sweep lower learning rates")
    return best


# -- the selection: training and validation features only ------------------------------------------


@dataclass(frozen=True)
class _Task:
    """One training of the sweep: configuration ``index`` with ``seed``, and the keys of what it reads."""

    index: int
    seed: int
    train: tuple[int, str]  # (seed, cache file) of its training features
    val: tuple[int, str]
    text: tuple[str, ...]  # its prompt templates
    key: str = ""  # what its score depends on, hashed: the name of its score file


@dataclass
class _Selection:
    """What every training of a sweep reads: the CLIP (wrapped again for each training), each seed's few-shot
    training and validation features, the class texts of the classes trained on. Nothing of the test split is
    read: ``splits`` lists its items (the dataset's index), and the stores that encode are sealed against it."""

    spec: RunSpec
    grid: Grid
    clip: nn.Module
    splits: fsdata.Splits
    points: list[dict[str, Any]]
    encoders: Any = None  # the frozen CLIP wrapped for encoding, its preprocessing and tokenizer (parent only)
    features: dict[tuple[int, str], Features] = field(default_factory=dict)
    texts: dict[tuple[str, ...], Tensor] = field(default_factory=dict)
    tasks: list[_Task] = field(default_factory=list)

    def run(self, task: _Task) -> RunSpec:
        return self.grid.apply(self.spec, self.points[task.index]).replace(seed=task.seed)

    @property
    def dataset(self) -> str:
        return self.splits.name

    def store(self, seed: int) -> FeatureStore:
        """The feature cache as seed ``seed``'s runs read it (their draw is kept in :func:`seed_folder`)."""
        return FeatureStore(self.spec.replace(seed=seed, out=str(seed_folder(self.spec.out_dir, seed))), *self.encoders)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker gets what trainings read, not the encoders
        return {**self.__dict__, "encoders": None}


def seed_folder(out: Path, seed: int) -> Path:
    """Where seed ``seed`` of a sweep keeps its few-shot draw and its run of the selected configuration."""
    return out / f"best-seed{seed}"


def _selection_split(spec: RunSpec, splits: fsdata.Splits, setting: str, store: FeatureStore) -> tuple[fsdata.Splits, str]:
    """The few-shot training and validation items the selection reads (base classes only in base-to-new),
    with no test items, and their cache tag."""
    if setting == "all":
        part, tag = few_shot_all(spec, splits), store.all_classes_tag
    else:
        part, tag = base_classes(spec, splits), store.few_shot_tag
    if not part.val:
        raise ValueError(f"{splits.name} has no validation images to select on; give --shots K > 0 (a validation "
                         "split of min(K, 4) per class is drawn) or data with a val split")
    return dataclasses.replace(part, test=[]), tag


def _load_seed(state: _Selection, store: FeatureStore, splits: fsdata.Splits, setting: str) -> None:
    """Encode (or read from the cache) what seed ``store.spec.seed``'s trainings read; add its tasks."""
    seed = store.spec.seed
    part, tag = _selection_split(store.spec, splits, setting, store)
    for index, point in enumerate(state.points):
        run = state.grid.apply(store.spec, point)
        config = run.train_config()
        task = _Task(index, seed, (seed, store.cache_name("train", tag, config)),
                     (seed, store.cache_name("val", tag, config)), tuple(adapter_templates(run, config, splits.name)))
        for (key, part_name) in ((task.train, "train"), (task.val, "val")):
            if key not in state.features:  # each file read once, shared by every configuration that reads it
                state.features[key] = store.images(part, part_name, tag, config)
        if task.text not in state.texts:  # the classes trained on: the base half in base-to-new
            state.texts[task.text] = store.texts(splits, task.text)[: part.num_classes]
        state.tasks.append(dataclasses.replace(task, key=_score_key(state, task, run, config)))


def _score_key(state: _Selection, task: _Task, run: RunSpec, config: TrainConfig) -> str:
    """A digest of everything a training's score depends on: a score file with this name is its score."""
    text = state.texts[task.text]
    return hashlib.sha256(json.dumps({
        "version": __version__, "method": run.method, "options": dict(sorted(run.options.items())),
        "train": dataclasses.asdict(config), "device": torch.device(run.device_name).type,
        "train_data": state.features[task.train].fingerprint, "val_data": state.features[task.val].fingerprint,
        "text": hashlib.sha256(text.contiguous().numpy().tobytes()).hexdigest(), "classes": text.shape[0],
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _prepare(spec: RunSpec, grid: Grid, seeds: Sequence[int], setting: str) -> _Selection:
    """Load the CLIP and every seed's training and validation features, with the test split sealed."""
    clip, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    encoders = wrap(clip, method="rada")  # the frozen encoders fill the cache, as extract() does
    state = _Selection(spec=spec, grid=grid, clip=clip, splits=load_splits(spec), points=grid.points(),
                       encoders=(encoders, preprocess, tokenizer))
    _check_points(state, encoders.adapter.config.dim)
    for seed in seeds:
        store = state.store(seed)
        with store.seal("test"):
            _load_seed(state, store, state.splits, setting)
    return state


def _check_points(state: _Selection, dim: int) -> None:
    """Every configuration is valid before anything trains: a bad value is an error naming its configuration."""
    for point in state.points:
        run = state.grid.apply(state.spec, point)
        try:
            run.train_config()
            AdapterConfig.for_method(run.method, dim, **dict(run.options))
        except (TypeError, ValueError) as err:
            raise type(err)(f"configuration {_describe(point)}: {err}") from None


def _describe(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in point.items())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- training every configuration --------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread(device: str) -> Iterator[None]:
    """One torch thread on the CPU: a configuration's weights then do not depend on how many run at once
    (matrix products split over threads round differently)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(state: _Selection, task: _Task) -> dict[str, Any]:
    """Train one configuration with one seed as ``fit`` would (no checkpoint); the validation accuracy of the
    weights it keeps, or why it diverged."""
    run = state.run(task)
    config = run.train_config()
    train, val = state.features[task.train], state.features[task.val]
    with single_process(), _one_thread(run.device_name):
        model = wrap_clip(run, state.clip)
        model.set_classes(text_features=state.texts[task.text])
        try:
            result = fit(model, train.image, train.labels, config=config, val_features=val.image,
                         val_labels=val.labels, progress=False, data_fingerprint=train.fingerprint)
        except TrainingDiverged as err:
            return {"val_acc": None, "diverged": " ".join(str(err).split())}
    return {"val_acc": result.val_acc, "epoch": result.best_epoch, "epochs_run": len(result.history),
            "train_loss": result.history[-1]["train_loss"]}


_WORKER: _Selection | None = None  # a worker process's copy of the selection (inherited when forked)


def _start_worker(state: _Selection) -> None:
    global _WORKER
    _WORKER = state
    torch.set_num_threads(1)


def _score_in_worker(task: _Task) -> dict[str, Any]:
    return _score(_WORKER, task)


def _run_tasks(state: _Selection, tasks: list[_Task], workers: int, done: Callable[[_Task, dict], None]) -> None:
    """Score ``tasks``, ``workers`` at a time in worker processes (forked where the system can: they share the
    parent's features without copying them); ``done`` gets each result as it comes."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            done(task, _score(state, task))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_start_worker,
                               initargs=(state,))
    try:
        futures = {pool.submit(_score_in_worker, task): task for task in tasks}
        for future in as_completed(futures):
            done(futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_scores(folder: Path, tasks: list[_Task]) -> dict[str, dict[str, Any]]:
    """The scores finished before (an interrupted sweep's), by task key."""
    scores = {}
    for task in tasks:
        path = folder / f"{task.key}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("format") == SCORE_FORMAT:
            scores[task.key] = {k: v for k, v in record.items() if k not in ("format", "configuration", "seed")}
        else:
            log.warning("%s is not a sweep score; training its configuration again", path)
    return scores


def _train_all(state: _Selection, workers: int) -> dict[str, dict[str, Any]]:
    """Every task's score: those already in ``OUT/scores``, the others trained (shared among ranks and
    workers) and each written there as it finishes."""
    folder = state.spec.out_dir / SCORES
    folder.mkdir(parents=True, exist_ok=True)
    scores = broadcast_object(_read_scores(folder, state.tasks) if is_main() else None)
    rank, world = rank_world()
    pending = [t for t in state.tasks if t.key not in scores]
    mine = pending[rank::world]
    log.info("sweep of %s: %d of %d trainings already scored in %s; %d to train (%d here)", state.dataset,
             len(state.tasks) - len(pending), len(state.tasks), folder, len(pending), len(mine))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"sweep {state.dataset}", unit="run", disable=not (state.spec.progress and is_main()))
    finished = {}

    def done(task: _Task, score: dict[str, Any]) -> None:
        write_json(folder / f"{task.key}.json", {"format": SCORE_FORMAT, "configuration": state.points[task.index],
                                                  "seed": task.seed, **score})
        finished[task.key] = score
        bar.update()

    try:
        _run_tasks(state, mine, workers, done)
    finally:
        bar.close()
    for share in gather_objects(finished):
        scores.update(share)
    return scores


def _configurations(state: _Selection, scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration, in grid order: its values, validation accuracy per seed, mean, and divergences."""
    out = [{"index": i, "values": point, "val_acc": {}, "mean": None, "diverged": {}}
           for i, point in enumerate(state.points)]
    for task in state.tasks:
        score, entry = scores[task.key], out[task.index]
        entry["val_acc"][str(task.seed)] = score["val_acc"]
        if score.get("diverged"):
            entry["diverged"][str(task.seed)] = score["diverged"]
    for entry in out:
        accs = list(entry["val_acc"].values())
        if None not in accs:
            entry["mean"] = sum(accs) / len(accs)
    return out


# -- outputs ---------------------------------------------------------------------------------------


def _best(state: _Selection, configurations: list[dict[str, Any]], selected: int, setting: str,
          seeds: Sequence[int]) -> dict[str, Any]:
    """``best.json``: the selected configuration as the RunSpec fields (and ``fit`` flags) that make it."""
    spec, entry = state.spec, configurations[selected]
    run = state.grid.apply(spec, entry["values"])
    return {
        "format": BEST_FORMAT, "dataset": state.dataset, "setting": setting, "method": run.method,
        "options": dict(run.options), "train": dict(run.train), "shots": spec.shots, "draw": spec.draw,
        "rounding": spec.rounding, "templates": list(spec.templates) if spec.templates else None,
        "selected": {"configuration": selected, "values": entry["values"], "val_acc_mean": entry["mean"],
                     "val_acc": entry["val_acc"]},
        "grid": state.grid.to_json(), "seeds": list(seeds),
    }


def sweep_table(configurations: Sequence[dict[str, Any]], keys: Sequence[str], selected: int) -> str:
    """The validation accuracies of a sweep as a markdown table: a row per configuration, a column per seed."""
    seeds = list(configurations[0]["val_acc"])
    lines = ["| # | " + " | ".join(keys) + " | " + " | ".join(f"val, seed {s}" for s in seeds) + " | mean | |",
             "|---:|" + "---:|" * len(keys) + "---:|" * len(seeds) + "---:|---|"]
    for c in configurations:
        accs = ["diverged" if c["val_acc"][s] is None else f"{c['val_acc'][s]:.2f}" for s in seeds]
        mean = "—" if c["mean"] is None else f"{c['mean']:.2f}"
        mark = "**selected**" if c["index"] == selected else ""
        lines.append(f"| {c['index']} | " + " | ".join(_fmt(c["values"][k]) for k in keys) + " | " + " | ".join(accs)
                     + f" | {mean} | {mark} |")
    caption = ("Validation accuracy (%) of the weights each configuration's training kept, per seed, and their mean. "
               "The selected configuration has the best mean (ties: the first in grid order); the test split was read "
               "only after the selection, by the selected configuration's runs.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _write_selection(state: _Selection, identity: dict[str, Any], configurations: list[dict[str, Any]],
                     best: dict[str, Any]) -> None:
    from .plots import plot_sweep

    out, selected = state.spec.out_dir, best["selected"]["configuration"]
    write_json(out / SWEEP_FILE, {"format": SWEEP_FORMAT, "identity": identity, "dataset": state.dataset,
                                  "method": state.spec.method, "grid": state.grid.to_json(),
                                  "seeds": best["seeds"], "configurations": configurations, "selected": selected})
    write_text(out / "sweep.md", sweep_table(configurations, state.grid.keys, selected))
    write_json(out / BEST_FILE, best)
    maybe_plot(plot_sweep, configurations, state.grid.to_json(), selected, out / "sweep.png",
               title=f"{state.dataset} {state.spec.method}: validation accuracy, seeds {', '.join(map(str, best['seeds']))}")


def _identity(spec: RunSpec, grid: Grid, seeds: Sequence[int], setting: str) -> dict[str, Any]:
    """What a sweep depends on: another sweep's folder is not taken over (JSON-normalised, as read back)."""
    fields = runs.run_fields(spec)
    fields.pop("seed")
    fields["train"].pop("seed")
    identity = {"setting": setting, "grid": grid.to_json(), "seeds": list(seeds), "run": fields}
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _may_write(out: Path, identity: dict[str, Any]) -> None:
    """A sweep writes a new folder, its own, or one another sweep left unfinished; never another finished sweep."""
    path = out / SWEEP_FILE
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); restore or delete it") from err
    if not isinstance(record, dict) or record.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path} is not a rada_mma sweep record; choose another out folder")
    theirs = record.get("identity")
    if theirs == identity:
        return
    changed = sorted(k for k in set(identity) | set(theirs or {}) if (theirs or {}).get(k) != identity.get(k))
    if record.get("selected") is not None:
        raise FileExistsError(f"{out} holds another finished sweep (its {', '.join(changed)} differ); choose another "
                              "out folder, or delete that one to start over")
    log.warning("%s holds an unfinished sweep with other %s; this sweep takes the folder over", out, ", ".join(changed))


# -- the sweep ---------------------------------------------------------------------------------------


def run_sweep(
    spec: RunSpec,
    grid: Grid | Mapping[str, Sequence[Any]],
    *,
    seeds: Sequence[int] = (1, 2, 3),
    setting: str = "base2new",
    workers: int = 1,
) -> Sweep:
    """Train every configuration of ``grid`` with every seed, select on validation only, then test the selected one.

    Args:
        spec: what every configuration shares (data, model, method, shots, training settings and adapter
            options that are not swept, ...); ``spec.out`` is the sweep's folder (its feature cache is
            ``OUT/cache`` unless ``spec.cache_dir``).
        grid: a :class:`Grid`, or ``{key: [values]}`` of training settings and adapter options of ``spec.method``.
            A key may not also be set in ``spec.train`` or ``spec.options``.
        seeds: every configuration trains once per seed (the few-shot draw, the views and the training seed).
        setting: ``"base2new"`` (select on the base classes' validation images; test base and new) or ``"all"``.
        workers: configurations trained at a time in worker processes (CPU only).

    Returns:
        :class:`Sweep`. The selection is the configuration with the best mean validation accuracy over the
        seeds (ties: the first in grid order); until it is made the test split is sealed, and afterwards the
        selected configuration runs once per seed as ``fit`` runs it (``OUT/best-seed<N>``).
    """
    grid = grid if isinstance(grid, Grid) else Grid(method=spec.method, values=grid)
    _check_sweep(spec, grid, seeds, setting, workers)
    spec = spec.replace(cache_dir=str(spec.cache_folder()))  # one cache for the selection and the final runs
    identity = _identity(spec, grid, seeds, setting)
    with runs.hold(spec.out_dir):
        _on_main(lambda: _may_write(spec.out_dir, identity))
        state = _prepare(spec, grid, seeds, setting)
        configurations = _configurations(state, _train_all(state, workers))
        selected = select_configuration([c["mean"] for c in configurations])
        best = _best(state, configurations, selected, setting, seeds)
        if is_main():
            _write_selection(state, identity, configurations, best)
        # the selection has ended: now the test split is read, by the selected configuration's runs
        if torch.device(spec.device_name).type == "cpu":
            state.store(seeds[0]).images(state.splits, "test", "all")  # encoded with every thread, trained on one
        del state
        with _one_thread(spec.device_name):  # as the sweep trained it: the same weights
            rows = _final_runs(spec, best, seeds, setting, configurations[selected])
        if is_main():
            write_results(rows, spec.out_dir)
    return Sweep(folder=spec.out_dir, configurations=configurations, selected=selected, best=best, rows=rows)


def _on_main(fn: Callable[[], None]) -> None:
    """``fn()`` on rank 0; its error raised on every rank."""
    failure = None
    if is_main():
        try:
            fn()
        except (OSError, ValueError) as err:
            failure = err
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure


def _check_sweep(spec: RunSpec, grid: Grid, seeds: Sequence[int], setting: str, workers: int) -> None:
    if grid.method != spec.method:
        raise ValueError(f"the grid is for method {grid.method!r} but the run's method is {spec.method!r}")
    if setting not in SWEEP_SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SWEEP_SETTINGS)}, got {setting!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    fixed = {**spec.train, **spec.options}
    both = [k for k in grid.keys if k in fixed]
    if both:
        raise ValueError(f"{both[0]} is both a grid key and a fixed setting ({_fmt(fixed[both[0]])}); drop one of them")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if workers > 1 and torch.device(spec.device_name).type != "cpu":
        raise ValueError(f"workers={workers} runs configurations in CPU processes; on GPUs run one process per GPU "
                         "with torchrun (the configurations are shared among its ranks)")


def _final_runs(spec: RunSpec, best: dict[str, Any], seeds: Sequence[int], setting: str,
                entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The selected configuration, once per seed, as ``rada-mma fit --config OUT/best.json`` runs it: the first
    reading of the test split. Rows of zero-shot CLIP and of the adapter, each linked to its run folder.

    Under ``torchrun`` the ranks share the seeds, each run in one process, as the sweep trained it."""
    rank, world = rank_world()
    done, failure = {}, None
    with single_process():
        for seed in seeds[rank::world]:
            try:
                done[seed] = _final_run(spec.replace(progress=spec.progress and rank == 0), best, seed, setting,
                                        entry["val_acc"][str(seed)])
            except (OSError, ValueError) as err:  # raised on every rank below, so that none waits forever
                failure = failure or err
                break
    for share, error in gather_objects((done, failure)):
        if error is not None:
            raise error
        done.update(share)
    return [row for seed in seeds for row in done[seed]]


def _final_run(spec: RunSpec, best: dict[str, Any], seed: int, setting: str, swept: float) -> list[dict[str, Any]]:
    run_fn = run_all_classes if setting == "all" else run_base_to_new
    folder = seed_folder(spec.out_dir, seed)
    rows = [{**r, "run": folder.name} for r in run_fn(spec.replace(seed=seed, out=str(folder), **_spec_fields(best)))]
    final = (read_run_record(folder) or {}).get("val_acc")
    if final != swept:
        log.warning("seed %d's run of the selected configuration reached %s%% validation accuracy, its training in the "
                    "sweep %s%%: training is not reproducible bit for bit here (a GPU's non-deterministic kernels?)",
                    seed, final, swept)
    return rows


def run_sweeps(
    spec: RunSpec,
    datasets: Sequence[tuple[str, str | None]],
    grid: Grid | Mapping[str, Sequence[Any]],
    *,
    out: str | Path,
    seeds: Sequence[int] = (1, 2, 3),
    setting: str = "base2new",
    workers: int = 1,
) -> list[Sweep]:
    """:func:`run_sweep` on each dataset, selecting per dataset: ``OUT/<dataset folder>/`` holds each sweep (its
    cache ``OUT/<dataset folder>/cache``, or ``spec.cache_dir/<dataset folder>``), ``OUT/results.json`` and
    ``results.md`` the test rows of every dataset's selected configuration."""
    out = Path(out).expanduser()
    sweeps = []
    with runs.hold(out):
        for data_path, name, folder, cache in dataset_runs(spec, datasets, out):
            run = spec.replace(data=data_path, dataset=name, out=str(out / folder), cache_dir=str(cache))
            sweeps.append(run_sweep(run, grid, seeds=seeds, setting=setting, workers=workers))
        if is_main():
            write_results([{**r, "run": f"{s.folder.name}/{r['run']}"} for s in sweeps for r in s.rows], out)
    return sweeps


def read_best(path: str | Path) -> dict[str, Any]:
    """A sweep's ``best.json`` (or any JSON object of its keys), checked: what it selects, and where it came from."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / BEST_FILE
    try:
        best = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no configuration file at {path}; a sweep writes OUT/best.json") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON configuration ({err})") from err
    if not isinstance(best, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(best).__name__}")
    known = {*BEST_FIELDS, "setting", "format", "dataset", "selected", "grid", "seeds"}
    unknown = sorted(set(best) - known)
    if unknown or best.get("format", BEST_FORMAT) != BEST_FORMAT:
        raise ValueError(f"{path} is not a sweep configuration (unknown keys {unknown}, format {best.get('format')!r}); "
                         f"its keys are {', '.join(sorted(known))}")
    for key, kind in (("options", dict), ("train", dict), ("templates", list)):
        if best.get(key) is not None and not isinstance(best[key], kind):
            raise ValueError(f"{path}: {key} must be a JSON {'object' if kind is dict else 'list'}, got {best[key]!r}")
    if best.get("setting", "base2new") not in SWEEP_SETTINGS:
        raise ValueError(f"{path}: setting must be one of {', '.join(SWEEP_SETTINGS)}, got {best['setting']!r}")
    return best


def load_best(path: str | Path) -> dict[str, Any]:
    """The :class:`RunSpec` fields a sweep's ``best.json`` selects: ``method``, ``options``, ``train``, ``shots``,
    ``draw``, ``rounding``, ``templates`` (those it holds).

    Example:
        >>> spec = RunSpec(data="~/data/dtd", out="runs/dtd-best", model="ViT-B-16", pretrained="openai",
        ...                **load_best("runs/dtd-sweep/best.json"))
    """
    return _spec_fields(read_best(path))


def _spec_fields(best: Mapping[str, Any]) -> dict[str, Any]:
    fields = {k: best[k] for k in BEST_FIELDS if k in best}
    if fields.get("templates") is not None:
        fields["templates"] = tuple(fields["templates"])
    return fields

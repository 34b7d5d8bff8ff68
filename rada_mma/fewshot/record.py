"""``run.json``: what a run folder was made from, one record for every setting.

A run folder's ``results.json`` says what came out; ``run.json`` says what went
in, fully resolved, so that a reader (and a test) needs no other file: the
setting, method, seed, shots and draw; the adapter's and the zero-shot rows'
prompts; the augmentation; every training setting the run resolved (the
method's preset with its overrides) and the steps an epoch took; the feature
and training precision; the adapter's configuration; the model, its weights,
the data; the library versions. An evaluation reads the record beside the
adapter it loads to learn where the adapter came from (its setting, source
dataset and prompts).

>>> write_run_record(spec, "runs/pets-rada", config=spec.train_config(), adapter=model.adapter.config,
...                  setting="base2new", dataset="OxfordPets", prompt_templates=["a photo of a {}."],
...                  zero_shot_templates=["a photo of a {}, a type of pet."])
>>> read_run_record("runs/pets-rada")["setting"]
'base2new'
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..config import AdapterConfig
from ..io import write_json
from .evaluation import RUN_RECORD
from .models import model_name
from .train import TrainConfig, steps_per_epoch

__all__ = ["RECORD_FORMAT", "RUN_RECORD", "read_run_record", "run_record", "write_run_record"]

RECORD_FORMAT = "rada_mma.run"
# what run_record states in its own words, rather than as the TrainConfig field
_RECORDED_ELSEWHERE = ("views", "crop_scale", "interpolation", "prompt", "amp", "extract_amp")


def run_record(
    spec: Any,  # a RunSpec (the protocols build on this module, not the other way round)
    config: TrainConfig | None = None,
    adapter: AdapterConfig | None = None,
    *,
    setting: str = "base2new",
    dataset: str | None = None,
    prompt_templates: Sequence[str] | None = None,
    zero_shot_templates: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What one run ran, fully resolved: the object ``run.json`` holds.

    Every protocol calls it with what it resolved (``setting`` names the protocol: ``"base2new"``,
    ``"all"``, ``"transfer"``, ``"dg"``, ``"tta"``) and adds what else its run depends on as
    ``extra`` (e.g. ``source``, ``adapter_file``, ``tta``).

    Keys: ``format``, ``method``, ``setting``, ``dataset``, ``seed``, ``shots``, ``draw``, ``rounding``;
    ``prompt_templates`` (the adapter's) and ``zero_shot_templates``; for a run that trained
    (``config`` given): ``augmentation`` (``kind``, ``scale``, ``interpolation``, ``views``, or
    ``{"kind": "none", "views": 0}``), every other :class:`TrainConfig` field (``optimizer``, ``lr``,
    ``weight_decay``, ``batch_size``, ``drop_last``, ``epochs``, ``warmup_epochs``, ``schedule``, ...),
    ``steps_per_epoch`` (when ``extra`` has ``train_images``; the protocols add ``val_acc`` too: the validation
    accuracy of the adapter written, what a sweep selects on), ``feature_dtype`` and ``train_dtype``
    (``"float32"`` or ``"bfloat16"``, as they ran on the run's device); ``adapter`` (the
    :class:`~rada_mma.AdapterConfig`, when given); ``model``, ``pretrained``, ``model_config``,
    ``data``, ``device``; ``rada_mma_version``, ``torch_version``, ``open_clip_version``,
    ``python_version``.
    """
    record: dict[str, Any] = {
        "format": RECORD_FORMAT, "method": spec.method, "setting": setting, "dataset": dataset, "seed": spec.seed,
        "shots": spec.shots, "draw": spec.draw, "rounding": spec.base_rounding,
        "prompt_templates": None if prompt_templates is None else list(prompt_templates),
        "zero_shot_templates": None if zero_shot_templates is None else list(zero_shot_templates),
    }
    if config is not None:
        cuda = torch.device(spec.device_name).type == "cuda"
        record["augmentation"] = config.augmentation
        record.update({k: v for k, v in dataclasses.asdict(config).items() if k not in _RECORDED_ELSEWHERE})
        if "train_images" in extra:
            record["steps_per_epoch"] = steps_per_epoch(config, extra["train_images"])
        record["feature_dtype"] = "bfloat16" if config.extract_amp and cuda else "float32"
        record["train_dtype"] = "bfloat16" if config.amp and cuda else "float32"
    if adapter is not None:
        record["adapter"] = dataclasses.asdict(adapter)
    return {
        **record,
        "model": model_name(spec.model, spec.model_config), "pretrained": spec.pretrained,
        "model_config": spec.model_config, "data": spec.data, "device": spec.device_name,
        "rada_mma_version": __version__, "torch_version": torch.__version__,
        "open_clip_version": _version_of("open_clip_torch"), "python_version": platform.python_version(),
        **extra,
    }


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_run_record(spec: Any, out_dir: str | os.PathLike, **record: Any) -> Path:
    """Write ``out_dir/run.json``: :func:`run_record` of ``spec`` with ``record``'s arguments (atomically).

    Returns:
        The file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / RUN_RECORD, run_record(spec, **record))


def read_run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``folder/run.json``, or ``None`` when the folder has none (e.g. a run of rada_mma 0.1)."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run the command again to rewrite it") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(record).__name__}")
    return record

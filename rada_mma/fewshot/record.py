"""``run.json``: what a run folder was made from, written by every setting through one function.

A run folder's ``results.json`` says what came out; ``run.json`` says what went
in: the setting, the method, seed and shots, the model and its weights, the
dataset, the resolved training configuration (the method's preset with the
run's overrides), and the library versions. An evaluation reads the record
beside the adapter it loads to learn where the adapter came from (its
setting and source dataset).

>>> write_run_record(spec, "runs/pets-rada", setting="all", dataset="OxfordPets", config=spec.train_config())
>>> read_run_record("runs/pets-rada")["setting"]
'all'
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..io import write_json
from .models import model_name
from .train import TrainConfig

if TYPE_CHECKING:  # the protocol builds on this module, not the other way round
    from .protocol import RunSpec

__all__ = ["RECORD_FILE", "RECORD_FORMAT", "read_run_record", "write_run_record"]

RECORD_FILE = "run.json"
RECORD_FORMAT = "rada_mma.run"


def _versions() -> dict[str, str]:
    versions = {"rada_mma": __version__, "torch": torch.__version__}
    try:
        import open_clip

        versions["open_clip"] = open_clip.__version__
    except ImportError:  # pragma: no cover - open_clip is a dependency, but a custom model may not need it
        pass
    return versions


def write_run_record(spec: RunSpec, out_dir: str | os.PathLike, *, config: TrainConfig | None = None,
                     **extra: Any) -> Path:
    """Write ``out_dir/run.json`` for a run of ``spec`` (atomically; an older record is replaced).

    Args:
        spec: the run.
        out_dir: its folder.
        config: the resolved training configuration of a run that trained (``None`` for an evaluation).
        **extra: what the setting adds, JSON-able: ``setting`` (default ``"base2new"``), ``dataset``
            (the data's detected name), ``source``, ``adapter``, ``tta``, ...

    Returns:
        The file written.
    """
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "setting": extra.pop("setting", "base2new"),
        "method": spec.method,
        "seed": spec.seed,
        "shots": spec.shots,
        "data": spec.data,
        "model": model_name(spec.model, spec.model_config),
        "pretrained": spec.pretrained,
        "model_config": spec.model_config,
        "templates": list(spec.templates) if spec.templates else None,
        "options": dict(spec.options),
        "train": dataclasses.asdict(config) if config is not None else None,
        "versions": _versions(),
        **extra,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / RECORD_FILE, record)


def read_run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``folder/run.json``, or ``None`` when the folder has none (e.g. a run of an older version)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run the command again to rewrite it") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(record).__name__}")
    return record

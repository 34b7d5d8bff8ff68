"""rada_mma: RAda and MMA adapters for frozen CLIP models, exact to the authors' code.

>>> from rada_mma import wrap
>>> model = wrap(clip_model, method="rada")
>>> model = rada_mma.load(clip_model, "pets-rada.safetensors")     # a trained one, classes included
>>> model.predict(images, k=5).names
>>> rada_mma.export(model, "pets-rada.onnx", format="onnx")

The package has three layers, each importing only those below it: this core
(torch, einops, safetensors), :mod:`rada_mma.fewshot` (data, feature cache,
training, evaluation: the few-shot protocols) and :mod:`rada_mma.demo` (the
shipped world CLIP and its tasks); :mod:`rada_mma.cli` is the command line.
``import rada_mma`` loads the core only.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .config import METHODS, AdapterConfig
from .exporting import export
from .modules import MMARationalMask, MultiModalAdapter, RationalMask, ResidualAdapter, build_adapter
from .official import from_official, to_official
from .serialization import (
    AdapterFile,
    BaseIdentity,
    ClassSet,
    load_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from .wrapper import AdaptedCLIP, Prediction, load, wrap

# Names that 0.1 exported from the package root and that now live in the few-shot pipeline.
_MOVED = frozenset(
    {
        "DATASETS", "PRESETS", "Features", "FitResult", "ImageDataset", "Item", "Splits", "TrainConfig",
        "clean_classname", "encode_class_texts", "extract_image_features", "few_shot", "find_dataset", "fit",
        "load_data", "load_features", "preset", "save_features", "subsample_classes", "templates_for",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        raise AttributeError(
            f"rada_mma.{name} moved to the few-shot pipeline in rada_mma 0.2: "
            f"use `from rada_mma.fewshot import {name}`"
        )
    raise AttributeError(f"module 'rada_mma' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "AdaptedCLIP",
    "AdapterConfig",
    "AdapterFile",
    "BaseIdentity",
    "ClassSet",
    "MMARationalMask",
    "MultiModalAdapter",
    "Prediction",
    "RationalMask",
    "ResidualAdapter",
    "__version__",
    "build_adapter",
    "export",
    "from_official",
    "load",
    "load_adapter",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
    "to_official",
    "wrap",
]

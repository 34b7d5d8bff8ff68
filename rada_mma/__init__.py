"""rada_mma: RAda and MMA adapters for frozen CLIP models, exact to the authors' code.

>>> from rada_mma import wrap
>>> model = wrap(clip_model, method="rada")
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import METHODS, AdapterConfig
from .modules import MMARationalMask, MultiModalAdapter, RationalMask, ResidualAdapter, build_adapter
from .official import from_official, to_official
from .serialization import load_adapter, read_adapter_config, save_adapter
from .train import PRESETS, FitResult, TrainConfig, fit, preset
from .wrapper import AdaptedCLIP, wrap

__version__ = "0.1.0"

# The data pipeline pulls in torchvision and PIL: imported on first use only.
_LAZY = {
    "DATASETS": "templates",
    "clean_classname": "templates",
    "find_dataset": "templates",
    "templates_for": "templates",
    "ImageDataset": "data",
    "Item": "data",
    "Splits": "data",
    "few_shot": "data",
    "load_data": "data",
    "subsample_classes": "data",
    "Features": "cache",
    "encode_class_texts": "cache",
    "extract_image_features": "cache",
    "load_features": "cache",
    "save_features": "cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rada_mma' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "METHODS",
    "PRESETS",
    "AdaptedCLIP",
    "AdapterConfig",
    "Features",
    "FitResult",
    "ImageDataset",
    "Item",
    "MMARationalMask",
    "MultiModalAdapter",
    "RationalMask",
    "ResidualAdapter",
    "Splits",
    "TrainConfig",
    "__version__",
    "build_adapter",
    "clean_classname",
    "encode_class_texts",
    "extract_image_features",
    "few_shot",
    "find_dataset",
    "fit",
    "from_official",
    "load_adapter",
    "load_data",
    "load_features",
    "preset",
    "read_adapter_config",
    "save_adapter",
    "save_features",
    "subsample_classes",
    "templates_for",
    "to_official",
    "wrap",
]

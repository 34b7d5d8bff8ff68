"""The few-shot pipeline: data, feature cache, training, evaluation, and the protocols that use them.

Built on the core (:func:`rada_mma.wrap` and the adapter modules), never the
other way round:

- :mod:`.data`, :mod:`.datasets`: datasets on disk (ImageFolder, CoOp splits,
  torch datasets), the seeded few-shot draws (CoOp's, MMA's), base-to-new; the
  11 benchmarks' templates and class-name fixes;
- :mod:`.cache`: every image encoded once into a fingerprinted feature cache;
- :mod:`.train`: :func:`fit` on cached features with each method's preset;
- :mod:`.evaluation`, :mod:`.plots`: result rows, tables, pictures;
- :mod:`.protocol`: whole runs from a :class:`RunSpec` (base-to-new, the default);
- :mod:`.settings`, :mod:`.tta`: the other protocols (all classes, cross-dataset, domain generalisation,
  test-time training); :mod:`.record`: every run folder's ``run.json``;
- :mod:`.predict`: image files classified with a saved adapter (``rada-mma predict``);
- :mod:`.sweep`: grids of training settings and adapter options, selected on validation only;
- :mod:`.distributed`, :mod:`.models`: ``torchrun`` and CLIP loading.

>>> from rada_mma.fewshot import RunSpec, run_base_to_new
>>> rows = run_base_to_new(RunSpec(data="~/data/dtd", out="runs/dtd-rada", model="ViT-B-16", pretrained="openai"))
"""

from __future__ import annotations

from .cache import Features, encode_class_texts, extract_image_features, load_features, save_features
from .data import ImageDataset, Item, Splits, few_shot, load_data, mma_draw, subsample_classes
from .datasets import DATASETS, clean_classname, find_dataset, templates_for
from .evaluation import harmonic_mean, markdown_table, read_results, summarize, write_results
from .models import load_clip
from .predict import PredictSummary, predict_images, with_adapter_base
from .protocol import FeatureStore, RunSpec, extract, run_base_to_new, run_grid
from .record import read_run_record, run_record, write_run_record
from .settings import evaluate, run_all_classes, run_shot_sweep, run_transfer, run_transfer_grid
from .sweep import Grid, Sweep, load_best, run_sweep, run_sweeps
from .train import PRESETS, FitResult, TrainConfig, accuracy, fit, learning_rate, preset, steps_per_epoch
from .tta import TTAConfig, adapt_and_predict, adapt_dataset, run_tta, run_tta_grid

__all__ = [
    "DATASETS",
    "PRESETS",
    "FeatureStore",
    "Features",
    "FitResult",
    "Grid",
    "ImageDataset",
    "Item",
    "PredictSummary",
    "RunSpec",
    "Splits",
    "Sweep",
    "TTAConfig",
    "TrainConfig",
    "accuracy",
    "adapt_dataset",
    "clean_classname",
    "encode_class_texts",
    "evaluate",
    "extract",
    "extract_image_features",
    "few_shot",
    "find_dataset",
    "fit",
    "harmonic_mean",
    "learning_rate",
    "load_best",
    "load_clip",
    "load_data",
    "load_features",
    "markdown_table",
    "mma_draw",
    "predict_images",
    "preset",
    "read_results",
    "read_run_record",
    "run_all_classes",
    "run_base_to_new",
    "run_grid",
    "run_record",
    "run_shot_sweep",
    "run_sweep",
    "run_sweeps",
    "run_transfer",
    "run_transfer_grid",
    "run_tta",
    "run_tta_grid",
    "save_features",
    "steps_per_epoch",
    "subsample_classes",
    "summarize",
    "templates_for",
    "adapt_and_predict",
    "with_adapter_base",
    "write_results",
    "write_run_record",
]

"""Classify image files with a saved adapter: the loop behind ``rada-mma predict``.

The CLIP comes from the run's model flags, or from the base the adapter file
records (:func:`with_adapter_base`); the adapter and its classes from the file
(:func:`rada_mma.load`). Images are folders (walked for image files) or files;
each gets one line in a JSON-lines or CSV file, written atomically through
:mod:`rada_mma.io`. An image that cannot be read gets a line saying why, and the
run goes on.

>>> spec = RunSpec(model="ViT-B-16", pretrained="openai", adapter="runs/pets-rada/adapter.safetensors")
>>> summary = predict_images(spec, ["photos/"], "preds.jsonl", k=5)
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from tqdm import tqdm

from ..io import atomic_write
from ..serialization import read_adapter
from ..wrapper import AdaptedCLIP, load
from .data import image_files
from .models import load_clip, model_name
from .protocol import RunSpec

__all__ = ["OUTPUT_FORMATS", "PredictSummary", "image_sources", "load_for_prediction", "predict_images", "with_adapter_base"]

OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}  # by the output file's suffix


@dataclass(frozen=True)
class PredictSummary:
    """What :func:`predict_images` wrote."""

    out: Path
    images: int  # image files, one line each
    failed: int  # of which unreadable (their lines say why)


def with_adapter_base(spec: RunSpec) -> RunSpec:
    """``spec`` with the base model its adapter file records, when ``spec`` names no model.

    The file records the architecture (an open_clip name such as ``ViT-B-16`` or
    ``world-clip``) and the pretrained tag; weights loaded from a file must be given
    again (``pretrained=PATH``), as the file's location is not recorded.
    """
    if spec.model or spec.model_config:
        return spec
    if not spec.adapter:
        raise ValueError("no adapter given; give adapter=<adapter file>")
    base = read_adapter(Path(spec.adapter).expanduser()).base
    if base is None or base.name is None:
        raise ValueError(
            f"{spec.adapter} does not record the name of its base model (an adapter saved by an earlier rada_mma, or "
            "from a model without a name); give model=<open_clip architecture> and pretrained=<tag or weights file>"
        )
    return spec.replace(model=base.name, pretrained=spec.pretrained or base.pretrained)


def image_sources(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files of ``sources``: folders walked for image files (any depth), files taken as given."""
    paths: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise ValueError(f"images={source}: the folder holds no image files")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"images={source}: no such file or folder")
    if not paths:
        raise ValueError("no images given; give images=<folder or image files>")
    return paths


def load_for_prediction(
    spec: RunSpec, *, classes: Sequence[str] | None = None, strict: bool = False
) -> tuple[AdaptedCLIP, Callable[[Image.Image], torch.Tensor]]:
    """The spec's CLIP with its adapter file loaded (and its classes, or ``classes`` with the spec's templates).

    Returns:
        The model, in eval mode, and the CLIP's preprocessing.
    """
    if not spec.adapter:
        raise ValueError("no adapter given; give adapter=<adapter file>")
    adapter = Path(spec.adapter).expanduser()
    info = read_adapter(adapter)
    name = model_name(spec.model, spec.model_config)
    base = info.base
    if spec.pretrained is None and base is not None and base.weights_file and base.name == name:
        raise ValueError(
            f"{adapter} was trained on {name} with the weights of the file {base.weights_file}, whose location it "
            f"does not record; give pretrained=/path/to/{base.weights_file}"
        )
    clip, preprocess, tokenizer = load_clip(spec.model, spec.pretrained, spec.model_config, spec.device_name)
    model = load(clip, adapter, strict=strict, base_name=name, pretrained=spec.pretrained)
    if classes:
        templates = list(spec.templates) if spec.templates else None
        templates = templates or (list(info.classes.templates) if info.classes and info.classes.templates else None)
        model.set_classes(list(classes), tokenizer=tokenizer, templates=templates)
    elif model.class_features is None:
        raise ValueError(
            f"{adapter} holds no classes (it was saved without include_classes=True); give classes=<class names> "
            "(and templates=...) to score"
        )
    return model.eval(), preprocess


def predict_images(
    spec: RunSpec,
    images: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    k: int = 5,
    batch_size: int = 32,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> PredictSummary:
    """The top-``k`` classes of every image, one line per image in ``out`` (``.jsonl`` or ``.csv``).

    Args:
        spec: the model (``model``/``pretrained``/``model_config``, or the adapter's
            recorded base: :func:`with_adapter_base`), ``adapter``, ``device``,
            ``templates`` (with ``classes``) and ``progress``.
        images: folders and image files.
        out: the predictions file; JSON lines (``path``, ``classes``, ``probabilities``,
            ``indices``; ``error`` for an unreadable image) or CSV (``path``,
            ``class_1``, ``probability_1``, ..., ``error``).
        k: classes per image.
        batch_size: images per forward pass.
        classes: class names to score instead of the ones the adapter file holds.
        overwrite: replace an existing ``out``.
        strict: an adapter trained on another base model is an error, not a warning.
    """
    out = Path(out).expanduser()
    kind = OUTPUT_FORMATS.get(out.suffix.lower())
    if kind is None:
        raise ValueError(f"out={out}: name a .jsonl or .csv file (the format follows the suffix)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={out} exists; choose another file, or pass overwrite=True to replace it")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    paths = image_sources(images)
    model, preprocess = load_for_prediction(spec, classes=classes, strict=strict)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = [0]

    def write(fh: IO[bytes]) -> None:
        failed[0] = _write_predictions(fh, model, preprocess, paths, kind, k=k, batch_size=batch_size,
                                       progress=spec.progress)

    atomic_write(out, write, overwrite=overwrite)
    return PredictSummary(out=out, images=len(paths), failed=failed[0])


def _write_predictions(
    fh: IO[bytes], model: AdaptedCLIP, preprocess: Callable, paths: list[Path], kind: str, *, k: int, batch_size: int,
    progress: bool,
) -> int:
    """Stream one line per image into ``fh``; the number of unreadable images."""
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    k = min(k, model.num_classes)
    writer = csv.writer(text) if kind == "csv" else None
    if writer is not None:
        writer.writerow(["path", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "probability")], "error"])
    failed = 0
    with tqdm(total=len(paths), unit="image", desc="predict", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            rows = _predict_batch(model, preprocess, paths[start : start + batch_size], k)
            for row in rows:
                failed += "error" in row
                if writer is None:
                    text.write(json.dumps(row) + "\n")
                else:
                    writer.writerow(_csv_row(row, k))
            bar.update(len(rows))
    text.flush()
    text.detach()  # the caller's file stays open: atomic_write syncs and closes it
    return failed


def _predict_batch(model: AdaptedCLIP, preprocess: Callable, paths: list[Path], k: int) -> list[dict[str, Any]]:
    """One row per path, in order: the prediction, or the reason the image could not be read."""
    rows: list[dict[str, Any]] = []
    tensors, readable = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(preprocess(image.convert("RGB")))
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported on its line, the run goes on
            rows.append({"path": str(path), "error": f"cannot read the image: {type(err).__name__}: {err}"})
            continue
        readable.append(len(rows))
        rows.append({"path": str(path)})
    if tensors:
        prediction = model.predict(torch.stack(tensors), k=k)
        for index, result in zip(readable, prediction.rows(), strict=True):
            result["probabilities"] = [round(p, 6) for p in result["probabilities"]]
            rows[index].update(result)
    return rows


def _csv_row(row: dict[str, Any], k: int) -> list[Any]:
    if "error" in row:
        return [row["path"], *[""] * (2 * k), row["error"]]
    names = row.get("classes") or [str(i) for i in row["indices"]]
    return [row["path"], *[x for pair in zip(names, row["probabilities"], strict=True) for x in pair], ""]

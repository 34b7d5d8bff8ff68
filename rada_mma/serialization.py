"""Adapter files: safetensors only, configuration in the metadata, atomic writes.

A file holds only the adapter's tensors under their stable state-dict names,
contiguous, and in its metadata the format version, the package version and
the :class:`~rada_mma.AdapterConfig` (method, sizes, options, embedding width).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ._version import __version__
from .config import AdapterConfig
from .io import save_safetensors
from .modules import build_adapter

__all__ = ["FORMAT", "FORMAT_VERSION", "load_adapter", "read_adapter_config", "save_adapter"]

FORMAT = "rada_mma.adapter"
FORMAT_VERSION = "1"  # bump when names or layout of saved tensors change


def save_adapter(
    module: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``module``'s tensors and configuration to a safetensors file.

    The file is written to a temporary name beside ``path`` and renamed into
    place (:func:`rada_mma.io.atomic_write`), so an interrupted save never leaves
    a half-written file; the same adapter and metadata always give the same bytes.

    Args:
        module: a rada_mma adapter (anything :func:`rada_mma.build_adapter` makes).
        path: destination, conventionally ``*.safetensors``.
        overwrite: replace an existing file; without it an existing file is an error.
        metadata: extra string entries stored under ``user.<key>``.

    Returns:
        The path written.
    """
    config = getattr(module, "config", None)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"save_adapter takes a rada_mma adapter module, got {type(module).__name__}")
    tensors = dict(module.state_dict())
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"the adapter's tensor(s) {bad[:5]} hold NaN or infinite values (a diverged training?); nothing was "
            f"written to {path}: such an adapter gives NaN logits"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rada_mma_version": __version__,
        "method": config.method,
        "dim": str(config.dim),
        "config": config.to_json(),
    }
    for key, value in (metadata or {}).items():
        meta[f"user.{key}"] = str(value)
    return save_safetensors(path, tensors, meta, overwrite=overwrite)


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or another format?): {err}. "
            "Adapter files are written by save_adapter; checkpoints of the authors' code load with from_official"
        ) from err


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The configuration stored in an adapter file, after checking its format and its tensors' header.

    The names, shapes and dtypes of the tensors are checked against the configuration from the file's
    header alone: nothing is allocated for a file that does not hold what its metadata claims.
    """
    path = Path(path)
    with _open(path) as fh:
        config = _config_from_metadata(fh.metadata() or {}, path)
        _check_header(fh, config, path)
    return config


def _config_from_metadata(meta: dict[str, str], path: Path) -> AdapterConfig:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a rada_mma adapter (metadata format="
            f"{meta.get('format')!r}, expected {FORMAT!r}); write adapters with save_adapter"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} uses adapter format version {meta.get('format_version')!r} (written by rada_mma "
            f"{meta.get('rada_mma_version')}), this rada_mma ({__version__}) reads version {FORMAT_VERSION!r}; "
            "install the rada_mma version that wrote it"
        )
    if "config" not in meta:
        raise ValueError(
            f"{path} has rada_mma adapter metadata but no 'config' entry: the file was altered or written by "
            "another tool; save it again with save_adapter"
        )
    try:
        config = AdapterConfig.from_json(meta["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: cannot read its adapter config: {err}") from err
    # save_adapter writes method and dim twice (for tools that read only the flat metadata): they must agree
    for key, value in (("method", config.method), ("dim", str(config.dim))):
        if meta.get(key) != value:
            raise ValueError(
                f"{path}: its metadata says {key}={meta.get(key)!r} but its config says {key}={value!r}; the file "
                "was altered or written by another tool, so neither can be trusted: save the adapter again"
            )
    return config


# safetensors' dtype names -> torch's; adapters hold floating-point tensors only
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _check_header(fh: Any, config: AdapterConfig, path: Path) -> dict[str, torch.dtype]:
    """The file's tensor names, shapes and dtypes against ``config``, from the header alone; their dtypes."""
    with torch.device("meta"):  # shapes without memory: a crafted dim costs nothing here
        expected = {name: tuple(t.shape) for name, t in build_adapter(config).state_dict().items()}
    names = set(fh.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match a {config.method!r} adapter: missing tensors {missing}, extra tensors {extra}")
    dtypes = {}
    for name in sorted(names):
        header = fh.get_slice(name)
        shape, dtype = tuple(header.get_shape()), header.get_dtype()
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {expected[name]} for {config}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} is stored as {dtype}; adapter tensors are floating point (F32, F16, BF16 "
                "or F64): the file was not written by save_adapter"
            )
        dtypes[name] = _FLOAT_DTYPES[dtype]
    return dtypes


def _non_finite(tensors: dict[str, Tensor]) -> list[str]:
    return sorted(name for name, value in tensors.items() if not bool(torch.isfinite(value).all()))


def _check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"{path}: tensor(s) {bad[:5]} hold NaN or infinite values, so every logit would be NaN; the adapter "
            "was saved from a diverged training run: train it again (e.g. with a lower learning rate)"
        )


def load_adapter(path: str | os.PathLike, module: nn.Module | None = None, *, map_location: str = "cpu"):
    """Load an adapter file into ``module`` (checked against it), or into a new module.

    Every difference is an error that names it: another method, width or
    option, another format version, a missing or extra tensor, a wrong shape,
    metadata that contradicts the stored configuration, tensors that are not
    floating point or not finite. Shapes are checked from the file's header
    before any module is built or tensor read. Tensors stored in a wider dtype
    than the module's (float64 into float32) load with a warning.

    Args:
        path: a file written by :func:`save_adapter`.
        module: the adapter to load into; ``None`` builds one from the file's configuration.
        map_location: device for a newly built module.

    Returns:
        The module holding the loaded tensors.
    """
    path = Path(path)
    with _open(path) as fh:
        config = _config_from_metadata(fh.metadata() or {}, path)
        if module is not None:
            _check_same_adapter(module, config, path)
        stored = _check_header(fh, config, path)
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    _check_finite(tensors, path)
    if module is None:
        module = build_adapter(config).to(map_location)
    target = module.state_dict()
    narrowed = sorted({(str(stored[n]), str(target[n].dtype)) for n in tensors
                       if torch.promote_types(stored[n], target[n].dtype) != target[n].dtype})
    if narrowed:
        warnings.warn(
            f"{path} stores {', '.join(a for a, _ in narrowed)} tensors, loaded into a "
            f"{', '.join(b for _, b in narrowed)} adapter: precision is lost (cast the adapter first to keep it)",
            stacklevel=2,
        )
    with torch.no_grad():
        module.load_state_dict(tensors, strict=True)
    return module


def _check_same_adapter(module: nn.Module, config: AdapterConfig, path: Path) -> None:
    """``module`` is an adapter of the file's method, width and forward options."""
    ours = getattr(module, "config", None)
    if not isinstance(ours, AdapterConfig):
        raise TypeError(f"load_adapter loads into a rada_mma adapter module, got {type(module).__name__}")
    if ours.method != config.method:
        raise ValueError(f"{path} holds a {config.method!r} adapter, but this model uses {ours.method!r}")
    if ours.dim != config.dim:
        raise ValueError(
            f"{path} holds an adapter for embedding width {config.dim}, but this model's width is "
            f"{ours.dim}; it was trained on another CLIP"
        )
    # Only what shapes the parameters or the logits must agree; alpha and the
    # regulariser are the loading model's own training choice.
    diffs = {
        k: (getattr(config, k), getattr(ours, k))
        for k in ours.forward_fields()
        if getattr(config, k) != getattr(ours, k)
    }
    if diffs:
        listed = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ValueError(f"{path} was saved with other adapter options ({listed}); wrap with those options")

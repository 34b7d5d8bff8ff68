"""Adapter files: safetensors only, configuration in the metadata, atomic writes.

A file holds only the adapter's tensors under their stable state-dict names,
contiguous, and in its metadata the format version, the package version and
the :class:`~rada_mma.AdapterConfig` (method, sizes, options, embedding width),
the :class:`BaseIdentity` of the CLIP it was trained on and, on request, its
classes (:class:`ClassSet`: the class text features as one more
tensor, names and templates in the metadata).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ._version import __version__
from .config import AdapterConfig
from .io import save_safetensors
from .modules import build_adapter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AdapterFile",
    "BaseIdentity",
    "ClassSet",
    "load_adapter",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
]

FORMAT = "rada_mma.adapter"
# Version 2 adds the class tensor; a file without classes is written as version 1, which every
# rada_mma since 0.1 reads (the base identity is metadata that older versions ignore).
FORMAT_VERSION = "2"  # bump when names or layout of saved tensors change
READABLE_VERSIONS = ("1", "2")
CLASS_TENSOR = "classes.text_features"  # no adapter has a submodule named "classes"
# The probe: values of this many of the encoders' weight matrices, this many values each.
PROBE_TENSORS, PROBE_VALUES = 8, 8
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-6  # fp16 and bf16 copies of the same weights agree within this


@dataclass(frozen=True)
class BaseIdentity:
    """Which CLIP an adapter was trained on, as its file records it.

    ``probe`` is a fingerprint of the encoders' weights: a few values, spread
    over the weight matrices, of a handful of them (:func:`base_identity`).
    Two bases are the same when their probes agree within ``PROBE_RTOL`` (so an
    fp16 copy of the weights matches its fp32 original); ``fingerprint`` is a
    short hash of the probe, for display.
    """

    backend: str  # "open_clip", "hf", "openai" or "generic"
    dim: int  # embedding width
    name: str | None = None  # architecture, e.g. "ViT-B-16", "world-clip", "openai/clip-vit-base-patch16"
    pretrained: str | None = None  # an open_clip pretrained tag ("openai", "random"), when known
    weights_file: str | None = None  # the weights file's name, when the weights came from a file
    fingerprint: str = ""
    probe: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (tensor name, values) pairs

    def describe(self) -> str:
        """``"open_clip ViT-B-16 (pretrained openai), width 512, weights fingerprint 1a2b3c4d5e6f"``."""
        name = self.name or "model (architecture not recorded)"
        source = f" (pretrained {self.pretrained})" if self.pretrained else ""
        source += f" (weights file {self.weights_file})" if self.weights_file else ""
        return f"{self.backend} {name}{source}, width {self.dim}, weights fingerprint {self.fingerprint or '?'}"

    def same_weights(self, other: BaseIdentity) -> bool:
        """Whether ``other`` has the same encoder weights (within fp16/bf16 rounding) and width."""
        if self.dim != other.dim or [(n, len(v)) for n, v in self.probe] != [(n, len(v)) for n, v in other.probe]:
            return False
        pairs = [(x, y) for (_, a), (_, b) in zip(self.probe, other.probe, strict=True) for x, y in zip(a, b, strict=True)]
        return all(abs(x - y) <= PROBE_ATOL + PROBE_RTOL * max(abs(x), abs(y)) for x, y in pairs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BaseIdentity:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # newer fields are extra information
        data["probe"] = tuple((name, tuple(values)) for name, values in data.get("probe", ()))
        return cls(**data)


def base_identity(
    model: nn.Module, *, backend: str, dim: int, name: str | None = None, pretrained: str | None = None
) -> BaseIdentity:
    """The :class:`BaseIdentity` of ``model``: its probe read from its weights now.

    Args:
        model: the base CLIP.
        backend, dim: its backend's name and embedding width.
        name: its architecture, when known.
        pretrained: the open_clip tag or the weights file it was loaded from, when known
            (a path or a name ending in a weights suffix is recorded as ``weights_file``).
    """
    weights = [
        (key, t) for key, t in model.state_dict().items()
        if t.is_floating_point() and t.dim() >= 2 and t.numel() >= PROBE_VALUES
    ]  # fmt: skip
    spread = sorted({round(i * (len(weights) - 1) / max(1, PROBE_TENSORS - 1)) for i in range(PROBE_TENSORS)})
    probe = []
    for key, tensor in (weights[i] for i in spread) if weights else ():  # spread over the model, each once
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, PROBE_VALUES, device=flat.device).round().long()
        probe.append((key, tuple(float(f"{v:.6g}") for v in flat[index].float().cpu().tolist())))
    digest = hashlib.sha256(json.dumps([(k, [f"{v:.2g}" for v in vals]) for k, vals in probe]).encode())
    weights_file = None
    if pretrained is not None and _is_weights_file(pretrained):
        pretrained, weights_file = None, Path(pretrained).name
    return BaseIdentity(
        backend=backend, dim=dim, name=name, pretrained=pretrained, weights_file=weights_file,
        fingerprint=digest.hexdigest()[:12], probe=tuple(probe),
    )


def _is_weights_file(value: str) -> bool:
    suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    return any(sep in value for sep in "/\\") or value.endswith(suffixes) or Path(value).expanduser().is_file()


@dataclass(frozen=True)
class ClassSet:
    """The classes an adapter scores, as a file can carry them.

    Args:
        text_features: ``(K, D)`` raw class text features (templates already ensembled).
        names: the K class names, when known.
        templates: the prompt templates the features were made with, when known (strings).
    """

    text_features: Tensor
    names: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text_features, Tensor) or self.text_features.dim() != 2:
            raise ValueError("ClassSet.text_features must be a (K, D) tensor")
        if self.names is not None and len(self.names) != self.text_features.shape[0]:
            raise ValueError(
                f"ClassSet has {len(self.names)} names for {self.text_features.shape[0]} class features"
            )


@dataclass(frozen=True)
class AdapterFile:
    """Everything an adapter file records besides the adapter's own tensors (:func:`read_adapter`)."""

    path: Path
    config: AdapterConfig
    format_version: str
    rada_mma_version: str | None
    base: BaseIdentity | None  # None in files of earlier versions (format version 1 without a base)
    classes: ClassSet | None  # None unless saved with include_classes=True
    metadata: dict[str, str]  # the caller's own entries (``user.<key>`` without the prefix)


def save_adapter(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    base: BaseIdentity | None = None,
    classes: ClassSet | None = None,
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
        base: the CLIP the adapter was trained on (:meth:`rada_mma.AdaptedCLIP.base_identity`).
        classes: the classes to carry (their ``(K, D)`` text features become one more tensor).

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
        "format_version": FORMAT_VERSION if classes is not None else "1",
        "rada_mma_version": __version__,
        "method": config.method,
        "dim": str(config.dim),
        "config": config.to_json(),
    }
    if base is not None:
        meta["base"] = base.to_json()
    if classes is not None:
        if classes.text_features.shape[-1] != config.dim:
            raise ValueError(
                f"the class features have width {classes.text_features.shape[-1]}, the adapter {config.dim}"
            )
        tensors[CLASS_TENSOR] = classes.text_features.detach().float()
        names = None if classes.names is None else list(classes.names)
        templates = None if classes.templates is None else list(classes.templates)
        meta["classes"] = json.dumps({"count": classes.text_features.shape[0], "names": names, "templates": templates})
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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} uses adapter format version {meta.get('format_version')!r} (written by rada_mma "
            f"{meta.get('rada_mma_version')}), this rada_mma ({__version__}) reads versions "
            f"{', '.join(map(repr, READABLE_VERSIONS))}; install the rada_mma version that wrote it"
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
    names = set(fh.keys()) - {CLASS_TENSOR}  # the class features, when stored, are checked by read_adapter
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
        tensors = {name: fh.get_tensor(name) for name in fh.keys() if name != CLASS_TENSOR}
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


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """What an adapter file records besides the adapter's tensors: config, base, classes, metadata.

    Example:
        >>> info = read_adapter("pets-rada.safetensors")
        >>> info.config.method, info.base.describe(), info.classes.names[:3]
    """
    path = Path(path)
    with _open(path) as fh:
        meta = fh.metadata() or {}
        config = _config_from_metadata(meta, path)
        features = fh.get_tensor(CLASS_TENSOR) if CLASS_TENSOR in fh.keys() else None
    try:
        base = BaseIdentity.from_json(meta["base"]) if "base" in meta else None
        classes = _classes(meta.get("classes"), features)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: cannot read its base model or classes ({err}); the file was altered") from err
    user = {k[len("user."):]: v for k, v in meta.items() if k.startswith("user.")}
    return AdapterFile(
        path=path, config=config, format_version=meta["format_version"], rada_mma_version=meta.get("rada_mma_version"),
        base=base, classes=classes, metadata=user,
    )


def _classes(entry: str | None, features: Tensor | None) -> ClassSet | None:
    if entry is None and features is None:
        return None
    if entry is None or features is None:
        raise ValueError("the class features and their description must come together")
    data = json.loads(entry)
    if data.get("count") != features.shape[0]:
        raise ValueError(f"{data.get('count')} classes described, {features.shape[0]} stored")
    as_tuple = lambda x: None if x is None else tuple(str(v) for v in x)  # noqa: E731
    return ClassSet(text_features=features, names=as_tuple(data.get("names")), templates=as_tuple(data.get("templates")))


def check_base(recorded: BaseIdentity | None, current: BaseIdentity, path: str | os.PathLike, *, strict: bool) -> bool:
    """Warn (``strict``: raise ``ValueError``) when an adapter file was trained on another base than ``current``.

    Returns whether the weights are the same (``True`` for files that record no base).
    """
    if recorded is None or recorded.same_weights(current):
        return True
    message = (
        f"{path} was trained on {recorded.describe()}, but is being loaded onto {current.describe()}; "
        "its logits are only meaningful on the model it was trained on: load it onto that model"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message + " (strict=True makes this an error)", UserWarning, stacklevel=3)
    return False

"""Interop with the authors' released code: their parameter names in and out.

``from_official`` builds a feature-level module from parameters named as the
released RAda (``mha.q_proj1.weight``, ``adapter_image.fc.0.weight``, ...) and
MMA (``adapter.mha.in_proj_weight``, ``adapter.downsampler.weight``, ...) code
names them; ``to_official`` maps back.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .config import AdapterConfig
from .modules import MultiModalAdapter, RationalMask, build_adapter

__all__ = ["OFFICIAL_METHODS", "from_official", "to_official"]

OFFICIAL_METHODS = ("rada", "rada+adapter", "mma", "mma-master")

_RADA_LINEAR = {"query_image": "mha.q_proj1", "query_text": "mha.q_proj2", "to_out": "mha.out_proj"}
_RADA_STACKED = ("mha.q_proj3", "mha.k_proj", "mha.v_proj")  # -> to_qkv_rational, in this order
_RADA_ADAPTERS = {
    "image_adapter.down.weight": "adapter_image.fc.0.weight",
    "image_adapter.up.weight": "adapter_image.fc.2.weight",
    "text_adapter.down.weight": "adapter_text.fc.0.weight",
    "text_adapter.up.weight": "adapter_text.fc.2.weight",
}
_MMA_COMMON = {
    "to_qkv.weight": "adapter.mha.in_proj_weight",
    "to_qkv.bias": "adapter.mha.in_proj_bias",
    "to_out.weight": "adapter.mha.out_proj.weight",
    "to_out.bias": "adapter.mha.out_proj.bias",
}
_MMA_PAPER = {
    "down.weight": "adapter.downsampler.weight",
    "down.bias": "adapter.downsampler.bias",
    "up.weight": "adapter.upsampler.weight",
    "up.bias": "adapter.upsampler.bias",
}
_MMA_MASTER = {
    f"{ours}.{i}.{p}": f"adapter.{theirs}.{j}.{p}"
    for ours, theirs, pairs in (("down", "downsampler", ((0, 0), (1, 1))), ("up", "upsampler", ((0, 0), (2, 2))))
    for i, j in pairs
    for p in ("weight", "bias")
}


# the blend's mixing weights, top-level parameters of the authors' CustomCLIP (adapter_mask.py, and
# commented out in rada.py)
_RADA_BLEND = {"image_adapter.ratio": "alpha", "text_adapter.ratio": "beta"}


def _official_names(method: str, adapter_init: str = "released") -> dict[str, str]:
    """Our state-dict name -> official name, for everything but RAda's stacked projections."""
    if method in ("rada", "rada+adapter"):
        names = {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in _RADA_LINEAR.items() for p in ("weight", "bias")}
        if method == "rada+adapter":
            names.update(_RADA_ADAPTERS)
            if adapter_init == "blend":
                names.update(_RADA_BLEND)
        return names
    return {**_MMA_COMMON, **(_MMA_PAPER if method == "mma" else _MMA_MASTER)}


def _load_state(source: Any) -> Mapping[str, Tensor]:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no checkpoint at {os.fspath(source)!r}")
        path = os.fspath(source)
        try:
            # weights_only: a checkpoint is data; never run code from a pickle
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # empty or truncated files, other formats, refused pickles
            detail = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}" if str(err) else type(err).__name__
            raise ValueError(
                f"{path!r} is not a readable PyTorch checkpoint ({detail}); give the released trainer's "
                "model.pth.tar-N file (or its state dict); an empty or truncated file must be copied again"
            ) from err
    if isinstance(source, Mapping) and "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]  # a checkpoint written by the released (Dassl) trainers
    if not isinstance(source, Mapping):
        raise TypeError(
            f"expected a state dict, a checkpoint dict with a 'state_dict' entry, or a path; "
            f"got {type(source).__name__}"
        )
    return source


class _Finder:
    """Finds official names in a state dict whose keys may carry prefixes (``module.``, ``param.``, ...)."""

    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return any(k == name or k.endswith("." + name) for k in self.state)

    def __call__(self, name: str) -> Tensor:
        hits = [k for k in self.state if k == name or k.endswith("." + name)]
        outer, _, short = name.partition(".")
        if not hits and short and outer in ("mha", "adapter"):
            # the attention block saved on its own: "mha.q_proj1.weight" as "q_proj1.weight". Never
            # for the residual adapters, whose short names ("fc.0.weight") are the same on both sides.
            hits = [k for k in self.state if k == short or k.endswith("." + short)]
        if not hits:
            raise KeyError(f"official parameter {name!r} not found; the state dict has {sorted(self.state)[:12]}")
        if len(hits) > 1:
            raise KeyError(f"official parameter {name!r} is ambiguous: {sorted(hits)}")
        self.used.add(hits[0])
        value = self.state[hits[0]]
        if not isinstance(value, Tensor):
            raise TypeError(f"{hits[0]!r} is a {type(value).__name__}, not a tensor")
        ndim = 1 if name.endswith("bias") else 2 if name.endswith("weight") else value.dim()  # alpha/beta: any
        if value.dim() != ndim:
            raise ValueError(
                f"{hits[0]!r} has shape {tuple(value.shape)}; a layer's {'bias' if ndim == 1 else 'weight'} is "
                f"{ndim}-D: the state dict is damaged or not of this method"
            )
        return value.detach().to("cpu", torch.float32)


def from_official(method: str, state_dict: Any, *, strict: bool = True, **options: Any):
    """Build a feature-level module from the authors' released parameters.

    Args:
        method: ``"rada"``, ``"rada+adapter"``, ``"mma"`` (paper) or ``"mma-master"``.
        state_dict: parameters under the released names, a checkpoint dict whose
            ``"state_dict"`` holds them, or the path of such a ``torch.save`` file.
            Prefixes such as ``module.`` are tolerated.
        strict: raise if the state dict holds tensors the method does not use.
        **options: settings the tensors cannot tell: ``temperature``, ``heads``,
            ``softmax``, ``regularizer``, ``alpha`` (RAda family); ``heads``,
            ``blend`` (MMA). Sizes are read from the tensors, and so is RAda+Adapter's
            form: the blend's ``alpha``/``beta`` present give ``adapter_init="blend"``,
            otherwise the released residual adapters (``"released"``).

    Example:
        >>> module = from_official("rada", torch.load("rada.pth")["state_dict"], temperature=0.5)
    """
    if method not in OFFICIAL_METHODS:
        raise ValueError(f"from_official knows {OFFICIAL_METHODS}, got {method!r} (mma+rada has no released code)")
    state = _load_state(state_dict)
    find = _Finder(state)
    if method == "rada+adapter" and "adapter_init" not in options:
        # the blend's weights name the form; without them the adapters are the released residual ones
        options["adapter_init"] = "blend" if find.has("alpha") else "released"
    names = _official_names(method, options.get("adapter_init", "released"))
    theirs: dict[str, Tensor] = {official: find(official) for official in names.values()}
    if method in ("rada", "rada+adapter"):
        theirs.update({f"{n}.{p}": find(f"{n}.{p}") for n in _RADA_STACKED for p in ("weight", "bias")})
    dim, sizes = _sizes(method, theirs)
    config = AdapterConfig.for_method(method, dim, **sizes, **options)
    module = build_adapter(config)
    expected = module.state_dict()
    for ours, official in names.items():
        _check_shape(official, theirs[official], tuple(expected[ours].shape), config)
    ours_state = {ours: theirs[official] for ours, official in names.items()}
    if method in ("rada", "rada+adapter"):
        for n in _RADA_STACKED:  # each a Linear(D, D) before they are stacked
            _check_shape(f"{n}.weight", theirs[f"{n}.weight"], (dim, dim), config)
            _check_shape(f"{n}.bias", theirs[f"{n}.bias"], (dim,), config)
        ours_state["to_qkv_rational.weight"] = torch.cat([theirs[f"{n}.weight"] for n in _RADA_STACKED])
        ours_state["to_qkv_rational.bias"] = torch.cat([theirs[f"{n}.bias"] for n in _RADA_STACKED])
    extra = sorted(set(state) - find.used)
    if strict and extra:
        raise ValueError(
            f"the state dict holds tensors that {method!r} does not use: {extra[:12]}; "
            "pass strict=False to ignore them, or check the method"
        )
    module.load_state_dict(ours_state, strict=True)
    return module


def _most_common(values: list[int]) -> int:
    """The size most tensors agree on (the first seen among equals): one damaged tensor is then the one named."""
    return Counter(values).most_common(1)[0][0]


def _sizes(method: str, t: Mapping[str, Tensor]) -> tuple[int, dict[str, int]]:
    """The embedding width and the sizes the tensors tell, each by the vote of every tensor that shows it."""
    if method in ("rada", "rada+adapter"):
        dim = _most_common([t[f"{n}.bias"].shape[0] for n in (*_RADA_STACKED, *(v for v in _RADA_LINEAR.values()))])
        if method == "rada":
            return dim, {}
        inner = _most_common([t[f"adapter_{side}.fc.{i}.weight"].shape[i // 2] for side in ("image", "text") for i in (0, 2)])
        if inner == 0 or dim % inner:
            raise ValueError(f"adapter_image.fc.0.weight has {inner} rows, not a divisor of the width {dim}")
        return dim, {"reduction": dim // inner}
    qkv = t["adapter.mha.in_proj_weight"]
    bottleneck = [qkv.shape[1], qkv.shape[0] // 3, t["adapter.mha.out_proj.weight"].shape[0]]
    if method == "mma":
        down, up = t["adapter.downsampler.weight"], t["adapter.upsampler.weight"]
        bottleneck += [down.shape[0], up.shape[1]]
        return _most_common([down.shape[1], up.shape[0], t["adapter.upsampler.bias"].shape[0]]), {
            "bottleneck": _most_common(bottleneck)
        }
    down0, down1 = t["adapter.downsampler.0.weight"], t["adapter.downsampler.1.weight"]
    up0, up2 = t["adapter.upsampler.0.weight"], t["adapter.upsampler.2.weight"]
    bottleneck += [down1.shape[0], up0.shape[1]]
    hidden = [down0.shape[0], down1.shape[1], up0.shape[0], up2.shape[1]]
    dim = _most_common([down0.shape[1], up2.shape[0], t["adapter.upsampler.2.bias"].shape[0]])
    return dim, {"bottleneck": _most_common(bottleneck), "hidden": _most_common(hidden)}


def _check_shape(official: str, value: Tensor, expected: tuple[int, ...], config: AdapterConfig) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{official} has shape {tuple(value.shape)}, expected {expected}: the other tensors say width "
            f"{config.dim} ({', '.join(f'{k}={getattr(config, k)}' for k in ('bottleneck', 'hidden', 'reduction') if k in config.forward_fields())})"
            "; the state dict is damaged or not of this method"
        )


def to_official(method: str, module: RationalMask | MultiModalAdapter) -> dict[str, Tensor]:
    """The module's parameters under the released code's names (contiguous copies)."""
    if method not in OFFICIAL_METHODS:
        raise ValueError(f"to_official knows {OFFICIAL_METHODS}, got {method!r}")
    if getattr(module, "config", None) is None or module.config.method != method:
        found = getattr(getattr(module, "config", None), "method", type(module).__name__)
        raise ValueError(f"module is {found!r}, not {method!r}")
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    out = {theirs: state[ours] for ours, theirs in _official_names(method, module.config.adapter_init).items()}
    if method in ("rada", "rada+adapter"):
        for name, w, b in zip(
            _RADA_STACKED,
            state["to_qkv_rational.weight"].chunk(3),
            state["to_qkv_rational.bias"].chunk(3),
            strict=True,
        ):
            out[f"{name}.weight"], out[f"{name}.bias"] = w.contiguous(), b.contiguous()
    return out

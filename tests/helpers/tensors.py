"""Tensors and reference models the tests share: seeded features, fully randomised parameters, and
the literal released formulation (:mod:`tests.helpers.reference`) loaded with a fused module's weights.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import Tensor, nn

from rada_mma import kernels
from rada_mma.modules import MMARationalMask, MultiModalAdapter, RationalMask
from rada_mma.official import to_official

from . import reference

SCALE = 100.0  # OpenAI CLIP's multiplicative logit scale

def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raw_features(batch: int, classes: int, dim: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """Unnormalised image ``(B, D)`` and text ``(K, D)`` features, like encoder outputs.

    A shared offset gives them the positive mean cosine CLIP embeddings have.
    """
    g = seeded(seed)
    offset = torch.randn(dim, generator=g)
    image = 3 * (torch.randn(batch, dim, generator=g) + offset)
    text = 2 * (torch.randn(classes, dim, generator=g) + offset)
    return image, text


def randomize_(module: nn.Module, *, seed: int, gain: float = 1.0) -> nn.Module:
    """Draw every ``nn.Linear`` of ``module`` from ``U(±gain/√fan_in)``, in place.

    The zero-initialised layers (RAda's ``to_out``, the adapters' up maps) would
    otherwise hide every error upstream of them: a zero output map makes the mask
    exactly 1 whatever the attention computes. Blend ratios (RAda+Adapter's
    ``"blend"`` form, one of which starts at 0) are drawn from ``U(0.1, 0.9)``.
    """
    g = seeded(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = gain / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=g)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=g)
            elif getattr(layer, "ratio", None) is not None:
                layer.ratio.uniform_(0.1, 0.9, generator=g)
    return module


@contextlib.contextmanager
def attention_path(path: str):
    """Run RAda's text and rational attentions on one of the kernels' three paths (with gradients on).

    ``"plain"``: ordinary ops over whole maps (the default for small maps; without
    gradients, blocks of rows: what export traces); ``"flash"``: PyTorch's fused CPU
    flash kernels (the default for large maps on CPU in fp32/bf16/fp16);
    ``"portable"``: the chunked kernel every other device and dtype uses, whose
    block size ``chunk_elements`` sets.
    """
    assert path in ("plain", "flash", "portable"), path
    saved = kernels.FLASH_CPU, kernels.MATERIALISE_ELEMENTS
    kernels.FLASH_CPU = saved[0] and path == "flash"
    kernels.MATERIALISE_ELEMENTS = 1 << 62 if path == "plain" else 0
    try:
        yield
    finally:
        kernels.FLASH_CPU, kernels.MATERIALISE_ELEMENTS = saved


def released_rada(module: RationalMask) -> reference.ReleasedRAda:
    """The literal released RAda (with adapters for "rada+adapter") holding ``module``'s weights."""
    c = module.config
    adapters = c.method == "rada+adapter" and ("blend" if c.adapter_init == "blend" else True)
    ref = reference.ReleasedRAda(c.dim, c.heads, c.temperature, adapters=adapters, softmax=c.softmax)
    ref.load_state_dict(to_official(c.method, module), strict=True)
    return ref


def released_mma(module: MultiModalAdapter) -> reference.ReleasedMMA:
    """The literal released MMA (paper or master variant) holding ``module``'s weights."""
    c = module.config
    ref = reference.ReleasedMMA(
        c.dim, c.mma_width, c.mma_heads, c.blend, variant=module.variant, hidden=c.hidden
    )
    ref.load_state_dict(to_official(c.method, module), strict=True)
    return ref


def official_grads(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s parameter gradients under the released names.

    A copy of the module whose parameters hold the gradients goes through
    ``to_official``, so the stacked ``to_qkv_rational`` gradient is split exactly
    as its weights are. ``MMARationalMask`` maps its two halves separately.
    """
    if isinstance(module, MMARationalMask):
        return {**official_grads(module.mma), **official_grads(module.rada)}
    holder = copy.deepcopy(module)
    with torch.no_grad():
        for p, q in zip(module.parameters(), holder.parameters(), strict=True):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return to_official(module.config.method, holder)


def reference_grads(ref: nn.Module) -> dict[str, Tensor]:
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in ref.named_parameters()
    }


def assert_grads_close(
    got: dict[str, Tensor], want: dict[str, Tensor], *, rtol: float, floor: float, where: str = "gradients"
) -> None:
    """``‖g − ref‖ ≤ rtol·‖ref‖ + floor·max_p ‖ref_p‖`` for every parameter, named on failure.

    The floor, relative to the largest gradient, lets a parameter whose exact
    gradient is 0 carry float rounding (the fused kernels reach the same value
    along a different summation order).
    """
    assert got.keys() == want.keys(), f"{where}: parameter names differ: {sorted(got.keys() ^ want.keys())}"
    largest = max(float(w.norm()) for w in want.values())
    for name, w in want.items():
        assert got[name].shape == w.shape, f"{name}: shape {tuple(got[name].shape)} != {tuple(w.shape)}"
        err, size = float((got[name] - w).norm()), float(w.norm())
        assert err <= rtol * size + floor * largest, (
            f"{where}, {name}: ‖grad − reference‖ = {err:.3e}, ‖reference‖ = {size:.3e}, largest ‖grad‖ = {largest:.3e}"
        )

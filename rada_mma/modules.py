"""Feature-level adapter modules: parameters plus calls into :mod:`rada_mma.kernels`.

Each module maps raw (unnormalised) encoder outputs to logits::

    logits = module(image_features, text_features, logit_scale)   # (B, D), (K, D) -> (B, K)

and works alone on cached features, or inside :func:`rada_mma.wrap`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ADAPTER_INITS, AdapterConfig

__all__ = [
    "MMARationalMask",
    "MultiModalAdapter",
    "RationalMask",
    "ResidualAdapter",
    "build_adapter",
    "classification_loss",
]


# "small" adapters draw W_2 at this fraction of nn.Linear's default bound: close enough to the
# identity that training starts at zero-shot CLIP, far enough from 0 that the outer ReLU passes gradient
SMALL_INIT = 1e-2
# the authors' blend starts (eft/trainers/adapter_mask.py): images 0.2, texts 0
BLEND_RATIOS = {"image": 0.2, "text": 0.0}


def _uniform_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default initialisation, drawn from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
    if layer.bias is not None:
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _module_config(config: AdapterConfig | None, options: dict[str, Any], family: tuple[str, ...]) -> AdapterConfig:
    """A module's config: given whole, or built from its keyword options."""
    if config is None:
        return AdapterConfig.from_keywords(family, options)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}; or pass keyword options")
    if options:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    if config.method not in family:
        raise ValueError(f"this module builds {' or '.join(map(repr, family))}, not {config.method!r}")
    return config


def _pair(layer: nn.Linear) -> tuple[Tensor, Tensor]:
    return layer.weight, layer.bias


def check_features(
    image_features: Tensor,
    text_features: Tensor,
    dim: int,
    logit_scale: Tensor | float | None = None,
    *,
    finite: bool = True,
) -> None:
    """Raise a clear error for features (and a logit scale) an adapter of width ``dim`` cannot take.

    Shapes and dtypes are checked always, a scale given as a number too. With ``finite``, values
    (NaN or infinite entries, all-zero rows, a scale tensor that is not a finite number > 0) are
    checked for CPU tensors in eager mode (not while compiling or exporting), in one pass. CUDA
    tensors are never read: that would make the host wait for the device on every call (the
    wrapper checks class features once per class set instead).
    """
    if not isinstance(image_features, Tensor) or not isinstance(text_features, Tensor):
        raise TypeError(
            "image_features and text_features must be tensors, got "
            f"{type(image_features).__name__} and {type(text_features).__name__}"
        )
    if image_features.dim() != 2:
        raise ValueError(
            f"image_features must be (B, D) = (images, width), got shape {tuple(image_features.shape)}; "
            "for a single image use features.unsqueeze(0)"
        )
    if text_features.dim() != 2:
        raise ValueError(
            f"text_features must be (K, D) = (classes, width), got shape {tuple(text_features.shape)}; "
            "average template embeddings per class first (wrap().set_classes does this)"
        )
    if text_features.shape[0] == 0:
        raise ValueError("text_features has K = 0 classes; give at least one class")
    if image_features.shape[0] == 0:
        raise ValueError("image_features has B = 0 images; give at least one image")
    widths = (image_features.shape[1], text_features.shape[1])
    if widths != (dim, dim):
        raise ValueError(
            f"feature widths (image {widths[0]}, text {widths[1]}) must both equal the adapter's "
            f"dim={dim}; build the adapter with the encoders' embedding width"
        )
    named = (("image_features", image_features), ("text_features", text_features))
    for name, x in named:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; pass the encoder's output")
    scale = _scale_value(logit_scale)
    if not finite or image_features.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return  # value checks would wait for the device, or break the graph; eager CPU calls check
    flags = [check for _, x in named for check in (torch.isfinite(x).all(), x.ne(0).any(dim=-1).all())]
    if isinstance(scale, Tensor):
        flags.append(torch.isfinite(scale) & (scale > 0))
    if all(torch.stack([f.to(image_features.device) for f in flags]).tolist()):
        return
    for name, x in named:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} contains NaN or infinite values; check the encoder's inputs and "
                "precision (fp16 overflow is a common cause)"
            )
        zero = x.eq(0).all(dim=-1).nonzero().flatten().tolist()
        if zero:
            raise ValueError(
                f"{name} has {len(zero)} all-zero row(s) (e.g. row {zero[0]}): a zero vector has no direction, "
                "so its logits would be NaN; check how those features were made (padding? a failed encode?)"
            )
    if scale is not None:
        _bad_scale(float(scale))


def check_logit_scale(logit_scale: Tensor | float) -> None:
    """Raise a clear error unless ``logit_scale`` is a finite number > 0 (a float, or a scalar tensor)."""
    scale = _scale_value(logit_scale)
    if isinstance(scale, Tensor) and not bool(torch.isfinite(scale) & (scale > 0)):
        _bad_scale(float(scale))


def _scale_value(logit_scale: Tensor | float | None) -> Tensor | float | None:
    """The scale as a 0-d tensor or a float, its shape and type checked (a float's value too)."""
    if logit_scale is None:
        return None
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}; pass "
                "the multiplicative scale, e.g. model.logit_scale.exp()"
            )
        return logit_scale.detach().reshape(())
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a number or a scalar tensor, got {type(logit_scale).__name__}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        _bad_scale(logit_scale)
    return float(logit_scale)


def _bad_scale(value: float) -> None:
    raise ValueError(
        f"logit_scale must be a finite number > 0 (the multiplicative scale s, e.g. model.logit_scale.exp(), "
        f"about 100 for CLIP), got {value}; a log-scale passed without .exp() is a common cause"
    )


def _scale_tensor(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        return logit_scale.reshape(()).to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(logit_scale), device=like.device, dtype=torch.float32)


def _compute_dtype(image: Tensor, text: Tensor, parameters: Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: the widest of the features' and the parameters' (fp16 features
    meet fp32 parameters in fp32). Features wider than the parameters (fp64 features, fp32 ones for a
    half-precision adapter) are an error outside autocast, rather than a dtype clash deep in a kernel."""
    features = torch.promote_types(image.dtype, text.dtype)
    dtype = torch.promote_types(features, parameters.dtype)
    if dtype != parameters.dtype and not torch.is_autocast_enabled(image.device.type):
        raise TypeError(
            f"the features are {features} but the adapter's parameters are {parameters.dtype}; pass "
            f"features.to({parameters.dtype}), or cast the adapter to {features} to compute in it, "
            "or run under torch.autocast"
        )
    return dtype


class _Adapter(nn.Module):
    """What every adapter shares: checks, the loss, the config, the class-side terms."""

    config: AdapterConfig
    # Check features for NaN and infinity on every forward pass, for CPU tensors (eager mode only).
    # Never on CUDA: reading a value would make the host wait for the device in the training
    # step; the wrapper checks class features once per class set instead. False skips it on CPU too.
    check_finite: bool = True

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def has_mask(self) -> bool:
        return self.config.has_mask

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        *,
        return_mask: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, K)`` from raw features ``(B, D)`` and ``(K, D)``.

        Args:
            image_features: ``(B, D)`` raw image embeddings.
            text_features: ``(K, D)`` raw class text embeddings.
            logit_scale: the multiplicative scale ``s`` (``model.logit_scale.exp()``).
            return_mask: also return the ``(B, K, D)`` mask (RAda family only).
        """
        if return_mask and not self.has_mask:
            raise ValueError(
                f"method {self.config.method!r} has no rational mask; return_mask=True is for "
                "'rada', 'rada+adapter' and 'mma+rada'"
            )
        check_features(image_features, text_features, self.dim, logit_scale, finite=self.check_finite)
        # fp16 features (OpenAI's models on CUDA) meet fp32 parameters: the adapter math runs in fp32
        dtype = self.compute_dtype(image_features, text_features)
        image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        scale = _scale_tensor(logit_scale, image_features)
        logits, mask = self.logits_from_terms(image_features, self.class_terms(text_features, scale), scale)
        return (logits, mask) if return_mask else logits

    def compute_dtype(self, features: Tensor, text_features: Tensor | None = None) -> torch.dtype:
        """The dtype the adapter computes in for ``features`` (and ``text_features``): at least its parameters'
        (fp16 features meet fp32 parameters in fp32); features wider than the parameters are an error outside
        autocast (see :func:`_compute_dtype`)."""
        text = features if text_features is None else text_features
        return _compute_dtype(features, text, next(self.parameters()))

    def class_terms(self, text_features: Tensor, scale: Tensor) -> dict[str, Tensor]:
        """Everything the logits need from the classes alone, for :meth:`logits_from_terms`.

        With frozen encoders and fixed classes this is computed once per class set
        (:meth:`rada_mma.AdaptedCLIP.predict` and :func:`rada_mma.export` do); a forward
        pass computes it each time, so that gradients reach the parameters it uses.

        Args:
            text_features: ``(K, D)`` raw class text features, in :meth:`compute_dtype`.
            scale: the multiplicative logit scale, a scalar fp32 tensor.

        Returns:
            Named tensors: ``"text"``, the ``(K, D)`` normalised (adapted) class features,
            and the method's own terms (RAda: its text queries; MMA: the class keys and values).
        """
        raise NotImplementedError

    def logits_from_terms(
        self, image_features: Tensor, terms: dict[str, Tensor], scale: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, K)`` and the mask ``(B, K, D)`` (``None`` without one) from raw image features.

        Args:
            image_features: ``(B, D)`` raw image embeddings, in :meth:`compute_dtype`.
            terms: :meth:`class_terms` of the class set.
            scale: the multiplicative logit scale, a scalar fp32 tensor.

        Example:
            >>> terms = adapter.class_terms(text, scale)        # once per class set
            >>> logits, _ = adapter.logits_from_terms(image, terms, scale)
        """
        raise NotImplementedError

    def regularization(self, mask: Tensor | None) -> Tensor:
        """``alpha · reg(mask, 1)``; a zero tensor for methods without a mask or ``alpha = 0``."""
        if mask is None or not self.has_mask or self.config.alpha == 0:
            return torch.zeros((), device=self._device())
        return self.config.alpha * kernels.regularizer(mask, self.config.regularizer)

    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Cross-entropy plus the regulariser, as the released trainers compute it."""
        return classification_loss(logits, labels, self.regularization(mask))

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def classification_loss(
    logits: Tensor, labels: Tensor, regularization: Tensor | None = None, *, check: bool = True
) -> Tensor:
    """``F.cross_entropy(logits, labels) + regularization``: the loss every adapter trains with.

    The cross-entropy runs in fp32 whatever the logits' dtype (fp16 and bf16 logits lose
    too much in the log-softmax), as the released trainers compute it.

    Args:
        logits: ``(B, K)`` logits.
        labels: ``(B,)`` integer class indices in ``[0, K)``.
        regularization: the adapter's ``alpha · reg(mask)`` (a scalar), or ``None``.
        check: check the labels (see :func:`check_labels`); ``False`` in a hot loop whose
            labels were checked once.

    Example:
        >>> loss = classification_loss(model(images), labels, model.regularization())
    """
    if check:
        check_labels(labels, logits)
    loss = F.cross_entropy(logits.float(), labels)
    return loss if regularization is None else loss + regularization


def check_labels(labels: Tensor, logits: Tensor) -> None:
    """Labels must be integer class indices in ``[0, K)``, one per image."""
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(
            f"labels must be an integer tensor of class indices, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be (B,) = {tuple(logits.shape[:1])} to match the logits, got {tuple(labels.shape)}"
        )
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}) (the K = {logits.shape[1]} classes set), "
            f"got values in [{low}, {high}]; relabel to 0..K-1 in the order the classes were set"
        )


class ResidualAdapter(nn.Module):
    """CLIP-Adapter's bottleneck ``A(x) = ReLU(W_2 ReLU(W_1 x))`` on a feature, in one of three forms.

    ``W_1: D → D / reduction`` and ``W_2: D / reduction → D``, no biases, ``W_1``
    at ``nn.Linear``'s default initialisation. The forms (``init``):

    - ``"released"``: ``x + A(x)`` with ``W_2 = 0``, as RAda+Adapter was released. The
      outer ReLU then sees exactly 0, whose gradient is 0: the adapter never leaves
      the identity (kept for parity and for the authors' checkpoints).
    - ``"small"``: ``x + A(x)`` with ``W_2`` drawn at ``SMALL_INIT`` times ``nn.Linear``'s
      bound: starts within a hair of the identity, and trains.
    - ``"blend"``: ``r · A(x) + (1 − r) · x`` with a learnable scalar ``r`` starting at
      ``ratio`` and ``W_2`` at ``nn.Linear``'s default, the CLIP-Adapter blend of the
      authors' ``adapter_mask`` trainer (there ``r`` is 0.2 on images, 0 on texts).

    Args:
        dim: the feature width D.
        reduction: the bottleneck is ``D / reduction``.
        init: ``"released"``, ``"small"`` or ``"blend"``.
        ratio: the blend's starting ``r`` (``"blend"`` only).
        generator: draws the initial weights.

    Example:
        >>> adapter = ResidualAdapter(dim=512, init="blend", ratio=0.2)
        >>> adapter(torch.randn(4, 512)).shape
        torch.Size([4, 512])
    """

    def __init__(
        self,
        *,
        dim: int,
        reduction: int = 4,
        init: str = "released",
        ratio: float = 0.2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"init must be one of {ADAPTER_INITS}, got {init!r}")
        self.dim, self.reduction, self.init, self.start_ratio = dim, reduction, init, float(ratio)
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)
        # the blend's mixing weight: a 0-d parameter, as the authors' nn.Parameter(torch.tensor(0.2))
        self.ratio = nn.Parameter(torch.empty(())) if init == "blend" else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.down.weight, -bound, bound, generator=generator)
        up_bound = 1.0 / math.sqrt(self.dim // self.reduction)  # nn.Linear's own, for the up map's width
        if self.init == "released":
            nn.init.zeros_(self.up.weight)
        else:
            scale = SMALL_INIT if self.init == "small" else 1.0
            nn.init.uniform_(self.up.weight, -scale * up_bound, scale * up_bound, generator=generator)
        if self.ratio is not None:
            nn.init.constant_(self.ratio, self.start_ratio)

    def forward(self, x: Tensor) -> Tensor:
        if self.ratio is not None:
            return kernels.blend_adapter(x, self.down.weight, self.up.weight, self.ratio)
        return kernels.residual_adapter(x, self.down.weight, self.up.weight)

    def extra_repr(self) -> str:
        blend = f", ratio={self.start_ratio}" if self.ratio is not None else ""
        return f"dim={self.dim}, reduction={self.reduction}, init={self.init!r}{blend}"


class RationalMask(_Adapter):
    """RAda: a learned mask over the rational matrix ``f̂ ⊙ ĥ`` whose sum is the logit.

    One attention layer per image over its K class tokens (three query kinds:
    image, text, rational) gives ``M = ReLU(1 + W_o(·))``; ``W_o`` starts at
    zero, so training starts exactly at zero-shot CLIP. Logits are
    ``s · Σ_d M ⊙ f̂ ⊙ ĥ``.

    Build it from an :class:`AdapterConfig` (method ``"rada"`` or
    ``"rada+adapter"``) or from the config's fields as keywords; see
    :class:`AdapterConfig` for each option and its released default.

    Args:
        config: the whole configuration; or, instead, keyword options:
            ``dim`` (required), ``heads``, ``temperature``, ``softmax``
            (``"flat"`` as released, or ``"row"``), ``regularizer``, ``alpha``,
            and ``adapter_reduction=r`` for CLIP-Adapter bottlenecks ``D → D/r → D``
            on both features (the ``"rada+adapter"`` method; ``adapter_init``
            picks their form, see :class:`ResidualAdapter`).
        chunk_elements: block size of the portable attention kernel (memory, not results).
        generator: draws the initial weights.

    Example:
        >>> mask = RationalMask(dim=512)
        >>> logits, m = mask(torch.randn(4, 512), torch.randn(10, 512), 100.0, return_mask=True)
        >>> logits.shape, m.shape
        (torch.Size([4, 10]), torch.Size([4, 10, 512]))
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        chunk_elements: int = kernels.DEFAULT_CHUNK_ELEMENTS,
        generator: torch.Generator | None = None,
        **options: Any,
    ):
        super().__init__()
        self.config = _module_config(config, options, ("rada", "rada+adapter"))
        dim = self.config.dim
        self.chunk_elements = chunk_elements
        self.query_image = nn.Linear(dim, dim)
        self.query_text = nn.Linear(dim, dim)
        self.to_qkv_rational = nn.Linear(dim, 3 * dim)  # rational query, key, value stacked
        self.to_out = nn.Linear(dim, dim)
        if self.config.method == "rada":
            self.image_adapter = self.text_adapter = None
        else:
            c = self.config
            self.image_adapter, self.text_adapter = (
                ResidualAdapter(dim=dim, reduction=c.reduction, init=c.adapter_init, ratio=BLEND_RATIOS[side])
                for side in ("image", "text")
            )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _uniform_linear(self.query_image, generator)
        _uniform_linear(self.query_text, generator)
        for part in self.to_qkv_rational.weight.detach().chunk(3):  # each as its own Linear(D, D)
            bound = 1.0 / math.sqrt(self.dim)
            nn.init.uniform_(part, -bound, bound, generator=generator)
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.to_qkv_rational.bias, -bound, bound, generator=generator)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        for adapter in (self.image_adapter, self.text_adapter):
            if adapter is not None:
                adapter.reset_parameters(generator)

    def _attention(self) -> dict[str, Any]:
        c = self.config
        return dict(
            query_image=_pair(self.query_image),
            query_text=_pair(self.query_text),
            qkv_rational=_pair(self.to_qkv_rational),
            heads=c.heads,
            temperature=c.temperature,
            softmax=c.softmax,
            chunk_elements=self.chunk_elements,
        )

    def mask(self, f: Tensor, h: Tensor, scale: Tensor, *, text_queries: Tensor | None = None) -> Tensor:
        """The ``(B, K, D)`` mask for normalised ``f`` ``(B, D)`` and ``h`` ``(K, D)`` or ``(B, K, D)``.

        ``text_queries``: :func:`rada_mma.kernels.rada_text_queries` of ``h``, when computed once per class set.
        """
        return kernels.rada_mask(f, h, scale, out=_pair(self.to_out), text_queries=text_queries, **self._attention())

    def masked_logits(
        self, f: Tensor, h: Tensor, scale: Tensor, *, text_queries: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Logits ``(B, K)`` and mask ``(B, K, D)`` for normalised ``f`` and ``h`` (as :meth:`mask` takes them)."""
        return kernels.rada_masked_logits(f, h, scale, out=_pair(self.to_out), text_queries=text_queries,
                                          **self._attention())

    def class_terms(self, text_features: Tensor, scale: Tensor) -> dict[str, Tensor]:
        text = text_features if self.text_adapter is None else self.text_adapter(text_features)
        h = kernels.normalize(text)  # (K, D)
        return {"text": h, "text_queries": kernels.rada_text_queries(h, scale, _pair(self.query_text))}

    def logits_from_terms(self, image_features: Tensor, terms: dict[str, Tensor], scale: Tensor) -> tuple[Tensor, Tensor]:
        image = image_features if self.image_adapter is None else self.image_adapter(image_features)
        return self.masked_logits(kernels.normalize(image), terms["text"], scale, text_queries=terms["text_queries"])

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, heads={c.heads}, temperature={c.temperature}, softmax={c.softmax!r}, "
            f"regularizer={c.regularizer!r}, alpha={c.alpha}"
        )


class MultiModalAdapter(_Adapter):
    """MMA: masked multi-head attention over the class texts and the image, down-sampled.

    Per image, the sequence ``[ĥ_1 … ĥ_K, f̂_b]`` goes through ``down``
    (``D → d``), a ``heads``-head attention and ``up`` (``d → D``), and the
    outputs are blended back: ``norm(λ·norm(a) + (1 − λ)·x)``.

    Args:
        config: an :class:`AdapterConfig` of method ``"mma"`` or ``"mma-master"``;
            or, instead, keyword options: ``dim`` (required), ``bottleneck``
            (d, default ``D / 4``), ``heads`` (MMA's heads over d, 4 as released;
            the config calls it ``mma_heads``), ``blend`` (λ, 0.2), ``variant``
            and ``hidden``. ``variant="paper"``: texts see only the image and the
            image only the texts; ``"master"``: the earlier release (method
            ``"mma-master"``): two-layer down/up maps of inner width ``hidden``
            (GELU inside ``up``), every token sees every token, +1 added to
            cross-modal scores.
        generator: draws the initial weights.

    Example:
        >>> mma = MultiModalAdapter(dim=512)
        >>> mma(torch.randn(4, 512), torch.randn(10, 512), 100.0).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        **options: Any,
    ):
        super().__init__()
        self.config = _module_config(config, options, ("mma", "mma-master"))
        dim, n, hidden = self.config.dim, self.config.mma_width, self.config.hidden
        if self.variant == "paper":
            self.down = nn.Linear(dim, n)
            self.up = nn.Linear(n, dim)
        else:
            self.down = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, n))
            self.up = nn.Sequential(nn.Linear(n, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.to_qkv = nn.Linear(n, 3 * n)  # nn.MultiheadAttention's packed in_proj
        self.to_out = nn.Linear(n, n)  # its out_proj
        self.reset_parameters(generator)

    @property
    def variant(self) -> str:
        """``"paper"`` (``"mma"``) or ``"master"`` (``"mma-master"``)."""
        return self.config.variant

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Linear) and layer is not self.to_qkv:
                _uniform_linear(layer, generator)
        # nn.MultiheadAttention's own initialisation
        nn.init.xavier_uniform_(self.to_qkv.weight, generator=generator)
        nn.init.zeros_(self.to_qkv.bias)
        nn.init.zeros_(self.to_out.bias)

    def adapted_features(
        self, f: Tensor, h: Tensor, *, class_terms: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Paper variant: adapted image features ``f'`` and the per-image text direction ``t̂``, both ``(B, D)``.

        ``class_terms``: the class keys and values (:func:`rada_mma.kernels.mma_class_terms`), when
        computed once per class set.
        """
        c = self.config
        return kernels.mma_text_features(
            f,
            h,
            down=_pair(self.down),
            in_proj=_pair(self.to_qkv),
            out_proj=_pair(self.to_out),
            up=_pair(self.up),
            heads=c.mma_heads,
            blend=c.blend,
            class_terms=class_terms,
        )

    def image_attention(self, f: Tensor, h: Tensor) -> Tensor:
        """The image token's attention over the K classes, ``(B, heads, K)``, for normalised ``f``, ``h``."""
        return kernels.mma_image_attention(
            self.down(f), self.down(h), in_proj=_pair(self.to_qkv), heads=self.config.mma_heads,
            master=self.variant == "master",
        )

    def _down_layers(self) -> tuple:
        return (_pair(self.down[0]), _pair(self.down[1])) if self.variant == "master" else _pair(self.down)

    def class_terms(self, text_features: Tensor, scale: Tensor) -> dict[str, Tensor]:
        h = kernels.normalize(text_features)  # (K, D)
        options = dict(down=self._down_layers(), in_proj=_pair(self.to_qkv), heads=self.config.mma_heads)
        if self.variant == "master":
            return {"text": h, **kernels.mma_master_class_terms(h, **options)}
        keys, values = kernels.mma_class_terms(h, **options)
        return {"text": h, "keys": keys, "values": values}

    def logits_from_terms(self, image_features: Tensor, terms: dict[str, Tensor], scale: Tensor) -> tuple[Tensor, None]:
        c = self.config
        f, h = kernels.normalize(image_features), terms["text"]
        if self.variant == "master":
            logits = kernels.mma_master_logits(
                f,
                h,
                scale,
                down=self._down_layers(),
                in_proj=_pair(self.to_qkv),
                out_proj=_pair(self.to_out),
                up=(_pair(self.up[0]), _pair(self.up[2])),
                heads=c.mma_heads,
                blend=c.blend,
                class_terms={k: v for k, v in terms.items() if k != "text"},
            )
            return logits, None
        f2, t = self.adapted_features(f, h, class_terms=(terms["keys"], terms["values"]))
        return kernels.mma_logits(f2, t, h, scale, c.blend), None

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, bottleneck={c.mma_width}, heads={c.mma_heads}, blend={c.blend}, variant={self.variant!r}"


class MMARationalMask(_Adapter):
    """``"mma+rada"``: MMA adapts the features, RAda masks their rational matrix.

    The MMA-adapted text features differ per image (``h'_{b,k}``), so the mask
    attention runs with per-image text queries; memory stays ``O(B·K·D)``.
    With the mask at its initial value 1 this is exactly MMA.

    Built from an :class:`AdapterConfig` of method ``"mma+rada"`` or its fields
    as keywords (``heads`` is RAda's, ``mma_heads`` MMA's).
    """

    def __init__(self, config: AdapterConfig | None = None, *, generator: torch.Generator | None = None, **options: Any):
        super().__init__()
        # the RAda part's block size, as RationalMask(chunk_elements=...) takes it
        chunk = {"chunk_elements": options.pop("chunk_elements")} if "chunk_elements" in options else {}
        self.config = _module_config(config, options, ("mma+rada",))
        self.mma = MultiModalAdapter(dataclasses.replace(self.config, method="mma"), generator=generator)
        self.rada = RationalMask(dataclasses.replace(self.config, method="rada"), generator=generator, **chunk)

    def class_terms(self, text_features: Tensor, scale: Tensor) -> dict[str, Tensor]:
        return self.mma.class_terms(text_features, scale)  # RAda's text queries differ per image here

    def logits_from_terms(self, image_features: Tensor, terms: dict[str, Tensor], scale: Tensor) -> tuple[Tensor, Tensor]:
        f, h = kernels.normalize(image_features), terms["text"]
        f2, t = self.mma.adapted_features(f, h, class_terms=(terms["keys"], terms["values"]))  # (B, D), (B, D)
        h2 = kernels.mma_adapted_text(t, h, self.config.blend)  # (B, K, D)
        return self.rada.masked_logits(f2, h2, scale)


_MODULES: dict[str, type[_Adapter]] = {
    "rada": RationalMask,
    "rada+adapter": RationalMask,
    "mma": MultiModalAdapter,
    "mma-master": MultiModalAdapter,
    "mma+rada": MMARationalMask,
}


def build_adapter(config: AdapterConfig, *, generator: torch.Generator | None = None) -> _Adapter:
    """The feature-level module for ``config`` (see :class:`rada_mma.AdapterConfig`)."""
    return _MODULES[config.method](config, generator=generator)

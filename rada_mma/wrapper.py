"""``wrap``: attach an adapter to an existing CLIP by composition; ``load``: a saved one, in one call.

The wrapper holds the base model and calls its public encoders; it never
patches the model. With the backbone frozen (the default) encoders run under
``torch.no_grad`` in eval mode and the class text features are computed once;
without gradients (evaluation, :meth:`AdaptedCLIP.predict`) so is everything
else the adapter derives from the classes alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels
from ._version import __version__
from .backends import Backend, detect_backend, model_device
from .config import AdapterConfig
from .io import write_json
from .modules import _Adapter, build_adapter, check_features, check_logit_scale, classification_loss
from .serialization import (
    BaseIdentity,
    ClassSet,
    base_identity,
    check_base,
    load_adapter,
    read_adapter,
    save_adapter,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "AdaptedCLIP", "Prediction", "load", "wrap"]

# The files of a folder written by AdaptedCLIP.save_pretrained (peft's layout, our names)
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

Template = str | Callable[[str], str]
DEFAULT_TEMPLATES: tuple[Template, ...] = ("a photo of a {}.",)


@dataclass
class _Hold:
    """What the live wrappers of one base model share: the caller's flags from before the first wrap."""

    requires_grad: dict[str, bool]  # parameter name -> requires_grad
    modes: dict[str, bool]  # module name -> training
    wrappers: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # live (not unwrapped) AdaptedCLIPs


# base model -> its _Hold. Kept here, not on the model, so that wrapping never patches it; weak keys
# and a weak set, so that a model or wrapper dropped by the caller leaves nothing behind.
_HOLDS: weakref.WeakKeyDictionary[nn.Module, _Hold] = weakref.WeakKeyDictionary()


def wrap(
    model: nn.Module,
    method: str = "rada",
    *,
    backend: str | None = None,
    freeze_backbone: bool = True,
    dim: int | None = None,
    logit_scale: float | None = None,
    config: AdapterConfig | None = None,
    generator: torch.Generator | None = None,
    base_name: str | None = None,
    pretrained: str | None = None,
    **options: Any,
) -> AdaptedCLIP:
    """Attach a ``method`` adapter to a CLIP model.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP``, a transformers
            ``CLIPModel``/``SiglipModel``, an OpenAI ``clip`` model, or any module
            with ``encode_image`` and ``encode_text``.
        method: ``"rada"``, ``"rada+adapter"``, ``"mma"``, ``"mma-master"`` or ``"mma+rada"``.
        backend: force ``"open_clip"``, ``"hf"``, ``"openai"`` or ``"generic"``.
        freeze_backbone: ``False`` trains the encoders with the adapter (RAda-FT).
        dim: embedding width, when the model does not tell it.
        logit_scale: multiplicative logit scale, when the model has no ``logit_scale``.
        config: a full :class:`AdapterConfig` instead of ``method`` and ``options``.
        generator: draws the adapter's initial weights.
        base_name: the base model's architecture (e.g. ``"ViT-B-16"``), recorded in saved
            adapters; Hugging Face models tell it themselves.
        pretrained: the pretrained tag or weights file the base was loaded from, recorded too.
        **options: adapter options (``heads``, ``temperature``, ``alpha``, ``blend``, ...).

    Wrapping freezes the backbone's parameters (all but the encoders' with
    ``freeze_backbone=False``) and :meth:`AdaptedCLIP.unwrap` gives back the
    caller's ``requires_grad`` flags and train/eval modes. One base model may be
    held by several wrappers at once (e.g. two methods compared on one CLIP) if
    they agree on ``freeze_backbone``: all of them restore the flags the model had
    before the first of them, and the base stays frozen until the last live one is
    unwrapped. A wrapper dropped without ``unwrap()`` leaves the base as it set it.

    Example:
        >>> model = wrap(open_clip_model, method="rada")
        >>> model.set_classes(["cat", "dog"], tokenizer=tokenizer)
        >>> logits = model(images)   # (B, 2)
    """
    if isinstance(model, AdaptedCLIP):
        raise TypeError(
            f"the model is already an AdaptedCLIP (with a {model.adapter.config.method!r} adapter); use it as is, "
            "or call wrap(model.unwrap(), ...) to attach a different adapter to its base model"
        )
    chosen = detect_backend(model, backend)
    width = dim or chosen.embed_dim(model)
    if config is None:
        if width is None:
            raise ValueError(
                f"cannot tell the embedding width of {type(model).__name__}; pass dim=<width of encode_image output>"
            )
        config = AdapterConfig.for_method(method, width, **options)
    elif options or (dim is not None and dim != config.dim):
        raise TypeError("pass either config= or method options, not both")
    own_scale = chosen.logit_scale(model)
    if own_scale is None and logit_scale is None:
        raise ValueError(
            f"{type(model).__name__} has no logit_scale; pass logit_scale=<multiplicative scale, e.g. 100.0>"
        )
    # refused here, once, rather than as NaN logits later (RAda takes its square root)
    check_logit_scale(logit_scale if logit_scale is not None else own_scale.detach().reshape(()))
    adapter = build_adapter(config, generator=generator).to(model_device(model))
    return AdaptedCLIP(
        model, adapter, chosen, freeze_backbone=freeze_backbone, logit_scale=logit_scale, base_name=base_name,
        pretrained=pretrained,
    )


class AdaptedCLIP(nn.Module):
    """A CLIP with an adapter on its final embeddings; ``forward(images) -> (B, K)`` logits.

    Made by :func:`wrap`. Set the classes once with :meth:`set_classes`; train
    :meth:`trainable_parameters` with ``F.cross_entropy(logits, labels) +
    model.regularization()``; save with :meth:`save_adapter`.

    ``model.half()`` or ``model.to(torch.bfloat16)`` casts the base model, the
    adapter and the class features, as for any module: the encoders and the
    adapter then compute in that dtype, and the encoders' outputs and the logits
    still come back in fp32.

    ``model.logit_scale`` is the base model's stored (log) scale, as on the base:
    ``model.logit_scale.exp()`` is the multiplier; :meth:`multiplicative_scale` gives it directly.
    """

    def __init__(
        self,
        base: nn.Module,
        adapter: _Adapter,
        backend: Backend,
        *,
        freeze_backbone: bool = True,
        logit_scale: float | None = None,
        base_name: str | None = None,
        pretrained: str | None = None,
    ):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.backend = backend
        self.freeze_backbone = freeze_backbone
        self._fixed_scale = logit_scale
        # what saved adapters record about the base (see base_identity)
        self.base_name = base_name or _own_name(base)
        self.base_pretrained = pretrained
        self.class_names: tuple[str, ...] | None = None  # names of the classes set, when known
        self.class_templates: tuple[str, ...] | None = None  # their prompt templates, when strings
        self._terms: tuple[tuple, dict[str, Tensor]] | None = None  # (freshness key, adapter.class_terms)
        # what unwrap() restores: the caller's requires_grad flags and modes from before the first wrap
        self._base_requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        self._base_modes = {name: m.training for name, m in base.named_modules()}
        self._hold_base()
        self._adapter_enabled = True
        self._class_tokens: Any = None  # (K, T, L) token ids, kept only when the text encoder trains
        self._regularization: Tensor | None = None
        self.register_buffer("class_features", None, persistent=False)  # (K, D) raw or ensembled
        for name, p in base.named_parameters():
            # the logit scale (and SigLIP's bias) stay frozen even in RAda-FT, as released
            p.requires_grad_(not freeze_backbone and name not in ("logit_scale", "logit_bias"))
        self.train(self._base_modes[""])

    def _hold_base(self) -> None:
        """Join the live wrappers of ``self.base``, or become the first; take the caller's flags from the first."""
        hold = _HOLDS.get(self.base)
        if hold is None or not hold.wrappers:
            hold = _HOLDS[self.base] = _Hold(dict(self._base_requires_grad), dict(self._base_modes))
        else:
            other = next(iter(hold.wrappers))
            if other.freeze_backbone != self.freeze_backbone:
                raise ValueError(
                    f"this base model is already wrapped with freeze_backbone={other.freeze_backbone}; wrappers "
                    "sharing a base must agree on it: unwrap() the other wrapper first, or wrap a copy of the model"
                )
            self._base_requires_grad, self._base_modes = dict(hold.requires_grad), dict(hold.modes)
        hold.wrappers.add(self)

    # -- copies -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_terms"] = None  # recomputed on demand; its key names this process's tensors
        if self._regularization is not None:
            # the last forward's graph cannot be copied or pickled: a copy keeps its value, without gradient
            state["_regularization"] = self._regularization.detach()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hold_base()  # a deep copy holds its copy of the base as the original holds the base

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the cached class terms are stale
        self._terms = None
        return super()._apply(fn, recurse)

    # -- modes ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> AdaptedCLIP:
        super().train(mode)
        if self.freeze_backbone:
            self.base.eval()  # frozen encoders never switch dropout or norm statistics on
        return self

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this context the model gives zero-shot CLIP logits."""
        previous, self._adapter_enabled = self._adapter_enabled, False
        try:
            yield
        finally:
            self._adapter_enabled = previous

    @property
    def adapter_enabled(self) -> bool:
        """``False`` inside :meth:`disable_adapter`: the model gives zero-shot CLIP logits."""
        return self._adapter_enabled

    def unwrap(self) -> nn.Module:
        """The base model, with its original ``requires_grad`` flags and train/eval mode.

        While other live wrappers hold the same base model (see :func:`wrap`) it stays as they
        need it, with a warning; the last of them to be unwrapped restores it.
        """
        hold = _HOLDS.get(self.base)
        if hold is not None:
            hold.wrappers.discard(self)
            if hold.wrappers:
                warnings.warn(
                    f"the base model is still held by {len(hold.wrappers)} other AdaptedCLIP(s), so it stays "
                    "frozen; its requires_grad flags and modes come back when the last of them is unwrapped",
                    stacklevel=2,
                )
                return self.base
            del _HOLDS[self.base]
        for name, p in self.base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        for name, m in self.base.named_modules():  # per module: a caller's base.visual.eval() survives
            m.training = self._base_modes.get(name, m.training)
        return self.base

    # -- parameters -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to hand to the optimiser (the adapter's, plus the encoders' in RAda-FT)."""
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (as peft does)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- encoders ---------------------------------------------------------------------------

    def _encoder_context(self):
        return torch.no_grad() if self.freeze_backbone else contextlib.nullcontext()

    def encode_image(self, images: Any) -> Tensor:
        """Raw image embeddings ``(B, D)`` in fp32 (no gradient when the backbone is frozen)."""
        with self._encoder_context():
            return self.backend.encode_image(self.base, images).float()

    def encode_text(self, tokens: Any) -> Tensor:
        """Raw text embeddings ``(N, D)`` in fp32 (no gradient when the backbone is frozen)."""
        with self._encoder_context():
            return self.backend.encode_text(self.base, tokens).float()

    @property
    def logit_scale(self) -> Tensor:
        """The stored log logit scale, as on the base model: ``model.logit_scale.exp()`` is ``s``.

        The base model's own tensor where it has one; never trained by the wrapper.
        """
        stored = getattr(self.base, "logit_scale", None)
        if self._fixed_scale is None and isinstance(stored, Tensor):
            return stored
        return self.multiplicative_scale().log()

    def multiplicative_scale(self) -> Tensor:
        """The multiplicative logit scale ``s`` (``exp`` of :attr:`logit_scale`), fp32, without gradient."""
        if self._fixed_scale is not None:
            return torch.tensor(float(self._fixed_scale), device=model_device(self.adapter))
        return self.backend.logit_scale(self.base).detach().float().reshape(())

    def logit_bias(self) -> Tensor | None:
        bias = self.backend.logit_bias(self.base)
        return None if bias is None else bias.detach().float().reshape(())

    # -- classes ----------------------------------------------------------------------------

    def tokenize_prompts(
        self, classnames: Sequence[str], *, tokenizer: Callable[..., Any], templates: Sequence[Template] | None = None
    ) -> Any:
        """Token ids of every class in every template: ``(K, T, L)``, class-major.

        ``[k, t]`` holds ``templates[t]`` filled with ``classnames[k]``. A Hugging Face
        tokenizer gives a dict of such ``(K, T, L)`` tensors (``input_ids``, ``attention_mask``).
        :meth:`encode_class_tokens` and :meth:`set_classes` take the result.

        Args:
            classnames: K class names.
            tokenizer: the model's tokenizer (open_clip's, a transformers tokenizer, ``clip.tokenize``).
            templates: T templates, strings with one ``{}`` or callables ``name -> prompt``;
                default ``("a photo of a {}.",)``.

        Example:
            >>> tokens = model.tokenize_prompts(["cat", "dog"], tokenizer=tokenizer, templates=["a {}.", "art of a {}."])
            >>> tokens.shape   # (2, 2, 77)
        """
        if isinstance(classnames, str):
            raise TypeError("classnames must be a list of class names, not a single string")
        if not all(isinstance(c, str) for c in classnames):
            raise TypeError(f"class names must be strings, got {sorted({type(c).__name__ for c in classnames})}")
        if len(classnames) == 0:
            raise ValueError("got K = 0 class names; give at least one class")
        templates = list(DEFAULT_TEMPLATES if templates is None else templates)
        if not templates:
            raise ValueError("templates is empty; give at least one, or leave it out for 'a photo of a {}.'")
        for template in templates:
            _check_template(template)
        texts = [_fill(t, name) for name in classnames for t in templates]  # class-major
        tokens = self.backend.tokenize(tokenizer, texts)  # (K·T, L)
        shape = (len(classnames), len(templates), -1)
        if isinstance(tokens, Tensor):
            return tokens.reshape(shape)  # (K, T, L)
        if isinstance(tokens, Mapping):
            return {k: v.reshape(shape) if isinstance(v, Tensor) else v for k, v in tokens.items()}
        raise TypeError(
            f"the tokenizer returned a {type(tokens).__name__}; it must return token ids as a tensor "
            "(or, for Hugging Face models, a BatchEncoding)"
        )

    def encode_class_tokens(self, tokens: Any, *, batch_size: int = 256) -> Tensor:
        """Raw text embeddings ``(K, T, D)`` in fp32 of class prompts' token ids, not ensembled.

        Args:
            tokens: ``(K, L)`` (one prompt per class) or ``(K, T, L)`` token ids, e.g. from
                :meth:`tokenize_prompts`; for Hugging Face models also a tokenizer's ``BatchEncoding``.
            batch_size: prompts per pass through the text encoder.

        No gradient when the backbone is frozen.
        """
        flat, per_class = _flat_prompts(tokens)  # (K·T, L)
        chunks = [self.encode_text(_to_device(part, self)) for part in _batches(flat, batch_size)]
        features = torch.cat(chunks)  # (K·T, D)
        return features.reshape(-1, per_class, features.shape[-1])  # (K, T, D)

    def encode_class_names(
        self,
        classnames: Sequence[str],
        *,
        tokenizer: Callable[..., Any],
        templates: Sequence[Template] | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """Raw text embeddings of every class in every template, ``(K, T, D)`` in fp32, not ensembled.

        What :meth:`set_classes` computes from names before it ensembles the T templates;
        arguments as :meth:`tokenize_prompts`. No gradient when the backbone is frozen.

        Example:
            >>> text = model.encode_class_names(["cat", "dog"], tokenizer=tokenizer, templates=["a {}.", "art of a {}."])
            >>> text.shape   # (2, 2, D)
            >>> model.set_classes(text_features=text)   # as set_classes(["cat", "dog"], tokenizer=..., templates=...)
        """
        tokens = self.tokenize_prompts(classnames, tokenizer=tokenizer, templates=templates)
        return self.encode_class_tokens(tokens, batch_size=batch_size)

    def set_classes(
        self,
        classes: Tensor | Sequence[str] | Any | None = None,
        *,
        tokenizer: Callable[..., Any] | None = None,
        templates: Sequence[Template] | None = None,
        text_features: Tensor | None = None,
        names: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> AdaptedCLIP:
        """Set the K classes the model scores; changing classes (base → new) is one call.

        Give exactly one of:

        - token ids: ``(K, L)``, one prompt per class, or ``(K, T, L)``, T templates
          per class (or a tokenizer's ``BatchEncoding`` for Hugging Face models);
        - class names with ``tokenizer=`` (and optional ``templates=``, strings with
          ``{}`` or callables; default ``"a photo of a {}."``);
        - ``text_features=`` ``(K, D)`` or ``(K, T, D)`` precomputed embeddings.

        Several templates are ensembled as open_clip's zero-shot classifier does:
        normalise each, average, normalise. With the backbone frozen the features
        are computed once here, without gradients.

        ``names=`` names the classes given as token ids or features (class names name
        themselves): :meth:`predict` reports them and :meth:`save_adapter` can store them.
        """
        given = sum(x is not None for x in (classes, text_features))
        if given != 1:
            raise ValueError("set_classes takes exactly one of: token ids, class names (with tokenizer=), text_features=")
        if text_features is not None:
            features = _ensemble(_usable_rows(self._check_text_features(text_features)))
            self._class_tokens = None
            self._store(features, names, _string_templates(templates))
            return self
        if isinstance(classes, str):
            raise TypeError("classes must be a list of class names, not a single string")
        if isinstance(classes, Sequence) and all(isinstance(c, str) for c in classes):
            if tokenizer is None:
                raise ValueError("class names need a tokenizer: set_classes(names, tokenizer=open_clip.get_tokenizer(...))")
            if names is not None and list(names) != list(classes):
                raise ValueError("names= is for classes given as token ids or features; class names name themselves")
            tokens = self.tokenize_prompts(classes, tokenizer=tokenizer, templates=templates)
            names, templates = classes, list(DEFAULT_TEMPLATES if templates is None else templates)
        elif templates is not None or tokenizer is not None:
            raise ValueError("tokenizer= and templates= go with class names; token ids are used as given")
        else:
            tokens = classes
        features = self.encode_class_tokens(tokens, batch_size=batch_size)  # (K, T, D)
        self._class_tokens = tokens if not self.freeze_backbone else None
        self._store(_ensemble(_usable_rows(features)), names, _string_templates(templates))
        return self

    def _check_text_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() not in (2, 3):
            raise ValueError(
                f"text_features must be a (K, D) or (K, T, D) tensor, got "
                f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}"
            )
        if features.shape[0] == 0:
            raise ValueError("text_features has K = 0 classes; give at least one class")
        if features.shape[-1] != self.adapter.dim:
            raise ValueError(
                f"text_features have width {features.shape[-1]}, the adapter expects {self.adapter.dim} "
                "(the model's embedding width)"
            )
        return features.detach().float() if self.freeze_backbone else features.float()

    def _store(self, features: Tensor, names: Sequence[str] | None, templates: tuple[str, ...] | None) -> None:
        # checked once per class set (this reads the values: on CUDA the host waits for the device once)
        if not bool(torch.isfinite(features.detach()).all()):
            raise ValueError("class text features contain NaN or infinite values; check the tokens and the text encoder")
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise TypeError("names must be a list of class names (strings)")
            if len(names) != features.shape[0]:
                raise ValueError(f"got {len(names)} names for K = {features.shape[0]} classes")
        # in the adapter's dtype, as model.half() leaves a buffer set before it
        self.class_features = features.detach().to(self._adapter_dtype())
        self.class_names = None if names is None else tuple(names)
        self.class_templates = templates
        self._regularization = None
        self._terms = None

    def _adapter_dtype(self) -> torch.dtype:
        return next(self.adapter.parameters()).dtype

    def _adapter_precision(self) -> contextlib.AbstractContextManager:
        """Autocast to the adapter's dtype once the model was cast to half precision.

        The kernels normalise features in fp32 (as the authors do), so half-precision weights need
        autocast to meet them; with fp32 weights the caller's own autocast, if any, applies.
        """
        dtype = self._adapter_dtype()
        if dtype not in (torch.float16, torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(model_device(self.adapter).type, dtype=dtype)

    @property
    def num_classes(self) -> int:
        return 0 if self.class_features is None else self.class_features.shape[0]

    def text_features(self) -> Tensor:
        """The class features used by forward: cached, or re-encoded when the text encoder trains."""
        if self.class_features is None:
            raise RuntimeError(
                "no classes set: call model.set_classes(tokens | names, tokenizer=... | text_features=...) "
                "before the forward pass"
            )
        if self._class_tokens is not None:  # the text encoder trains: never use stale features
            return _ensemble(self.encode_class_tokens(self._class_tokens, batch_size=1 << 30))
        return self.class_features

    # -- forward ----------------------------------------------------------------------------

    def forward(self, images: Any) -> Tensor:
        """Logits ``(B, K)`` for a batch of images (preprocessed as the base model expects)."""
        self.text_features()  # no classes set: say so before running the image encoder
        return self.logits_from_features(self.encode_image(images))

    def logits_from_features(self, image_features: Tensor, text_features: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` in fp32 from raw image embeddings ``(B, D)`` (e.g. from a feature cache).

        After ``model.half()`` (or bf16) the adapter runs under autocast to its parameters' dtype:
        its matrix products in that dtype, norms and softmax statistics in fp32, as its kernels do
        under any autocast. Zero-shot logits are computed in fp32. Without gradients and with the
        stored classes, the adapter's class-side terms are computed once per class set.
        """
        text = self.text_features() if text_features is None else text_features
        scale = self.multiplicative_scale()
        if self._adapter_enabled:
            with self._adapter_precision():
                if text_features is None and self._class_tokens is None and not torch.is_grad_enabled():
                    logits, mask = self._logits_from_cached_terms(image_features, scale)
                elif self.adapter.has_mask and self.adapter.config.alpha > 0:
                    logits, mask = self.adapter(image_features, text, scale, return_mask=True)
                else:
                    logits, mask = self.adapter(image_features, text, scale), None
                regularised = mask is not None and self.adapter.config.alpha > 0
                self._regularization = self.adapter.regularization(mask) if regularised else None
        else:
            self._regularization = None
            check_features(image_features, text, self.adapter.dim, scale)
            logits = scale * kernels.normalize(image_features.float()) @ kernels.normalize(text.float()).T
        bias = self.logit_bias()
        logits = logits.float()
        return logits if bias is None else logits + bias

    def class_terms(self) -> dict[str, Tensor]:
        """The adapter's class-side terms for the stored classes (:meth:`rada_mma.RationalMask.class_terms`).

        Computed without gradients once per class set, adapter weights and logit scale, and
        reused until one of them changes: a prediction then costs the image encoder and the
        adapter's per-image work only.
        """
        self.text_features()  # raises when no classes are set
        scale = self.multiplicative_scale()
        stored = getattr(self.base, "logit_scale", None)
        key = (
            self.class_features.data_ptr(), self.class_features._version, self._fixed_scale,
            (stored.data_ptr(), stored._version) if isinstance(stored, Tensor) else None,
            tuple((p.data_ptr(), p._version) for p in self.adapter.parameters()),
        )  # fmt: skip
        if self._terms is None or self._terms[0] != key:
            text = self.class_features
            with torch.no_grad(), self._adapter_precision():
                terms = self.adapter.class_terms(text.to(self.adapter.compute_dtype(text)), scale)
            self._terms = (key, terms)
        return self._terms[1]

    def _logits_from_cached_terms(self, image_features: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        check_features(image_features, self.class_features, self.adapter.dim, finite=self.adapter.check_finite)
        image = image_features.to(self.adapter.compute_dtype(image_features))
        return self.adapter.logits_from_terms(image, self.class_terms(), scale)

    @torch.no_grad()
    def predict(
        self, images: Any, k: int = 5, *, preprocess: Callable[[Any], Tensor] | None = None, batch_size: int = 64
    ) -> Prediction:
        """The ``k`` most probable classes of each image, best first.

        Args:
            images: a batch as :meth:`forward` takes it (``(B, 3, H, W)``, preprocessed), or,
                with ``preprocess``, a sequence of raw images (e.g. ``PIL.Image``).
            k: classes per image (at most K).
            preprocess: turns one raw image into a ``(3, H, W)`` tensor (open_clip's preprocess).
            batch_size: images per forward pass.

        Returns:
            :class:`Prediction`: indices, softmax probabilities over the K classes, and names.

        Runs in eval mode without gradients; the class-side terms are computed once.

        Example:
            >>> top = model.predict(preprocess(Image.open("cat.jpg")).unsqueeze(0), k=3)
            >>> top.names[0], top.probabilities[0]
        """
        if self.class_features is None:
            raise RuntimeError("no classes set: call model.set_classes(...) (or load an adapter saved with its classes)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(k, self.num_classes)
        was_training = self.training
        self.eval()
        try:
            logits = torch.cat([self(part) for part in _image_batches(images, preprocess, batch_size, self.base)])
        finally:
            self.train(was_training)
        top = logits.softmax(dim=-1).topk(k, dim=-1)
        indices = top.indices.cpu()
        names = None
        if self.class_names is not None:
            names = [[self.class_names[i] for i in row] for row in indices.tolist()]
        return Prediction(indices=indices, probabilities=top.values.cpu(), names=names)

    def regularization(self) -> Tensor:
        """``alpha · reg(mask)`` of the last forward pass; zero for methods without a mask or ``alpha = 0``."""
        if self._regularization is None:
            return torch.zeros((), device=model_device(self.adapter))
        return self._regularization

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``F.cross_entropy(logits, labels) + self.regularization()``, with the labels checked."""
        return classification_loss(logits, labels, self.regularization())

    # -- saving -----------------------------------------------------------------------------

    def base_identity(self) -> BaseIdentity:
        """What a saved adapter records about the base model: backend, name, tag, width, weights fingerprint."""
        return base_identity(
            self.base, backend=self.backend.name, dim=self.adapter.dim, name=self.base_name,
            pretrained=self.base_pretrained,
        )

    def save_adapter(
        self, path: str | os.PathLike, *, overwrite: bool = False, include_classes: bool = False
    ) -> Path:
        """Save the adapter's tensors, configuration and base identity (see :func:`rada_mma.save_adapter`).

        Args:
            path: destination, conventionally ``*.safetensors``.
            overwrite: replace an existing file.
            include_classes: also store the classes set (their text features, names and
                templates), so that :func:`rada_mma.load` gives a model that predicts at once.
        """
        return save_adapter(
            self.adapter, path, overwrite=overwrite, metadata={"backend": self.backend.name},
            base=self.base_identity(), classes=self._class_set() if include_classes else None,
        )

    def _class_set(self) -> ClassSet:
        if self.class_features is None:
            raise ValueError("include_classes=True but no classes are set: call set_classes first")
        return ClassSet(text_features=self.text_features().detach(), names=self.class_names, templates=self.class_templates)

    def load_adapter(self, path: str | os.PathLike, *, strict: bool = False) -> AdaptedCLIP:
        """Load adapter weights saved by :meth:`save_adapter` (checked against this model).

        A file trained on another base model warns, naming both (``strict=True``: an
        error). The classes a file may hold are not set: :func:`rada_mma.load` sets them.
        """
        check_base(read_adapter(path).base, self.base_identity(), path, strict=strict)
        load_adapter(path, self.adapter)
        return self

    def save_pretrained(
        self, folder: str | os.PathLike, *, include_classes: bool = False, overwrite: bool = False
    ) -> Path:
        """peft's layout: ``folder/adapter.safetensors`` and a readable ``folder/adapter_config.json``.

        The safetensors file is the whole record (:meth:`save_adapter`); the JSON repeats its
        configuration, base and class names for people and tools.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / ADAPTER_CONFIG
        if not overwrite and config_path.exists():
            raise FileExistsError(f"{config_path} exists; pass overwrite=True to replace it, or choose another folder")
        path = self.save_adapter(folder / ADAPTER_FILE, overwrite=overwrite, include_classes=include_classes)
        info = read_adapter(path)
        classes = info.classes
        write_json(config_path, {
            "format": "rada_mma.adapter_config", "rada_mma_version": __version__, "method": info.config.method,
            "config": json.loads(info.config.to_json()), "base": None if info.base is None else json.loads(info.base.to_json()),
            "classes": None if classes is None else {"count": classes.text_features.shape[0],
                                                     "names": classes.names, "templates": classes.templates},
        })  # fmt: skip
        return folder

    @classmethod
    def from_file(cls, model: nn.Module, path: str | os.PathLike, *, strict: bool = False, **options: Any) -> AdaptedCLIP:
        """:func:`rada_mma.load`: ``model`` wrapped with the file's adapter, weights and classes."""
        return load(model, path, strict=strict, **options)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | os.PathLike, *, strict: bool = False, **options: Any) -> AdaptedCLIP:
        """peft's name for :func:`rada_mma.load` of a folder written by :meth:`save_pretrained`."""
        return load(model, folder, strict=strict, **options)

    def extra_repr(self) -> str:
        return f"backend={self.backend.name!r}, classes={self.num_classes}, freeze_backbone={self.freeze_backbone}"


def _check_template(template: Template) -> None:
    """A template is a callable ``name -> prompt`` or a string with exactly one ``{}``."""
    if callable(template):
        return
    if not isinstance(template, str):
        raise TypeError(f"a template must be a string with one {{}} or a callable name -> prompt, got {template!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # an unmatched brace
        fields = None
    if fields != [""]:
        raise ValueError(
            f"template {template!r} must hold exactly one {{}} where the class name goes, e.g. 'a photo of a {{}}.' "
            "(write a literal brace as {{ or }}, or pass a callable name -> prompt)"
        )


def _fill(template: Template, name: str) -> str:
    if not callable(template):
        return template.format(name)
    prompt = template(name)
    if not isinstance(prompt, str):
        raise TypeError(f"template {template!r} returned a {type(prompt).__name__} for {name!r}; it must return a string")
    return prompt


def _flat_prompts(tokens: Any) -> tuple[Any, int]:
    """Token ids as ``(K·T, L)`` class-major rows and the number T of prompts per class."""
    if isinstance(tokens, Mapping) and "input_ids" in tokens:  # a tokenizer's BatchEncoding
        ids = tokens["input_ids"]
    elif isinstance(tokens, Tensor):
        ids = tokens
    else:
        raise TypeError(
            f"classes must be token ids (a tensor), a tokenizer's output, or a list of names; got {type(tokens).__name__}"
        )
    if ids.dim() not in (2, 3):
        raise ValueError(f"token ids must be (K, L) or (K, T, L), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("got K = 0 classes of token ids; give at least one class")
    per_class = 1 if ids.dim() == 2 else ids.shape[1]
    if isinstance(tokens, Tensor):
        return tokens.flatten(0, -2), per_class  # (K·T, L)
    flat = {k: v.flatten(0, -2) if isinstance(v, Tensor) and v.dim() == ids.dim() else v for k, v in tokens.items()}
    return flat, per_class


def _batches(tokens: Any, size: int) -> Iterator[Any]:
    n = tokens.shape[0] if isinstance(tokens, Tensor) else tokens["input_ids"].shape[0]
    for start in range(0, n, size):
        if isinstance(tokens, Tensor):
            yield tokens[start : start + size]
        else:
            yield {k: v[start : start + size] if isinstance(v, Tensor) else v for k, v in tokens.items()}


def _to_device(tokens: Any, model: AdaptedCLIP) -> Any:
    device = model_device(model.base)
    if isinstance(tokens, Tensor):
        return tokens.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in tokens.items()}


def _usable_rows(features: Tensor) -> Tensor:
    """``features`` (``(K, D)`` or ``(K, T, D)``), after refusing NaN, infinite and all-zero prompt embeddings."""
    rows = features.detach().reshape(-1, features.shape[-1])  # (K·T, D)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("class text features contain NaN or infinite values; check the tokens and the text encoder")
    zero = rows.eq(0).all(dim=-1).nonzero().flatten().tolist()
    if zero:
        per_class = 1 if features.dim() == 2 else features.shape[1]
        raise ValueError(
            f"class text features have {len(zero)} all-zero row(s) (e.g. row {zero[0] // per_class}"
            f"{'' if per_class == 1 else f', template {zero[0] % per_class}'}): a zero vector has no direction, so "
            "its logits would be NaN; check how those features were made"
        )
    return features


def _ensemble(features: Tensor) -> Tensor:
    """``(K, D)`` kept raw; ``(K, T, D)`` with T > 1 -> normalise, average over T, normalise."""
    if features.dim() == 2:
        return features
    if features.shape[1] == 1:
        return features[:, 0]
    return kernels.normalize(kernels.normalize(features).mean(dim=1))


def _string_templates(templates: Sequence[Template] | None) -> tuple[str, ...] | None:
    """Templates a file can store: all strings (callables are code)."""
    if templates is None or not all(isinstance(t, str) for t in templates):
        return None
    return tuple(templates)


def _own_name(base: nn.Module) -> str | None:
    """The name a model carries itself (Hugging Face's ``name_or_path``); open_clip and OpenAI models carry none."""
    name = getattr(base, "name_or_path", None)
    return name if isinstance(name, str) and name else None


# -- prediction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of each image, best first (:meth:`AdaptedCLIP.predict`).

    Args:
        indices: ``(B, k)`` class indices (int64), in the order the classes were set.
        probabilities: ``(B, k)`` their softmax probabilities over all K classes.
        names: ``B`` lists of k class names, when the classes have names.
    """

    indices: Tensor
    probabilities: Tensor
    names: list[list[str]] | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: ``classes`` (names, when known), ``indices``, ``probabilities``."""
        rows = []
        for i, (indices, probabilities) in enumerate(zip(self.indices.tolist(), self.probabilities.tolist(), strict=True)):
            row = {"classes": self.names[i]} if self.names is not None else {}
            rows.append({**row, "indices": indices, "probabilities": probabilities})
        return rows


def _image_batches(images: Any, preprocess: Callable[[Any], Tensor] | None, batch_size: int, base: nn.Module) -> Iterator[Any]:
    """``images`` in batches of ``batch_size`` on the base model's device."""
    device = model_device(base)
    if preprocess is None:
        if isinstance(images, Mapping):  # a Hugging Face processor's BatchFeature
            yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in images.items()}
            return
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise TypeError(
                "images must be a (B, 3, H, W) tensor of preprocessed images (for one image: image.unsqueeze(0)), "
                "or a list of raw images with preprocess=<the model's preprocessing>; got "
                + (f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__)
            )
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size].to(device)
        return
    items = [images] if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) else list(images)
    if not items:
        raise ValueError("no images to predict")
    for start in range(0, len(items), batch_size):
        yield torch.stack([preprocess(item) for item in items[start : start + batch_size]]).to(device)


# -- loading ---------------------------------------------------------------------------------


def load(model: nn.Module, path: str | os.PathLike, *, strict: bool = False, **options: Any) -> AdaptedCLIP:
    """``model`` wrapped with a saved adapter: its method, options and weights, and its classes if it holds them.

    Args:
        model: the base CLIP the adapter was trained on.
        path: a file written by :meth:`AdaptedCLIP.save_adapter`, or a folder written by
            :meth:`AdaptedCLIP.save_pretrained`.
        strict: loading onto another base model than the file records is an error
            (by default a warning that names both).
        **options: :func:`wrap`'s keyword arguments but the adapter's (``backend``,
            ``freeze_backbone``, ``dim``, ``logit_scale``, ``base_name``, ``pretrained``).

    Example:
        >>> model = rada_mma.load(clip, "pets-rada.safetensors")
        >>> model.predict(images, k=5).names
    """
    allowed = {"backend", "freeze_backbone", "dim", "logit_scale", "base_name", "pretrained"}
    if set(options) - allowed:
        raise TypeError(
            f"load() got unexpected option(s) {sorted(set(options) - allowed)}: the adapter's own options come "
            f"from the file; wrap options are {', '.join(sorted(allowed))}"
        )
    path = _adapter_path(Path(path))
    info = read_adapter(path)
    backend = detect_backend(model, options.get("backend"))
    width = options.get("dim") or backend.embed_dim(model)
    if width is not None and width != info.config.dim:
        raise ValueError(
            f"{path} holds an adapter for embedding width {info.config.dim}, but the model's width is {width}: it "
            f"was trained on another CLIP" + (f" ({info.base.describe()})" if info.base else "")
        )
    name, pretrained = options.pop("base_name", None) or _own_name(model), options.pop("pretrained", None)
    current = base_identity(model, backend=backend.name, dim=info.config.dim, name=name, pretrained=pretrained)
    same = check_base(info.base, current, path, strict=strict)
    if same and info.base is not None and name is None and pretrained is None:  # the file knows the model's name
        name, pretrained = info.base.name, info.base.pretrained or info.base.weights_file
    wrapped = wrap(model, config=info.config, base_name=name, pretrained=pretrained, **options)
    try:
        load_adapter(path, wrapped.adapter)
        if info.classes is not None:
            features = info.classes.text_features.to(model_device(wrapped.adapter))
            wrapped.set_classes(text_features=features, names=info.classes.names, templates=info.classes.templates)
    except BaseException:
        wrapped.unwrap()  # the caller's model as it was
        raise
    return wrapped


def _adapter_path(path: Path) -> Path:
    """The adapter file of ``path``: itself, or a :meth:`AdaptedCLIP.save_pretrained` folder's, checked."""
    if not path.is_dir():
        return path
    file, config = path / ADAPTER_FILE, path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is a folder without {ADAPTER_FILE}; give a folder written by save_pretrained")
    if config.is_file():
        try:
            recorded = json.loads(config.read_text()).get("config")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{config} is not valid JSON ({err}); save the adapter again with save_pretrained") from err
        if recorded != json.loads(read_adapter(file).config.to_json()):
            raise ValueError(
                f"{config} and {file} describe different adapters (was one of them replaced?); "
                "save the adapter again with save_pretrained"
            )
    return file

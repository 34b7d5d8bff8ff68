"""How to get raw embeddings and the logit scale out of each CLIP family.

A backend is a small stateless object; :func:`detect_backend` picks one from
the model's class, and ``wrap(..., backend=NAME)`` overrides the choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BACKENDS", "Backend", "detect_backend"]


class Backend:
    """Generic: any module with ``encode_image`` and ``encode_text``.

    ``logit_scale`` is read as open_clip, OpenAI and Hugging Face store it: the
    log of the multiplicative scale.
    """

    name = "generic"

    def encode_image(self, model: nn.Module, images: Any) -> Tensor:
        return model.encode_image(images)

    def encode_text(self, model: nn.Module, tokens: Any) -> Tensor:
        return model.encode_text(tokens)

    def logit_scale(self, model: nn.Module) -> Tensor | None:
        """The multiplicative scale ``s`` (``exp`` of the stored log scale), or ``None``."""
        value = getattr(model, "logit_scale", None)
        return value.exp() if isinstance(value, Tensor) else None

    def logit_bias(self, model: nn.Module) -> Tensor | None:
        value = getattr(model, "logit_bias", None)
        return value if isinstance(value, Tensor) else None

    def embed_dim(self, model: nn.Module) -> int | None:
        for owner, name in ((model, "embed_dim"), (getattr(model, "visual", None), "output_dim")):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
        projection = getattr(model, "text_projection", None)
        if isinstance(projection, Tensor) and projection.dim() == 2:
            return projection.shape[1]
        if isinstance(projection, nn.Linear):
            return projection.out_features
        return None

    def tokenize(self, tokenizer: Any, texts: list[str]) -> Any:
        return tokenizer(texts)

    def image_size(self, model: nn.Module) -> tuple[int, int] | None:
        """``(H, W)`` of the images the model takes, where it tells (open_clip, OpenAI, Hugging Face)."""
        visual = getattr(model, "visual", None)
        for value in (getattr(visual, "image_size", None), getattr(visual, "input_resolution", None)):
            if isinstance(value, int):
                return value, value
            if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
                return tuple(value)
        return None


class OpenCLIPBackend(Backend):
    """open_clip ``CLIP`` and ``CustomTextCLIP`` (SigLIP-style models keep ``logit_bias``)."""

    name = "open_clip"

    def encode_image(self, model, images):
        # open_clip's towers do not cast their input (OpenAI's and Hugging Face's do): after
        # model.half(), fp32 images would meet fp16 weights
        return model.encode_image(_in_dtype_of(images, model.visual), normalize=False)

    def encode_text(self, model, tokens):
        return model.encode_text(tokens, normalize=False)


class OpenAIBackend(Backend):
    """Models of OpenAI's ``clip`` package (fp16 on CUDA: features come back fp16)."""

    name = "openai"


class HuggingFaceBackend(Backend):
    """transformers ``CLIPModel`` and ``SiglipModel``.

    transformers 4 returns tensors from ``get_*_features``; transformers 5
    returns an output object whose ``pooler_output`` holds the embeddings.
    """

    name = "hf"

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        if isinstance(out, Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if isinstance(pooled, Tensor):
            return pooled
        raise TypeError(f"cannot find embeddings in {type(out).__name__}: no tensor and no pooler_output")

    def encode_image(self, model, images):
        if isinstance(images, Mapping):  # a processor's BatchFeature
            images = images["pixel_values"]
        return self._tensor(model.get_image_features(pixel_values=images))

    def encode_text(self, model, tokens):
        if isinstance(tokens, Mapping):  # a tokenizer's BatchEncoding
            keys = ("input_ids", "attention_mask", "position_ids")
            return self._tensor(model.get_text_features(**{k: tokens[k] for k in keys if k in tokens}))
        return self._tensor(model.get_text_features(input_ids=tokens))

    def embed_dim(self, model):
        config = getattr(model, "config", None)
        projection = getattr(config, "projection_dim", None)
        if isinstance(projection, int):
            return projection
        text = getattr(config, "text_config", None)
        for name in ("projection_size", "hidden_size"):
            value = getattr(text, name, None)
            if isinstance(value, int):
                return value
        return None

    def image_size(self, model):
        size = getattr(getattr(getattr(model, "config", None), "vision_config", None), "image_size", None)
        return (size, size) if isinstance(size, int) else None

    def tokenize(self, tokenizer, texts):
        if hasattr(tokenizer, "model_input_names"):  # a transformers tokenizer
            return tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return tokenizer(texts)


BACKENDS: dict[str, Backend] = {b.name: b for b in (OpenCLIPBackend(), HuggingFaceBackend(), OpenAIBackend(), Backend())}


def detect_backend(model: nn.Module, override: str | None = None) -> Backend:
    """The backend for ``model``: from ``override`` if given, else from its class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap() takes a torch.nn.Module CLIP model, got {type(model).__name__}")
    if override is not None:
        if override not in BACKENDS:
            raise ValueError(f"unknown backend {override!r}; choose one of {', '.join(BACKENDS)}")
        return BACKENDS[override]
    module = type(model).__module__
    if module.startswith("open_clip"):
        return BACKENDS["open_clip"]
    if module.startswith("transformers"):
        if not hasattr(model, "get_image_features"):
            raise TypeError(
                f"{type(model).__name__} has no get_image_features; wrap a CLIPModel or SiglipModel, "
                "not a single tower"
            )
        return BACKENDS["hf"]
    if module == "clip.model":
        return BACKENDS["openai"]
    if callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None)):
        return BACKENDS["generic"]
    raise TypeError(
        f"cannot adapt {type(model).__name__}: it is not an open_clip, Hugging Face or OpenAI CLIP and has "
        "no encode_image/encode_text methods; add them, or pass backend='open_clip'|'hf'|'openai'"
    )


def _in_dtype_of(x: Any, module: nn.Module) -> Any:
    """A floating-point tensor ``x`` in the dtype of ``module``'s parameters; anything else as given."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    for parameter in module.parameters():
        return x.to(parameter.dtype)
    return x


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")

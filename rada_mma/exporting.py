"""``export``: an adapted CLIP for a fixed class set as one graph, images in, logits out.

Two formats: ``"torch"`` writes a ``torch.export`` program (``.pt2``, loaded with
``torch.export.load(path).module()``), ``"onnx"`` an ONNX model (opset 18 by
default, run with e.g. onnxruntime). Both take a batch of preprocessed images of
any size (the batch dimension is dynamic) and return ``(B, K)`` logits equal to
the eager model's. What is traced is the inference path: the class-side terms are
constants of the graph, and the kernels take their plain path (no private
CPU flash-attention ops, no custom autograd functions).

``onnx`` (and ``onnxscript``, which ``torch.onnx`` uses) are needed for
``format="onnx"`` only, and imported only then.

>>> rada_mma.export(model, "pets-rada.pt2")                      # torch.export
>>> rada_mma.export(model, "pets-rada.onnx", format="onnx")      # ONNX
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .backends import model_device
from .io import atomic_write
from .wrapper import AdaptedCLIP

__all__ = ["FORMATS", "ImageClassifier", "export"]

log = logging.getLogger(__name__)

FORMATS = ("torch", "onnx")
ONNX_OPSET = 18


class ImageClassifier(nn.Module):
    """An :class:`~rada_mma.AdaptedCLIP` fixed to its classes: ``forward(images) -> (B, K)`` logits.

    The adapter's class-side terms (:meth:`~rada_mma.AdaptedCLIP.class_terms`), the
    multiplicative logit scale and SigLIP's bias are buffers; per image it runs the
    image encoder and the adapter's per-image work. It shares the base model and the
    adapter with ``model`` (no copy); :func:`export` traces it.

    Example:
        >>> classifier = ImageClassifier(model).eval()
        >>> torch.allclose(classifier(images), model(images), atol=1e-4)
        True
    """

    def __init__(self, model: AdaptedCLIP):
        super().__init__()
        if model.class_features is None:
            raise ValueError("the model has no classes: call model.set_classes(...) before exporting it")
        self.base, self.adapter, self.backend = model.base, model.adapter, model.backend
        self.adapted = model.adapter_enabled
        with torch.no_grad():
            if self.adapted:
                terms = model.class_terms()
            else:  # zero-shot CLIP: the normalised class features are all it needs
                terms = {"text": kernels.normalize(model.text_features().float())}
            self.term_names = tuple(terms)
            for name, tensor in terms.items():
                self.register_buffer(f"term_{name}", tensor.detach().clone())
            self.register_buffer("scale", model.multiplicative_scale().detach().clone())
            bias = model.logit_bias()
            self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, images: Tensor) -> Tensor:
        features = self.backend.encode_image(self.base, images).float()  # (B, D)
        terms = {name: getattr(self, f"term_{name}") for name in self.term_names}
        if self.adapted:
            logits, _ = self.adapter.logits_from_terms(features, terms, self.scale)  # (B, K)
        else:
            logits = self.scale * kernels.normalize(features) @ terms["text"].T  # (B, K)
        logits = logits.float()
        return logits if self.bias is None else logits + self.bias


def export(
    model: AdaptedCLIP,
    path: str | os.PathLike,
    *,
    format: str = "torch",
    example: Tensor | None = None,
    opset: int = ONNX_OPSET,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` with its current classes as one graph: preprocessed images in, ``(B, K)`` logits out.

    Args:
        model: an :class:`~rada_mma.AdaptedCLIP` with its classes set (a disabled
            adapter exports zero-shot CLIP).
        path: destination (conventionally ``.pt2`` or ``.onnx``).
        format: ``"torch"`` (``torch.export``) or ``"onnx"``.
        example: a batch of preprocessed images to trace with (default: zeros at the
            image size the base model declares).
        opset: the ONNX opset (at least 17).
        overwrite: replace an existing file.

    Returns:
        ``path``. The batch size of the graph is dynamic.

    Example:
        >>> rada_mma.export(model, "pets-rada.onnx", format="onnx")
        >>> session = onnxruntime.InferenceSession("pets-rada.onnx")
        >>> logits = session.run(None, {"images": images.numpy()})[0]
    """
    if not isinstance(model, AdaptedCLIP):
        raise TypeError(f"export takes an AdaptedCLIP (rada_mma.wrap or rada_mma.load), got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "onnx" and opset < 17:
        raise ValueError(f"opset must be at least 17 (LayerNormalization), got {opset}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    adapter_dtype = next(model.adapter.parameters()).dtype
    if adapter_dtype != torch.float32:
        raise ValueError(
            f"the adapter is in {adapter_dtype}; export runs the adapter in float32 (as the encoders' fp32 outputs "
            "meet it): call model.adapter.float() first (a half-precision base model may stay as it is)"
        )
    if example is None:
        example = _example_images(model)
    program = _trace(model, example)
    if format == "torch":
        return atomic_write(path, lambda fh: torch.export.save(program, fh), overwrite=overwrite)
    return atomic_write(path, _onnx_bytes(program, example, opset), overwrite=overwrite)


def _example_images(model: AdaptedCLIP) -> Tensor:
    size = model.backend.image_size(model.base)
    if size is None:
        raise ValueError(
            f"cannot tell the image size {type(model.base).__name__} takes; pass example=<a batch of preprocessed "
            "images, e.g. torch.zeros(2, 3, 224, 224)>"
        )
    # two images: torch.export specialises a batch of one
    return torch.zeros(2, 3, *size, device=model_device(model.base))


def _trace(model: AdaptedCLIP, example: Tensor) -> torch.export.ExportedProgram:
    if not isinstance(example, Tensor) or example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(
            "example must be a (B, 3, H, W) tensor of preprocessed images with B >= 2 (torch.export treats a batch "
            f"of one as a constant), got {tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__}"
        )
    classifier = ImageClassifier(model).eval()
    was_training = model.training
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(classifier, (example,), dynamic_shapes={"images": {0: batch}})
    except Exception as err:  # torch raises many kinds; say which part could not be traced
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(
            f"torch.export could not trace {type(model.base).__name__}'s image encoder with the "
            f"{model.adapter.config.method!r} adapter ({type(err).__name__}: {first}); the encoder must be "
            "traceable by torch.export with a dynamic batch size"
        ) from err
    finally:
        model.train(was_training)


def _onnx_bytes(program: torch.export.ExportedProgram, example: Tensor, opset: int) -> bytes:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it; a clear error here rather than deep inside torch)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"format='onnx' needs the onnx and onnxscript packages ({err}); pip install onnx onnxscript"
        ) from err
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()  # torch.onnx reports its steps on stdout; library code prints nothing
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, (example,), input_names=["images"], output_names=["logits"], opset_version=opset,
            dynamic_shapes={"images": {0: batch}}, dynamo=True,
        )
    log.debug("torch.onnx: %s", chatter.getvalue())
    proto = onnx_program.model_proto
    if proto.ByteSize() >= 2**31:
        raise ValueError("the ONNX model exceeds protobuf's 2 GB limit; export format='torch' instead")
    return proto.SerializeToString()

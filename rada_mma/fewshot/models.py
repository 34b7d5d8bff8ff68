"""The CLIP a few-shot run adapts: an open_clip model loaded without touching the network.

A run names its model by an open_clip architecture (``ViT-B-16``) or a local
JSON config, and its weights by an open_clip pretrained tag or a local file.
Weights are never left out by accident: random weights need
``pretrained="random"``, said on purpose.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

__all__ = ["RANDOM_WEIGHTS", "load_clip", "model_name"]

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # pretrained= value that asks for randomly initialised weights


def _register_config(path: Path, name: str | None) -> str:
    """Register a local open_clip JSON config; its model name is the file's stem, as open_clip names it."""
    import open_clip

    if not path.is_file():
        raise FileNotFoundError(f"model_config {path} does not exist; give an open_clip model config (.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"model_config {path} is not valid JSON ({err}); give an open_clip model config") from err
    needed = ("embed_dim", "vision_cfg", "text_cfg")
    if path.suffix != ".json" or not isinstance(config, dict) or not all(k in config for k in needed):
        raise ValueError(
            f"model_config {path} is not an open_clip model config: it must be a .json file with "
            f"{', '.join(needed)} (see open_clip's model_configs/ for examples)"
        )
    if name and name != path.stem:
        raise ValueError(
            f"model_config {path} defines the model {path.stem!r} (open_clip names a config by its file name) "
            f"but model is {name!r}; leave out model, or give model={path.stem!r}"
        )
    open_clip.add_model_config(path)
    return path.stem


def model_name(model: str | None, model_config: str | None) -> str | None:
    """The open_clip model name a run uses: ``model``, else the config file's stem."""
    return Path(model_config).expanduser().stem if model_config else model


def _check_weights(name: str, pretrained: str | None) -> bool:
    """Whether ``pretrained`` is a local file; a clear error when it is neither a file nor a known tag."""
    import open_clip

    if pretrained is None:
        raise ValueError(
            f"no weights given for {name}: pass pretrained=<an open_clip tag such as 'openai', or a weights file>; "
            f"to adapt a randomly initialised CLIP on purpose, pass pretrained={RANDOM_WEIGHTS!r}"
        )
    if pretrained == RANDOM_WEIGHTS:
        return False
    if Path(pretrained).expanduser().is_file():
        return True
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return False
    if any(sep in pretrained for sep in "/\\") or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise FileNotFoundError(f"pretrained={pretrained}: no such weights file")
    raise ValueError(
        f"pretrained={pretrained!r} is neither a local weights file nor a tag open_clip knows for {name} "
        f"(tags: {tags}; or {RANDOM_WEIGHTS!r} for random weights)"
    )


def load_clip(name: str | None, pretrained: str | None, model_config: str | None, device: str):
    """An open_clip model in eval mode, its eval preprocessing and tokenizer, without touching the network.

    Args:
        name: an open_clip model name (``None``: the config's).
        pretrained: an open_clip pretrained tag, a local weights file, or ``"random"``.
        model_config: a local open_clip JSON config for a custom architecture.
        device: where the model goes.

    Example:
        >>> model, preprocess, tokenizer = load_clip("ViT-B-16", "~/clip/vit-b-16.bin", None, "cpu")
    """
    import open_clip

    if model_config:
        name = _register_config(Path(model_config).expanduser(), name)
    if not name:
        raise ValueError("no model given: name an open_clip architecture (model='ViT-B-16') or give model_config")
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().replace("/", "-") in m.lower()][:8]
        raise ValueError(
            f"open_clip does not know the model {name!r}"
            + (f"; did you mean one of {close}?" if close else ";")
            + " give model_config=CONFIG.json for a custom architecture"
        )
    local = _check_weights(name, pretrained)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is available; use device='cpu'")
    if pretrained == RANDOM_WEIGHTS:
        log.warning("%s with random weights, as asked (pretrained=%r)", name, RANDOM_WEIGHTS)
    weights = str(Path(pretrained).expanduser()) if local else None if pretrained == RANDOM_WEIGHTS else pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except Exception as err:
        first = _first_detail(err)
        if local:  # a shape mismatch, a failed size assertion, or not a weights file at all
            raise ValueError(
                f"the weights in {pretrained} do not fit the model {name}, or are not a weights file "
                f"({type(err).__name__}: {first}); give the model / model_config they were trained with, "
                "or weights of this architecture"
            ) from err
        if weights:  # downloads fail offline: say what to do instead
            raise ValueError(
                f"could not fetch the {pretrained!r} weights for {name} ({type(err).__name__}: {first}); without "
                "network, pass pretrained=/path/to/weights (a .pt/.bin/.safetensors file)"
            ) from err
        raise
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _first_detail(err: Exception, limit: int = 200) -> str:
    """The first informative line of an error (torch's state-dict errors open with a bare header)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")
    return detail[:limit] + ("..." if len(detail) > limit else "")

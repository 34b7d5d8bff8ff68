"""OpenAI's own ``clip`` package (pip ``openai-clip``), not a look-alike: a tiny ``clip.model.CLIP`` with
random weights, in fp32 and converted to fp16 as ``clip.load`` does on CUDA, through wrap, training, saving,
loading and prediction.

fp16 matmuls run on CPU in this PyTorch: the encoders return fp16 features, which the wrapper turns to fp32
for the adapter, so the adapter trains in fp32 whatever the encoders' precision.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rada_mma
from rada_mma import wrap
from tests.helpers import tiny_models as tm

NAMES = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_wrap_train_save_load_predict(half, tmp_path):
    base = tm.openai_clip_model(half=half)
    assert type(base).__module__ == "clip.model" and base.dtype == (torch.float16 if half else torch.float32)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = wrap(base, "rada+adapter", base_name="tiny-ViT", generator=torch.Generator().manual_seed(0))
    assert model.backend.name == "openai" and model.logit_scale is base.logit_scale
    model.set_classes(NAMES, tokenizer=tm.openai_tokenizer())
    assert model.class_features.dtype == torch.float32
    images = tm.images(8)
    losses = tm.train_steps(model, images, torch.arange(8) % 4, 4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())  # only the adapter trained
    assert all(p.dtype == torch.float32 for p in model.adapter.parameters())

    path = model.save_adapter(tmp_path / "a.safetensors", include_classes=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights, whatever their precision: no warning
        loaded = rada_mma.load(tm.openai_clip_model(half=not half), path)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(rada_mma.load(tm.openai_clip_model(half=half), path)(images), expected)
        # the other precision: the same weights rounded, the same predictions
        torch.testing.assert_close(loaded(images), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    top = loaded.predict(images, k=2)
    assert top.names[0][0] in NAMES and top.probabilities.shape == (8, 2)

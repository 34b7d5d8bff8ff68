"""Test-time training on embeddings: TPT's objective and selection, its loop transcribed, the adapter untouched
after the call, and each image adapted on its own (bit for bit the same prediction whatever shares its batch)."""

from __future__ import annotations

import hashlib

import pytest
import torch

import rada_mma
from rada_mma.fewshot.tta import TTAConfig, adapt_and_predict, average_entropy, confident_views
from tests.helpers import protocols, tiny_models

CLASSES = 5


def model_with(method: str, seed: int = 0) -> rada_mma.AdaptedCLIP:
    """A tiny wrapped CLIP whose adapter is not at its zero-shot start (W_o perturbed, as after training)."""
    model = rada_mma.wrap(tiny_models.open_clip_model(), method=method, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.set_classes(text_features=torch.randn(CLASSES, tiny_models.EMBED_DIM, generator=g))
    return model.eval()


def views(n: int = 6, v: int = 10, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, v, tiny_models.EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def digest(model: rada_mma.AdaptedCLIP) -> str:
    h = hashlib.sha256()
    for name, tensor in model.adapter.state_dict().items():
        h.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_objective_and_selection_are_tpts():
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(average_entropy(logits), protocols.tpt_avg_entropy(logits), atol=1e-6)
    _, idx = protocols.tpt_select_confident_samples(logits, 0.1)
    assert torch.equal(confident_views(logits, TTAConfig(keep=0.1).kept), idx)  # int(64 · 0.1) = 6 views
    assert TTAConfig(views=8, keep=0.1).kept == 1  # TPT's int() would keep none: one view at least
    probs = logits.softmax(-1).mean(0)
    assert torch.allclose(average_entropy(logits), -(probs * probs.log()).sum(), atol=1e-5)  # of the mean


@pytest.mark.parametrize("method", ["rada", "mma"])
def test_matches_tpts_loop(method):
    """TPT's test_time_tuning, transcribed, on the same views: the same adapted predictions."""
    model, x = model_with(method), views()
    config = TTAConfig(keep=0.3, steps=2, lr=0.05)
    ours = adapt_and_predict(model, x, config=config).after
    theirs = protocols.tpt_predict(model, x, top=config.keep, steps=config.steps, lr=config.lr)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("method", ["rada", "mma+rada"])
def test_the_adapter_is_unchanged_and_each_image_is_adapted_alone(method):
    model, x = model_with(method), views()
    before = digest(model)
    config = TTAConfig(keep=0.3, steps=2, lr=0.05)
    whole = adapt_and_predict(model, x, config=config)
    assert digest(model) == before and all(p.grad is None for p in model.adapter.parameters())
    assert not torch.allclose(whole.after, whole.before)  # it adapted
    with torch.no_grad():
        assert torch.allclose(whole.before, model.logits_from_features(x[:, 0]), atol=1e-5)  # the adapter as given
    # other batch sizes and orders: every image gets exactly the same prediction
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = adapt_and_predict(model, x[order], config=config).after
    assert torch.equal(shuffled, whole.after[order])
    pieces = torch.cat([adapt_and_predict(model, x[i : i + 4], config=config).after for i in (0, 4)])
    assert torch.equal(pieces, whole.after)
    assert digest(model) == before
    no_steps = adapt_and_predict(model, x, config=TTAConfig(steps=0))
    assert torch.allclose(no_steps.after, no_steps.before, atol=1e-5)


def test_restores_the_adapter_when_interrupted(monkeypatch):
    model, x = model_with("rada"), views()
    before = digest(model)
    calls = []

    def stop(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # mid-way through the second image, after one optimiser step
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = rada_mma.AdaptedCLIP.logits_from_features
    monkeypatch.setattr(rada_mma.AdaptedCLIP, "logits_from_features", stop)
    with pytest.raises(KeyboardInterrupt):
        adapt_and_predict(model, x, config=TTAConfig(lr=0.5))
    assert digest(model) == before


def test_config_is_checked():
    for bad in ({"keep": 0.0}, {"keep": 1.5}, {"views": 0}, {"augment": "cutout"}, {"lr": 0}):
        with pytest.raises(ValueError):
            TTAConfig(**bad)
    with pytest.raises(ValueError, match=r"\(N, V, D\)"):
        adapt_and_predict(model_with("rada"), torch.randn(4, tiny_models.EMBED_DIM))

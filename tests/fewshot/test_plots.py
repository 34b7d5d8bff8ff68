"""Pictures of a run: the MMA attention shown is the released attention's, and every
method's pictures are written as PNG files."""

from __future__ import annotations

import pytest
import torch

from rada_mma import METHODS, wrap
from rada_mma.kernels import normalize
from rada_mma.modules import MultiModalAdapter
from tests.helpers.tensors import randomize_, raw_features, released_mma

pytest.importorskip("matplotlib")

from rada_mma.fewshot.plots import plot_adapter, plot_history  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["paper", "master"])
def test_mma_attention_is_the_released_image_tokens(variant):
    """The image row of nn.MultiheadAttention's weights in the literal released MMA, averaged over heads."""
    module = randomize_(MultiModalAdapter(dim=32, variant=variant), seed=1)
    image, text = raw_features(5, 7, 32, seed=2)
    f, h = normalize(image), normalize(text)
    ref = released_mma(module)
    k = h.shape[0]
    seq = torch.cat([h.unsqueeze(1).expand(k, 5, -1), f.unsqueeze(0)], dim=0)  # (K+1, B, D)
    mask = torch.zeros(k + 1, k + 1)
    if variant == "paper":
        allowed = torch.zeros(k + 1, k + 1, dtype=torch.bool)
        allowed[:k, k] = allowed[k, :k] = True
        mask = mask.masked_fill(~allowed, float("-inf"))
    else:
        mask[:k, k] = mask[k, :k] = 1.0
    x = ref.adapter.downsampler(seq)
    _, weights = ref.adapter.mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=True)  # (B, K+1, K+1)
    with torch.no_grad():
        got = module.image_attention(f, h).mean(1)  # what the picture shows: the mean over heads
    torch.testing.assert_close(got, weights[:, k, :k].detach(), rtol=1e-5, atol=1e-6)
    if variant == "paper":
        torch.testing.assert_close(got.sum(-1), torch.ones(5))


@pytest.mark.parametrize("method", METHODS)
def test_pictures_are_written(method, tmp_path):
    from tests.helpers import tiny_models

    model = wrap(tiny_models.GenericDualEncoder(dim=16), method=method, dim=16, logit_scale=100.0,
                 generator=torch.Generator().manual_seed(0))
    model.set_classes(text_features=torch.randn(3, 16))
    randomize_(model.adapter, seed=3)
    history = [{"epoch": 0, "lr": 1e-3, "train_loss": 1.0, "val_acc": 50.0}, {"epoch": 1, "lr": 1e-3, "train_loss": 0.5}]
    for path in (plot_history(history, tmp_path / "training.png"),
                 plot_adapter(model, torch.randn(6, 2, 16), tmp_path / "adapter.png", classnames=["a", "b", "c"])):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000


def test_many_classes_draw_a_figure_of_bounded_size(tmp_path):
    from PIL import Image

    from tests.helpers import tiny_models

    model = wrap(tiny_models.GenericDualEncoder(dim=16), method="rada", dim=16, logit_scale=100.0)
    model.set_classes(text_features=torch.randn(1000, 16))  # ImageNet's class count
    path = plot_adapter(model, torch.randn(4, 16), tmp_path / "adapter.png", classnames=[f"c{i}" for i in range(1000)])
    with Image.open(path) as image:
        assert image.height < 3000  # 64 classes drawn, not a 250-inch figure


def test_setting_pictures_are_written(tmp_path):
    from rada_mma.fewshot.evaluation import row_label
    from rada_mma.fewshot.plots import plot_shots, plot_targets, plot_tta

    shots = [{"dataset": "d", "method": "zero-shot", "seed": 1, "shots": 0, "accuracy": 50.0}]
    shots += [{"dataset": "d", "method": "rada", "seed": s, "shots": k, "accuracy": 50.0 + k + s} for s in (1, 2)
              for k in (1, 2, 4)]
    tta = [{"dataset": t, "method": m, "seed": 1, "accuracy": 40.0 + i, "tta": m != "zero-shot", "start": "zero-shot"}
           for i, (t, m) in enumerate([("a", "zero-shot"), ("a", "rada"), ("b", "zero-shot"), ("b", "rada")])]
    logits = torch.randn(20, 4)
    for path in (plot_shots(shots, tmp_path / "shots.png"), plot_targets(tta, tmp_path / "t.png", label=row_label),
                 plot_tta(logits, logits + torch.randn(20, 4), torch.randint(4, (20,)), tmp_path / "tta.png")):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000

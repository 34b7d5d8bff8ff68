"""Test-time training under torchrun: two CPU processes with gloo, each adapting every other image, give every
rank the logits one process computes. Run as a script this file is the worker (see tests/helpers/torchrun.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rada_mma import wrap
from rada_mma.fewshot.tta import TTAConfig, adapt_and_predict
from tests.helpers import torchrun

CONFIG = TTAConfig(keep=0.3, steps=2, lr=0.05)


class Encoders(nn.Module):
    """Never called: test-time training runs on embeddings (and the workers need not import open_clip)."""

    def encode_image(self, images):
        raise NotImplementedError

    def encode_text(self, tokens):
        raise NotImplementedError


def case(n: int):
    model = wrap(Encoders(), method="rada", dim=16, logit_scale=100.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # away from the zero-shot start, as a trained adapter is
        for p in model.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(n)
    model.set_classes(text_features=torch.randn(4, 16, generator=g))
    return model, torch.randn(n, 8, 16, generator=g)


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for n in (5, 1):  # one image: rank 1 has none to adapt
        result = adapt_and_predict(*case(n), config=CONFIG, shard=True)
        save_file({"before": result.before, "after": result.after}, str(out / f"n{n}-rank{dist.get_rank()}.safetensors"))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_adapt_as_one(tmp_path):
    torchrun.run_ranks(__file__, tmp_path)
    for n in (5, 1):
        single = adapt_and_predict(*case(n), config=CONFIG)
        for rank in (0, 1):
            got = load_file(str(tmp_path / f"n{n}-rank{rank}.safetensors"))
            assert torch.equal(got["after"], single.after) and torch.equal(got["before"], single.before)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

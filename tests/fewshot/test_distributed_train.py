"""Training under torchrun: two CPU processes with gloo train the same adapter as one
process on the same cached features, and only rank 0 writes the checkpoint.

Run as a script this file is the worker, as ``torchrun --nproc_per_node 2 THIS_FILE OUT``
would start it; the test starts two of them with the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), as
tests/test_distributed_cache.py does. 25 training images in batches of 8 leave a last
batch of one image, so rank 1's share of it is empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rada_mma import wrap
from rada_mma.fewshot.train import CHECKPOINT, fit, preset
from tests.helpers import torchrun

K, D, N = 5, 16, 25
CASES = {  # method -> (adapter options, training config): the presets, shorter, in batches of 8
    "rada": ({"alpha": 0.1}, preset("rada", epochs=3, batch_size=8)),
    "mma": ({}, preset("mma", epochs=3, batch_size=8, patience=2)),
}


class Encoders(nn.Module):
    """Never called: fit() trains on features. wrap() only needs the two encoders to exist."""

    def encode_image(self, images):
        raise NotImplementedError

    def encode_text(self, tokens):
        raise NotImplementedError


def features() -> dict[str, torch.Tensor]:
    """The cached features every process reads: identical bits in every process."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(K, D, generator=g)
    labels = torch.arange(N) % K
    val_labels = torch.arange(10) % K
    return {
        "text": text,
        "train": text[labels] + 1.5 * torch.randn(N, D, generator=g),
        "train_labels": labels,
        "val": text[val_labels] + 1.5 * torch.randn(10, D, generator=g),
        "val_labels": val_labels,
    }


def make(method: str):
    model = wrap(Encoders(), method=method, dim=D, logit_scale=100.0, generator=torch.Generator().manual_seed(3),
                 **CASES[method][0])
    return model.set_classes(text_features=features()["text"])


def train(method: str, out_dir: Path | None):
    config = CASES[method][1]
    model = make(method)
    f = features()
    result = fit(model, f["train"], f["train_labels"], config=config, val_features=f["val"],
                 val_labels=f["val_labels"], out_dir=out_dir, progress=False)
    return model, result


def worker(out: Path) -> None:
    import torch.distributed as dist

    import rada_mma.io

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writes: list[str] = []
    save = rada_mma.io.atomic_write  # every file the package writes goes through it

    def recording_save(path, *args, **kwargs):
        writes.append(str(path))
        return save(path, *args, **kwargs)

    rada_mma.io.atomic_write = recording_save
    for method in CASES:
        model, result = train(method, out / method)
        save_file({k: v.contiguous() for k, v in model.adapter.state_dict().items()},
                  str(out / f"{method}-rank{rank}.safetensors"),
                  metadata={"history": json.dumps(result.history), "best_epoch": str(result.best_epoch)})
    (out / f"writes-rank{rank}.json").write_text(json.dumps(writes))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_train_as_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torchrun.run_ranks(__file__, out)  # as torchrun starts them, without its seconds of start-up

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting
    try:
        single = {method: train(method, None) for method in CASES}
    finally:
        torch.set_num_threads(before)

    for method, (model, result) in single.items():
        expected = model.adapter.state_dict()
        start = make(method).adapter.state_dict()
        assert any(not torch.equal(start[k], v) for k, v in expected.items())  # it trained
        for rank in (0, 1):
            with safe_open(str(out / f"{method}-rank{rank}.safetensors"), framework="pt") as fh:
                got = {name: fh.get_tensor(name) for name in fh.keys()}
                meta = fh.metadata()
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                g, e = got[name], tensor
                if method == "mma" and name == "to_qkv.bias":
                    # The key bias shifts every score of a query equally: the softmax ignores it and its
                    # gradient is exactly 0, so Adam turns rounding noise into steps of size ~lr. Compare
                    # the query and value biases, and the logits below.
                    n = model.adapter.config.mma_width
                    g, e = torch.cat([g[:n], g[2 * n :]]), torch.cat([e[:n], e[2 * n :]])
                torch.testing.assert_close(g, e, rtol=0, atol=1e-6, msg=f"{method} rank {rank} {name}")
            twin = make(method)
            twin.adapter.load_state_dict(got)
            f = features()
            torch.testing.assert_close(twin.logits_from_features(f["val"]), model.logits_from_features(f["val"]),
                                       rtol=0, atol=1e-5)
            history = json.loads(meta["history"])
            assert [h["epoch"] for h in history] == [h["epoch"] for h in result.history]
            assert [h["val_acc"] for h in history] == [h["val_acc"] for h in result.history]
            for ours, theirs in zip(history, result.history, strict=True):  # the global mean, not rank 0's share
                assert abs(ours["train_loss"] - theirs["train_loss"]) < 1e-5
            assert int(meta["best_epoch"]) == result.best_epoch
        checkpoint = torch.load(out / method / CHECKPOINT, weights_only=True)
        assert checkpoint["epoch"] == result.history[-1]["epoch"]
        if CASES[method][1].select == "last":
            for name, tensor in expected.items():
                torch.testing.assert_close(checkpoint["adapter"][name], tensor, rtol=0, atol=1e-6)

    writes = [json.loads((out / f"writes-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[1] == [], f"rank 1 wrote {writes[1]}"
    epochs = {method: len(result.history) for method, (_, result) in single.items()}
    assert writes[0] == [str(out / m / CHECKPOINT) for m in CASES for _ in range(epochs[m])]
    for method in CASES:
        assert sorted(p.name for p in (out / method).iterdir()) == [CHECKPOINT]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

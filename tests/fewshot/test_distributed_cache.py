"""Feature extraction under torchrun: two CPU processes with gloo give exactly the
single-process features, on both ranks, and only rank 0 writes the cache.

Run as a script this file is the worker, as ``torchrun --nproc_per_node 2 THIS_FILE DATA OUT``
would start it; the test starts two of them with the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``).
The worker's model and transforms need neither open_clip nor torchvision, whose imports
would take most of the test's time; tests/test_cache.py covers open_clip models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rada_mma import wrap
from rada_mma.fewshot.cache import extract_image_features, fingerprint_parts, load_features
from rada_mma.fewshot.data import load_data
from tests.helpers import torchrun

BATCH = 3  # 5 classes x 3 images = 15 items = 5 batches: rank 0 takes 3, rank 1 takes 2
VIEWS = 2


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("test", 1)):
        for c in range(5):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


class TinyEncoder(nn.Module):
    """A dual encoder with random weights: conv + linear images, mean-of-embeddings texts."""

    embed_dim = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16))
        self.text = nn.Embedding(100, 16)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def encode_image(self, images):
        return self.image(images)

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def preprocess(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((32, 32)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 255  # (3, 32, 32)


def augment(image: Image.Image) -> torch.Tensor:
    """A random shift and flip from torch's global generator, which extraction seeds per (item, view)."""
    shift = torch.randint(0, 8, (2,)).tolist()
    pixels = preprocess(image).roll(shifts=shift, dims=(1, 2))
    return pixels.flip(-1) if torch.rand(()) < 0.5 else pixels


def extract_all(root: Path, cache_path: Path | None):
    """What each process computes: plain features (cached), again (from the cache), augmented views."""
    splits = load_data(root)
    model = wrap(TinyEncoder(), method="rada")
    kwargs = dict(batch_size=BATCH, progress=False)
    first = extract_image_features(model, splits, splits.train, preprocess, cache_path=cache_path, **kwargs)
    again = extract_image_features(model, splits, splits.train, preprocess, cache_path=cache_path, **kwargs)
    views = extract_image_features(model, splits, splits.train, preprocess, views=VIEWS, augment=augment, **kwargs)
    return first, again, views


def worker(root: Path, out: Path) -> None:
    import torch.distributed as dist

    import rada_mma.io

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writes: list[str] = []
    write = rada_mma.io.atomic_write  # every file the package writes goes through it

    def recording_write(path, *args, **kwargs):
        writes.append(str(path))
        return write(path, *args, **kwargs)

    rada_mma.io.atomic_write = recording_write
    first, again, views = extract_all(root, out / "train.safetensors")
    save_file(
        {"first": first.image, "again": again.image, "views": views.image, "labels": first.labels},
        str(out / f"rank{rank}.safetensors"),
        metadata={"writes": json.dumps(writes), "world": str(dist.get_world_size())},
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    root, out = make_data(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    torchrun.run_ranks(__file__, root, out)  # as torchrun starts them, without its seconds of start-up

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same kernels, so the same bits
    try:
        first, _, views = extract_all(root, None)
    finally:
        torch.set_num_threads(before)

    for rank in (0, 1):
        with safe_open(str(out / f"rank{rank}.safetensors"), framework="pt") as fh:
            got = {name: fh.get_tensor(name) for name in fh.keys()}
            meta = fh.metadata()
        assert meta["world"] == "2"
        assert torch.equal(got["first"], first.image), f"rank {rank}: features differ from one process"
        assert torch.equal(got["again"], first.image), f"rank {rank}: cached features differ"
        assert torch.equal(got["views"], views.image), f"rank {rank}: augmented views differ"
        assert torch.equal(got["labels"], first.labels)
        expected_writes = [str(out / "train.safetensors")] if rank == 0 else []
        assert json.loads(meta["writes"]) == expected_writes, f"rank {rank} wrote {meta['writes']}"
    assert not torch.equal(views.image[:, 0], views.image[:, 1])
    assert torch.equal(load_features(out / "train.safetensors").image, first.image)
    # fingerprints do not depend on the process (the model's class differs only by its module: __main__ there)
    with safe_open(str(out / "train.safetensors"), framework="pt") as fh:
        written = json.loads(fh.metadata()["parts"])
    ours = fingerprint_parts(wrap(TinyEncoder(), method="rada"), load_data(root), load_data(root).train, preprocess)
    assert {k for k in ours if ours[k] != written[k]} == {"model"}


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

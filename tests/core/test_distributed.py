"""DistributedDataParallel over a wrapped CLIP: two CPU processes (gloo), checked against one process.

DDP averages the ranks' gradients, so two ranks on equal-sized batches take the same steps as
one process on the concatenated batch (whose cross-entropy and regulariser are batch means).
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rada_mma import wrap
from tests.helpers import tiny_models as tm

WORLD = 2
STEPS = 2
BATCH = 4  # images per rank
CLASSES = ["cat", "dog", "bird", "fish"]


def make_model():
    """The same tiny open_clip and the same adapter in every process."""
    model = wrap(tm.open_clip_model(seed=0), "rada", alpha=0.1, generator=torch.Generator().manual_seed(0))
    return model.set_classes(CLASSES, tokenizer=tm.tokenizer())


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = (torch.arange(BATCH) + rank) % len(CLASSES)
    return tm.images(BATCH, seed=10 + rank), labels


def train(model, forward, images, labels) -> None:
    model.train()
    # SGD: an update linear in the gradient. Adam's g / (√v + ε) would magnify the float rounding by
    # which averaged and concatenated gradients differ, on the entries whose gradient is near zero.
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    for _ in range(STEPS):
        loss = F.cross_entropy(forward(images), labels) + model.regularization()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = make_model()
        base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False: the frozen base has no grads
        train(model, ddp, *rank_batch(rank))
        base_changed = [k for k, v in model.base.state_dict().items() if not torch.equal(v, base_before[k])]
        torch.save({"adapter": model.adapter.state_dict(), "base_changed": base_changed},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_one_process_on_the_concatenated_batch(tmp_path):
    # fork: the workers inherit the imported modules (spawn would import torch and open_clip again,
    # seconds per process); each sets one intra-op thread before any work, as DataLoader workers do
    workers = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 120
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    assert ranks[0]["base_changed"] == ranks[1]["base_changed"] == []
    for name, tensor in ranks[0]["adapter"].items():
        assert torch.equal(tensor, ranks[1]["adapter"][name]), name  # DDP kept the replicas identical

    torch.set_num_threads(1)
    single = make_model()
    initial = {k: v.clone() for k, v in single.adapter.state_dict().items()}
    batches = [rank_batch(r) for r in range(WORLD)]
    train(single, single, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    for name, tensor in single.adapter.state_dict().items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not train"
        torch.testing.assert_close(ranks[0]["adapter"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)

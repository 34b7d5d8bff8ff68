"""Short re-statements of the reference code of the protocols, checked against it by reading:

- Dassl's ``DatasetBase.generate_fewshot_dataset`` (KaiyangZhou/Dassl.pytorch), as CoOp calls it after
  ``set_random_seed(seed)``: the global ``random``, items grouped by label in order of appearance;
- TPT's ``select_confident_samples``, ``avg_entropy`` and ``test_time_tuning`` (azshue/TPT,
  ``tpt_classification.py``): one image, its views in one batch, the confident ones kept, the entropy of their
  mean prediction minimised, the prompt (here: the adapter) reset before the next image.
"""

from __future__ import annotations

import copy
import math
import random
from collections import defaultdict

import torch


def dassl_fewshot(items: list, shots: int) -> list:
    """Dassl's ``generate_fewshot_dataset`` as released: from the global ``random`` as it stands, a label -> items
    tracker, ``random.sample(items_of_label, shots)`` per label (all of them when fewer)."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for group in tracker.values():
        out.extend(random.sample(group, shots) if len(group) >= shots else group)
    return out


def dassl_draw(items: list, shots: int, seed: int) -> list:
    """``random.seed(seed)``, then :func:`dassl_fewshot` (the global ``random`` restored after)."""
    state = random.getstate()
    try:
        random.seed(seed)
        return dassl_fewshot(items, shots)
    finally:
        random.setstate(state)


def tpt_select_confident_samples(logits: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * top)]
    return logits[idx], idx


def tpt_avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def tpt_predict(model, views: torch.Tensor, *, top: float, steps: int, lr: float) -> torch.Tensor:
    """TPT's loop for each image of ``views`` ``(N, V, D)`` (embeddings: the encoders are frozen), on a copy of
    ``model``'s adapter reset from the original before each image; the original view's logits after tuning."""
    start = copy.deepcopy(model.adapter.state_dict())
    out = []
    for image in views:
        model.adapter.load_state_dict(start)  # model.reset()
        optimizer = torch.optim.AdamW([p for p in model.adapter.parameters() if p.requires_grad], lr)
        selected_idx = None
        for _ in range(steps):
            output = model.logits_from_features(image)
            if selected_idx is not None:
                output = output[selected_idx]
            else:
                output, selected_idx = tpt_select_confident_samples(output, top)
            loss = tpt_avg_entropy(output)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            out.append(model.logits_from_features(image[:1])[0])
    model.adapter.load_state_dict(start)
    return torch.stack(out)

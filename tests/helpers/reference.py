"""Literal, slow transcriptions of the authors' released formulations.

These exist only as the reference that the fused kernels are tested and
benchmarked against. They build exactly what the released code builds: RAda's
three ``(B, heads, K, K)`` attention maps with the flattened softmax, and MMA's
``(K + 1)``-token sequence per image run through ``nn.MultiheadAttention``.
Parameter names follow the released code, so golden ``param.*`` tensors load
into them with ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class ReleasedRAdaAttention(nn.Module):
    """RAda's ``SimpleMultiheadAttention`` as released: three query kinds, flat softmax."""

    def __init__(self, dim: int, heads: int = 8, temperature: float = 1.0, softmax: str = "flat"):
        super().__init__()
        self.heads, self.temperature, self.softmax = heads, temperature, softmax
        self.q_proj1 = nn.Linear(dim, dim)  # image query
        self.q_proj2 = nn.Linear(dim, dim)  # text query
        self.q_proj3 = nn.Linear(dim, dim)  # rational query
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, f: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """f: (B, D) normalised image; h: (K, D) or (B, K, D) normalised text. Returns the mask."""
        b, d = f.shape
        if h.dim() == 2:
            h = h.unsqueeze(0).expand(b, -1, -1)
        k = h.shape[1]
        rational = f.unsqueeze(1) * h  # (B, K, D)
        queries = [
            self.q_proj1(s.sqrt() * f).unsqueeze(1).expand(b, k, d),
            self.q_proj2(s.sqrt() * h),
            self.q_proj3(s * rational),
        ]
        keys = self.k_proj(s * rational)
        values = self.v_proj(s * rational)
        dh = d // self.heads

        def split(x):
            return x.reshape(b, k, self.heads, dh).transpose(1, 2)  # (B, H, K, dh)

        keys, values = split(keys), split(values)
        out = 0
        for q in queries:
            scores = split(q) @ keys.transpose(-1, -2) / math.sqrt(dh) / self.temperature  # (B,H,K,K)
            if self.softmax == "flat":
                attn = F.softmax(scores.flatten(-2), dim=-1).view_as(scores) * k
            else:
                attn = F.softmax(scores, dim=-1)
            out = out + attn @ values
        out = (out / 3).transpose(1, 2).reshape(b, k, d)
        return F.relu(1 + self.out_proj(out))


class ReleasedResidualAdapter(nn.Module):
    """The ``Adapter`` of the authors' trainers; ``clip_adapter.py`` zeroes its second layer, ``adapter_mask.py`` not."""

    def __init__(self, dim: int, reduction: int = 4, zero_up: bool = True):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=False),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(inplace=False),
        )
        if zero_up:
            nn.init.zeros_(self.fc[2].weight)

    def forward(self, x):
        return self.fc(x)


class ReleasedRAda(nn.Module):
    """RAda, optionally with adapters, loss = CE + alpha * reg(mask, 1).

    ``adapters``: ``False``; ``True`` (``clip_adapter.py``: ``f + A(f)``, ``A``'s second
    layer zero); ``"blend"`` (the lines ``rada.py`` carries commented out and
    ``adapter_mask.py`` runs: ``alpha·A(f) + (1 − alpha)·f``, ``beta`` on the text side,
    ``alpha = 0.2``, ``beta = 0``, ``A`` at PyTorch's default initialisation).
    """

    def __init__(self, dim, heads=8, temperature=1.0, adapters=False, softmax="flat"):
        super().__init__()
        self.mha = ReleasedRAdaAttention(dim, heads, temperature, softmax)
        self.adapters = adapters
        if adapters:
            self.adapter_image = ReleasedResidualAdapter(dim, zero_up=adapters != "blend")
            self.adapter_text = ReleasedResidualAdapter(dim, zero_up=adapters != "blend")
        if adapters == "blend":
            self.alpha = nn.Parameter(torch.tensor(0.2))
            self.beta = nn.Parameter(torch.tensor(0.0))

    def forward(self, image_features, text_features, s):
        if self.adapters == "blend":
            image_features = self.alpha * self.adapter_image(image_features) + (1 - self.alpha) * image_features
            text_features = self.beta * self.adapter_text(text_features) + (1 - self.beta) * text_features
        elif self.adapters:
            image_features = image_features + self.adapter_image(image_features)
            text_features = text_features + self.adapter_text(text_features)
        f, h = _normalize(image_features), _normalize(text_features)
        mask = self.mha(f, h, s)
        hb = h if h.dim() == 3 else h.unsqueeze(0)
        logits = s * (mask * f.unsqueeze(1) * hb).sum(-1)
        return logits, mask


def released_regularizer(mask: torch.Tensor, kind: str) -> torch.Tensor:
    diff = mask - 1
    if kind == "linf":
        return diff.abs().flatten(1).amax(dim=1).mean()
    if kind == "mse":
        return diff.pow(2).mean()
    if kind == "l1":
        return diff.abs().mean()
    raise ValueError(kind)


class ReleasedMMA(nn.Module):
    """MMA's masked, down-sampled multi-head attention over [texts..., image] per image."""

    def __init__(self, dim, bottleneck=None, heads=4, blend=0.2, variant="paper", hidden=32):
        super().__init__()
        d = bottleneck or dim // 4
        self.variant, self.blend = variant, blend
        adapter = nn.Module()
        if variant == "paper":
            adapter.downsampler = nn.Linear(dim, d)
            adapter.upsampler = nn.Linear(d, dim)
        else:
            adapter.downsampler = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, d))
            adapter.upsampler = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, dim))
        adapter.mha = nn.MultiheadAttention(d, heads)
        self.adapter = adapter

    def forward(self, image_features, text_features, s):
        f, h = _normalize(image_features), _normalize(text_features)
        b, k = f.shape[0], h.shape[0]
        seq = torch.cat([h.unsqueeze(1).expand(k, b, -1), f.unsqueeze(0)], dim=0)  # (K+1, B, D)
        mask = torch.zeros(k + 1, k + 1)
        if self.variant == "paper":
            allowed = torch.zeros(k + 1, k + 1, dtype=torch.bool)
            allowed[:k, k] = True
            allowed[k, :k] = True
            mask = torch.zeros(k + 1, k + 1).masked_fill(~allowed, float("-inf"))
        else:
            mask[:k, k] = 1.0
            mask[k, :k] = 1.0
        x = self.adapter.downsampler(seq)
        x, _ = self.adapter.mha(x, x, x, attn_mask=mask, need_weights=False)
        a = self.adapter.upsampler(x)  # (K+1, B, D)
        a_txt, a_img = a[:k].transpose(0, 1), a[k]  # (B, K, D), (B, D)
        lam = self.blend
        f2 = _normalize(lam * _normalize(a_img) + (1 - lam) * f)
        h2 = _normalize(lam * _normalize(a_txt) + (1 - lam) * h.unsqueeze(0))
        return s * torch.einsum("bd,bkd->bk", f2, h2)

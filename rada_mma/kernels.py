"""Fused tensor math for RAda and MMA: pure functions, no parameters, no state.

Every formula of the package lives here; the modules only hold parameters and
call these functions. Each computes exactly what the authors' released code
computes (see ``METHODS.md``), through algebraically equal forms that never
build RAda's ``(B, heads, K, K)`` attention maps nor MMA's ``(K + 1)``-token
sequence per image. Extra memory is ``O(B·K·D)`` in forward and backward.

Index key:
    b   images                      k, j  classes (query, key)
    d   embedding width             e     output width of a projection
    h   heads                       c     width of one head
    n   MMA's down-sampled width    s     multiplicative logit scale

Precision: projections follow autocast (bf16/fp16 where enabled); softmaxes,
log-sum-exps, normalisations and the final logit reductions run in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "flat_attention",
    "mma_adapted_text",
    "mma_logits",
    "mma_master_logits",
    "mma_text_features",
    "normalize",
    "rada_logits",
    "rada_mask",
    "regularizer",
    "residual_adapter",
]

# Elements of one (B, heads, chunk, K) score block: bounds the attention
# workspace (about 4 such fp32 blocks live at once in backward).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def normalize(x: Tensor) -> Tensor:
    """``x / ‖x‖`` over the last axis, in fp32, exactly as the authors write it."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------
# RAda
# ----------------------------------------------------------------------------


class _RowAttentionWithLSE(torch.autograd.Function):
    """Row-softmax attention that also returns each row's log-sum-exp.

    ``o[q] = softmax_j(S[q, j]) @ v`` and ``lse[q] = logsumexp_j S[q, j]`` with
    ``S = q kᵀ · scale``, computed ``chunk`` query rows at a time. Backward
    recomputes each block from the saved ``lse`` (flash-attention style), so no
    ``(K, K)`` map is ever stored; the gradient through ``lse`` enters as
    ``dS = P ⊙ (dP − rowsum(dO ⊙ o) + dlse)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int):
        # q: (B, H, K, c) (may be a broadcast view), k, v: (B, H, J, c)
        outs, lses = [], []
        kt = k.transpose(-1, -2)  # (B, H, c, J)
        for start in range(0, q.shape[-2], chunk):
            s = (q[..., start : start + chunk, :] @ kt).float() * scale  # (B, H, C, J)
            lse = torch.logsumexp(s, dim=-1)  # (B, H, C)
            p = torch.exp(s - lse.unsqueeze(-1))  # (B, H, C, J)
            outs.append(p.to(v.dtype) @ v)  # (B, H, C, c)
            lses.append(lse)
        o, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)  # (B, H, K, c), (B, H, K)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        if do is None:
            do = torch.zeros_like(o)
        delta = (do.float() * o.float()).sum(-1)  # (B, H, K)
        if dlse is not None:
            delta = delta - dlse.float()
        kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
        dq_parts = []
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for start in range(0, q.shape[-2], chunk):
            rows = slice(start, start + chunk)
            qc, doc = q[..., rows, :], do[..., rows, :]
            s = (qc @ kt).float() * scale  # (B, H, C, J)
            p = torch.exp(s - lse[..., rows].unsqueeze(-1))  # (B, H, C, J)
            dp = (doc @ vt).float()  # (B, H, C, J)
            ds = p * (dp - delta[..., rows].unsqueeze(-1))  # (B, H, C, J)
            dv = dv + p.transpose(-1, -2) @ doc.float()  # (B, H, J, c)
            ds_low = ds.to(q.dtype)
            dq_parts.append((ds_low @ k).float() * scale)  # (B, H, C, c)
            dk = dk + (ds_low.transpose(-1, -2) @ qc).float() * scale  # (B, H, J, c)
        dq = torch.cat(dq_parts, dim=-2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def flat_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, softmax: str = "flat", chunk: int
) -> Tensor:
    """Attention of RAda's text or rational queries, without a ``(K, K)`` map.

    Args:
        q: ``(B, H, K, c)`` queries (a broadcast view is fine).
        k, v: ``(B, H, K, c)`` keys and values.
        scale: multiplies the scores (``1 / (√c · τ)``).
        softmax: ``"flat"``: the released softmax over all ``K·K`` entries of a
            head's map, times ``K``; ``"row"``: the textbook row softmax.
        chunk: query rows processed per block.

    Returns:
        ``(B, H, K, c)``: ``A @ v`` for the chosen ``A``.

    The flat softmax times ``K`` equals ``K · exp(lse_q − L) · rowsoftmax``
    with ``L = logsumexp_q lse_q``: rows are rescaled after the fact.
    """
    o, lse = _RowAttentionWithLSE.apply(q, k, v, scale, chunk)  # (B, H, K, c), (B, H, K)
    if softmax == "row":
        return o
    n = q.shape[-2]
    weight = torch.exp(lse - torch.logsumexp(lse, dim=-1, keepdim=True)) * n  # (B, H, K)
    return o * weight.unsqueeze(-1).to(o.dtype)


def _chunk_rows(batch: int, heads: int, keys: int, budget: int) -> int:
    return max(1, budget // max(1, batch * heads * keys))


def rada_mask(
    f: Tensor,
    h: Tensor,
    scale: Tensor,
    *,
    query_image: tuple[Tensor, Tensor],
    query_text: tuple[Tensor, Tensor],
    qkv_rational: tuple[Tensor, Tensor],
    out: tuple[Tensor, Tensor],
    heads: int,
    temperature: float,
    softmax: str = "flat",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """RAda's mask ``M = ReLU(1 + W_o(attention))`` over the rational matrix.

    Args:
        f: ``(B, D)`` normalised image features.
        h: ``(K, D)`` normalised class text features, or ``(B, K, D)`` when
            each image has its own (after MMA in ``"mma+rada"``).
        scale: the multiplicative logit scale ``s`` (a scalar tensor).
        query_image, query_text: ``(weight (D, D), bias (D,))`` of ``W_qi``, ``W_qt``.
        qkv_rational: the stacked ``W_qr, W_k, W_v``: ``((3D, D), (3D,))``.
        out: ``W_o`` as ``(weight, bias)``.
        heads, temperature, softmax: as in :class:`rada_mma.RationalMask`.
        chunk_elements: size of one score block; bounds the workspace.

    Returns:
        ``(B, K, D)`` mask ``M``.
    """
    b, d = f.shape
    k = h.shape[-2]
    c = d // heads
    s = scale.to(torch.float32)
    # The rational matrix s·R[b, k] = s·f̂_b ⊙ ĥ_k is the projections' input; it
    # is O(B·K·D) and is what autograd keeps for the weight gradients.
    rational = (s * f).unsqueeze(1) * h  # (B, K, D)
    q_r, keys, values = F.linear(rational, *qkv_rational).chunk(3, dim=-1)  # 3 × (B, K, D)
    q_i = F.linear(s.sqrt() * f, *query_image)  # (B, D)
    q_t = F.linear(s.sqrt() * h, *query_text)  # (K, D) or (B, K, D)

    def split(x: Tensor) -> Tensor:
        return rearrange(x, "... k (h c) -> ... h k c", h=heads)

    keys, values, q_r = split(keys), split(values), split(q_r)  # (B, H, K, c)
    q_t = split(q_t)  # (H, K, c) or (B, H, K, c)
    q_t = q_t.expand(b, *q_t.shape[-3:])  # (B, H, K, c), a view
    attn_scale = 1.0 / (math.sqrt(c) * temperature)
    chunk = _chunk_rows(b, heads, k, chunk_elements)

    # Image queries: all K rows of the map are equal, so the flat softmax
    # times K is a plain softmax over one (1, K) row per head and image.
    q_i = rearrange(q_i, "b (h c) -> b h c", h=heads)  # (B, H, c)
    scores_i = torch.einsum("bhc,bhkc->bhk", q_i, keys).float() * attn_scale  # (B, H, K)
    attn_i = torch.softmax(scores_i, dim=-1).to(values.dtype)  # (B, H, K)
    o_i = torch.einsum("bhk,bhkc->bhc", attn_i, values)  # (B, H, c)
    o_t = flat_attention(q_t, keys, values, scale=attn_scale, softmax=softmax, chunk=chunk)
    o_r = flat_attention(q_r, keys, values, scale=attn_scale, softmax=softmax, chunk=chunk)
    mixed = (o_t + o_r + o_i.unsqueeze(-2)) / 3  # (B, H, K, c)
    mixed = rearrange(mixed, "b h k c -> b k (h c)")  # (B, K, D)
    return F.relu(1 + F.linear(mixed, *out).float())  # (B, K, D)


def rada_logits(mask: Tensor, f: Tensor, h: Tensor, scale: Tensor) -> Tensor:
    """``s · Σ_d M[b,k,d] · f̂[b,d] · ĥ[k,d]`` in fp32; ``h`` is ``(K, D)`` or ``(B, K, D)``."""
    with _no_autocast(f):
        s = scale.to(torch.float32)
        if h.dim() == 2:
            return s * torch.einsum("bkd,bd,kd->bk", mask.float(), f.float(), h.float())  # (B, K)
        return s * torch.einsum("bkd,bd,bkd->bk", mask.float(), f.float(), h.float())  # (B, K)


def regularizer(mask: Tensor, kind: str) -> Tensor:
    """Distance of the mask from 1, as the released trainers compute it.

    ``"linf"``: per image ``max |M − 1|``, averaged over images (plain RAda);
    ``"mse"``: ``mean (M − 1)²`` (RAda+Adapter); ``"l1"``: ``mean |M − 1|``.
    """
    diff = mask.float() - 1  # (B, K, D)
    if kind == "linf":
        return diff.abs().flatten(1).amax(dim=1).mean()
    if kind == "mse":
        return diff.pow(2).mean()
    if kind == "l1":
        return diff.abs().mean()
    raise ValueError(f"unknown regularizer {kind!r}; expected 'linf', 'mse' or 'l1'")


def residual_adapter(x: Tensor, w_down: Tensor, w_up: Tensor) -> Tensor:
    """CLIP-Adapter's residual form used by RAda+Adapter: ``x + ReLU(W_2 ReLU(W_1 x))``."""
    return x + F.relu(F.linear(F.relu(F.linear(x, w_down)), w_up)).to(x.dtype)


# ----------------------------------------------------------------------------
# MMA
# ----------------------------------------------------------------------------


def _mha_projections(x: Tensor, in_proj: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``nn.MultiheadAttention``'s packed input projection: q, k, v, each ``(..., n)``."""
    return F.linear(x, *in_proj).chunk(3, dim=-1)


def _blend(adapted: Tensor, original: Tensor, blend: float) -> Tensor:
    return normalize(blend * normalize(adapted) + (1 - blend) * original)


def mma_text_features(
    f: Tensor,
    h: Tensor,
    *,
    down: tuple[Tensor, Tensor],
    in_proj: tuple[Tensor, Tensor],
    out_proj: tuple[Tensor, Tensor],
    up: tuple[Tensor, Tensor],
    heads: int,
    blend: float,
) -> tuple[Tensor, Tensor]:
    """The adapted image features and the one adapted text direction per image.

    A text token may attend only to the image token, so its attention weight
    is exactly 1 and every class of image ``b`` receives the same vector
    ``t_b = up(W_o(W_v down(f̂_b) + b_v) + b_o)``. The image token attends to
    the K text tokens: ordinary cross-attention of B queries over K shared keys.

    Args:
        f: ``(B, D)`` normalised image features; h: ``(K, D)`` normalised text.

    Returns:
        ``f'`` ``(B, D)`` (blended, normalised) and ``t̂`` ``(B, D)`` (normalised).
    """
    n = down[0].shape[0]
    c = n // heads
    x_img, x_txt = F.linear(f, *down), F.linear(h, *down)  # (B, n), (K, n)
    q_img, _, v_img = _mha_projections(x_img, in_proj)  # (B, n) each
    _, k_txt, v_txt = _mha_projections(x_txt, in_proj)  # (K, n) each
    q_img = rearrange(q_img, "b (h c) -> b h c", h=heads)
    k_txt = rearrange(k_txt, "k (h c) -> k h c", h=heads)
    v_txt = rearrange(v_txt, "k (h c) -> k h c", h=heads)
    scores = torch.einsum("bhc,khc->bhk", q_img, k_txt).float() / math.sqrt(c)  # (B, H, K)
    attn = torch.softmax(scores, dim=-1).to(v_txt.dtype)  # (B, H, K)
    o_img = rearrange(torch.einsum("bhk,khc->bhc", attn, v_txt), "b h c -> b (h c)")  # (B, n)
    a_img = F.linear(F.linear(o_img, *out_proj), *up)  # (B, D)
    a_txt = F.linear(F.linear(v_img, *out_proj), *up)  # (B, D): one per image
    return _blend(a_img, f, blend), normalize(a_txt)


def mma_logits(f2: Tensor, t: Tensor, h: Tensor, scale: Tensor, blend: float) -> Tensor:
    """MMA's logits ``s·⟨f'_b, h'_{b,k}⟩`` with ``h'_{b,k} = norm(λ t̂_b + (1−λ) ĥ_k)``.

    Since ``t̂_b`` and ``ĥ_k`` are unit vectors, ``‖λ t̂_b + (1−λ) ĥ_k‖² =
    λ² + (1−λ)² + 2λ(1−λ)⟨t̂_b, ĥ_k⟩``: two ``(B, K)`` matmuls, no ``(B, K, D)``.
    """
    lam = blend
    with _no_autocast(f2):
        f2, t, h = f2.float(), t.float(), h.float()
        s = scale.to(torch.float32)
        cos_th = t @ h.T  # (B, K)
        cos_fh = f2 @ h.T  # (B, K)
        cos_ft = (f2 * t).sum(-1, keepdim=True)  # (B, 1)
        norm2 = lam**2 + (1 - lam) ** 2 + 2 * lam * (1 - lam) * cos_th  # (B, K)
        return s * (lam * cos_ft + (1 - lam) * cos_fh) / norm2.clamp_min(1e-12).sqrt()


def mma_adapted_text(t: Tensor, h: Tensor, blend: float) -> Tensor:
    """``h'_{b,k} = norm(λ t̂_b + (1−λ) ĥ_k)`` explicitly, ``(B, K, D)`` (for stacking RAda on MMA)."""
    return normalize(blend * t.unsqueeze(1) + (1 - blend) * h.unsqueeze(0))


def mma_master_logits(
    f: Tensor,
    h: Tensor,
    scale: Tensor,
    *,
    down: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    in_proj: tuple[Tensor, Tensor],
    out_proj: tuple[Tensor, Tensor],
    up: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    heads: int,
    blend: float,
) -> Tensor:
    """The earlier released MMA: every token sees every token, +1 on cross-modal scores.

    Text→text scores do not depend on the image, so each text query's partial
    softmax numerator ``N`` and denominator ``Z`` over the K text keys are
    computed once per class set (``O(K²·n)``); each image adds only its own
    key (score + 1) to every text row, and its own row over K + 1 keys.

    Args:
        f: ``(B, D)``, h: ``(K, D)``: normalised features.
        down, up: the two linear layers of each side (``up`` has a GELU between).

    Returns:
        ``(B, K)`` logits.
    """
    n = in_proj[0].shape[1]
    c = n // heads
    inv = 1.0 / math.sqrt(c)

    def down_map(x: Tensor) -> Tensor:
        return F.linear(F.linear(x, *down[0]), *down[1])

    def split(x: Tensor) -> Tensor:
        return rearrange(x, "... (h c) -> ... h c", h=heads)

    q_txt, k_txt, v_txt = map(split, _mha_projections(down_map(h), in_proj))  # (K, H, c)
    q_img, k_img, v_img = map(split, _mha_projections(down_map(f), in_proj))  # (B, H, c)

    # Text rows: shared text-text part, stabilised by its own row maximum.
    tt = torch.einsum("qhc,jhc->hqj", q_txt, k_txt).float() * inv  # (H, K, K), once per class set
    m_tt = tt.amax(dim=-1).detach()  # (H, K)
    p_tt = torch.exp(tt - m_tt.unsqueeze(-1))  # (H, K, K)
    num = torch.einsum("hqj,jhc->hqc", p_tt, v_txt.float())  # (H, K, c)
    den = p_tt.sum(-1)  # (H, K)
    ti = torch.einsum("qhc,bhc->bhq", q_txt, k_img).float() * inv + 1  # (B, H, K): text → own image
    m = torch.maximum(m_tt.unsqueeze(0), ti).detach()  # (B, H, K)
    w_tt, w_ti = torch.exp(m_tt - m), torch.exp(ti - m)  # (B, H, K) each
    o_txt = (w_tt.unsqueeze(-1) * num + w_ti.unsqueeze(-1) * v_img.float().unsqueeze(2)) / (
        w_tt * den + w_ti
    ).unsqueeze(-1)  # (B, H, K, c)
    o_txt = rearrange(o_txt, "b h k c -> b k (h c)")  # (B, K, n)

    # Image row: K text keys (+1) and itself (+0): a softmax over K + 1 scores.
    it = torch.einsum("bhc,khc->bhk", q_img, k_txt).float() * inv + 1  # (B, H, K)
    ii = (q_img.float() * k_img.float()).sum(-1, keepdim=True) * inv  # (B, H, 1)
    attn = torch.softmax(torch.cat([it, ii], dim=-1), dim=-1)  # (B, H, K + 1)
    o_img = torch.einsum("bhk,khc->bhc", attn[..., :-1], v_txt.float()) + attn[..., -1:] * v_img.float()
    o_img = rearrange(o_img, "b h c -> b (h c)")  # (B, n)

    def up_map(x: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(x, *up[0])), *up[1])

    a_img = up_map(F.linear(o_img.to(out_proj[0].dtype), *out_proj))  # (B, D)
    a_txt = up_map(F.linear(o_txt.to(out_proj[0].dtype), *out_proj))  # (B, K, D)
    f2 = _blend(a_img, f, blend)  # (B, D)
    h2 = _blend(a_txt, h.unsqueeze(0), blend)  # (B, K, D)
    with _no_autocast(f2):
        return scale.to(torch.float32) * torch.einsum("bd,bkd->bk", f2, h2)  # (B, K)

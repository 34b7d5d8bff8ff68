"""Fused tensor math for RAda and MMA: pure functions, no parameters, no state.

Every formula of the package lives here; the modules only hold parameters and
call these functions. Each computes exactly what the authors' released code
computes (see ``docs/methods.md``), through algebraically equal forms that never
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
    "blend_adapter",
    "clip_adapter",
    "flat_attention",
    "mma_adapted_text",
    "mma_image_attention",
    "mma_logits",
    "mma_master_logits",
    "mma_text_features",
    "normalize",
    "rada_logits",
    "rada_mask",
    "regularizer",
    "residual_adapter",
    "row_attention_with_lse",
]

# Elements of one (B, heads, chunk, K) score block of the portable (chunked)
# attention: bounds its workspace (about 3 such blocks live at once in backward).
DEFAULT_CHUNK_ELEMENTS = 1 << 22

# PyTorch's fused flash-attention kernels for CPU (forward returns the row
# log-sum-exp; backward recomputes blocks from it). Used for the text and
# rational attentions on CPU (float64 too, so gradcheck covers this path); set
# to False to force the portable chunked path everywhere.
FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _up(x: Tensor) -> Tensor:
    """At least fp32: half precisions go up to fp32, float64 stays float64 (for gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions accumulate in for inputs of ``dtype``: fp32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def normalize(x: Tensor) -> Tensor:
    """``x / ‖x‖`` over the last axis, in fp32, as the authors write it but without overflow.

    Each row is first divided by its largest magnitude, so the squares inside the norm stay in range:
    ``x / x.norm()`` alone gives 0 for entries ≥ 1e19 in fp32 (the norm overflows to inf) and NaN for
    tiny ones (it underflows to 0). Equal to the plain form to rounding (≤ 1 ulp per division).
    """
    x = _up(x)
    x = x / x.abs().amax(dim=-1, keepdim=True)  # rows in [-1, 1]: no square overflows or vanishes
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------
# RAda
# ----------------------------------------------------------------------------


class _RowAttentionWithLSE(torch.autograd.Function):
    """Row-softmax attention that also returns each row's log-sum-exp (portable path).

    ``o[q] = softmax_j(S[q, j]) @ v`` and ``lse[q] = logsumexp_j S[q, j]`` with
    ``S = q kᵀ · scale``, computed ``chunk`` query rows at a time. Backward
    recomputes each block from the saved ``lse`` (flash-attention style), so no
    ``(K, K)`` map is ever stored; the gradient through ``lse`` enters as
    ``dS = P ⊙ (dP − rowsum(dO ⊙ o) + dlse)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int):
        # q: (B, H, K, c) (may be a broadcast view), k, v: (B, H, J, c)
        # Contiguous keys and values: a strided (B, H) batch would be copied by
        # every block's matmul.
        k, v = k.contiguous(), v.contiguous()
        outs, lses = [], []
        kt = k.transpose(-1, -2)  # (B, H, c, J), a view
        for start in range(0, q.shape[-2], chunk):
            qc = q[..., start : start + chunk, :] * scale  # (B, H, C, c): scale folded into the queries
            s = _up(qc @ kt)  # (B, H, C, J)
            lse = torch.logsumexp(s, dim=-1)  # (B, H, C)
            p = s.sub_(lse.unsqueeze(-1)).exp_()  # (B, H, C, J), in place
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
        delta = (_up(do) * _up(o)).sum(-1)  # (B, H, K)
        if dlse is not None:
            delta = delta - _up(dlse)
        kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)  # views
        dq_parts = []
        dk = torch.zeros(k.shape, dtype=_acc(k.dtype), device=k.device)
        dv = torch.zeros(v.shape, dtype=_acc(v.dtype), device=v.device)
        for start in range(0, q.shape[-2], chunk):
            rows = slice(start, start + chunk)
            qc, doc = q[..., rows, :] * scale, do[..., rows, :]  # (B, H, C, c)
            s = _up(qc @ kt)  # (B, H, C, J)
            p = s.sub_(lse[..., rows].unsqueeze(-1)).exp_()  # (B, H, C, J), in place
            ds = _up(doc @ vt)  # dP: (B, H, C, J)
            ds = ds.sub_(delta[..., rows].unsqueeze(-1)).mul_(p)  # dS = P ⊙ (dP − delta), in place
            dv += _up(p.transpose(-1, -2) @ _up(doc))  # (B, H, J, c)
            ds_low = ds.to(q.dtype)
            dq_parts.append(_up(ds_low @ k) * scale)  # (B, H, C, c)
            dk += _up(ds_low.transpose(-1, -2) @ qc)  # (B, H, J, c): qc carries the scale
        dq = torch.cat(dq_parts, dim=-2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _FlashAttentionCPU(torch.autograd.Function):
    """Row attention and its log-sum-exp through PyTorch's fused CPU flash kernels.

    ``q, k, v`` arrive with one extra column after the head width ``c``
    (``(..., c + 1)``): zero in ``q`` and ``k``, so the scores are those of the
    unpadded tensors, and one in ``v``. The column lets backward take the
    gradient of ``lse``, which the kernel does not: it forms
    ``dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))``. With ``dlse`` in that column of
    ``dO``, against the ones of ``V``, every ``dP[q, j]`` gains ``dlse[q]``;
    the saved ``O`` has that column zeroed after forward (it held
    ``Σ_j P[q, j] = 1``), so the row sum is unchanged and
    ``dS = P ⊙ (dP − rowsum(dO ⊙ O) + dlse)``, as required. The output's
    extra column is zero; the gradients' extra columns are to be discarded.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float):
        # q: (B, H, Q, c + 1) (a broadcast view is fine), k, v: (B, H, J, c + 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        out[..., -1] = 0  # (B, H, Q, c + 1); was Σ_j P = 1
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse  # lse: (B, H, Q), fp32

    @staticmethod
    def backward(ctx, do: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)  # (B, H, Q, c + 1)
        # Written in place: the only consumer of `out` is the row rescaling in
        # _query_attention, whose backward hands us a fresh tensor (saves a copy).
        do[..., -1] = 0 if dlse is None else dlse
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, False, scale=ctx.scale
        )
        return dq, dk, dv, None


class _RationalProjection(torch.autograd.Function):
    """``F.linear(s·f̂_b ⊙ ĥ_k, W, bias)`` for every image and class, ``(B, K, E)``.

    Autograd would keep the ``(B, K, D)`` rational matrix for ``dW``; it is a
    product of the small ``f̂`` and ``ĥ``, so backward recomputes it instead.
    Under autocast the projection runs in autocast's dtype, and so do its
    gradients (as autograd through an autocast ``F.linear`` would).
    """

    @staticmethod
    def forward(ctx, f: Tensor, h: Tensor, s: Tensor, weight: Tensor, bias: Tensor | None):
        # f: (B, D), h: (K, D) or (B, K, D), s: ()
        rational = (s * f).unsqueeze(1) * h  # (B, K, D)
        ctx.save_for_backward(f, h, s, weight)
        ctx.has_bias = bias is not None
        return F.linear(rational, weight, bias)  # (B, K, E)

    @staticmethod
    def backward(ctx, dy: Tensor):
        f, h, s, weight = ctx.saved_tensors
        rational = (s * f).unsqueeze(1) * h  # (B, K, D), recomputed
        rows = dy.flatten(0, -2)  # (B·K, E)
        dw = (rows.T @ rational.flatten(0, -2).to(dy.dtype)).to(weight.dtype)  # (E, D)
        db = rows.sum(0, dtype=_acc(rows.dtype)).to(weight.dtype) if ctx.has_bias else None  # (E,)
        df = dh = ds = None
        if any(ctx.needs_input_grad[:3]):
            dr = _up(dy @ weight.to(dy.dtype))  # (B, K, D): gradient of the rational matrix
            if ctx.needs_input_grad[0]:
                df = s * (dr * h).sum(-2)  # (B, D)
            if ctx.needs_input_grad[1]:
                dh = s * f.unsqueeze(1) * dr  # (B, K, D)
                dh = dh.sum(0) if h.dim() == 2 else dh  # (K, D) when shared by all images
            if ctx.needs_input_grad[2]:
                ds = (dr * f.unsqueeze(1) * h).sum()
        return df, dh, ds, dw, db


def _use_flash(x: Tensor) -> bool:
    """Whether the fused CPU kernels serve this device and dtype (static: no tensor values read)."""
    return FLASH_CPU and x.device.type == "cpu" and x.dtype in _FLASH_DTYPES


def row_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    """The portable attention path: ``softmax(q kᵀ · scale) v`` and each row's log-sum-exp.

    Args:
        q: ``(B, H, K, c)`` queries (a broadcast view is fine).
        k, v: ``(B, H, J, c)`` keys and values.
        scale: multiplies the scores.
        chunk: query rows per block; backward recomputes each block, so no ``(K, J)`` map is stored.

    Returns:
        ``(B, H, K, c)`` outputs and ``(B, H, K)`` log-sum-exps.
    """
    return _RowAttentionWithLSE.apply(q, k, v, scale, chunk)


def _query_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, softmax: str, chunk: int, padded: bool
) -> Tensor:
    """``A V`` for one query kind by the fastest exact path for the device: ``(B, H, K, c)``.

    ``softmax="flat"`` rescales row ``q`` of the row-softmax output by
    ``K · exp(lse_q − logsumexp_q lse_q)``. ``padded``: ``q, k, v`` carry the
    extra column of :class:`_FlashAttentionCPU` (the output keeps it, zero);
    the portable path is never given one.
    """
    if softmax == "row":  # no log-sum-exp needed: PyTorch's own fused attention where it has one
        if _use_flash(q):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return row_attention_with_lse(q, k, v, scale=scale, chunk=chunk)[0]
    if padded:
        o, lse = _FlashAttentionCPU.apply(q, k, v, scale)  # (B, H, K, c + 1), (B, H, K)
    else:
        o, lse = row_attention_with_lse(q, k, v, scale=scale, chunk=chunk)  # (B, H, K, c), (B, H, K)
    weight = torch.softmax(lse, dim=-1) * q.shape[-2]  # (B, H, K): K · exp(lse_q − L)
    return o * weight.unsqueeze(-1).to(o.dtype)


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
        chunk: query rows per block of the portable path (the fused CPU
            kernels choose their own blocks).

    Returns:
        ``(B, H, K, c)``: ``A @ v`` for the chosen ``A``.

    The flat softmax times ``K`` equals ``K · exp(lse_q − L) · rowsoftmax``
    with ``L = logsumexp_q lse_q``: rows are rescaled after the fact.
    """
    padded = softmax == "flat" and _use_flash(q) and k.dtype == q.dtype == v.dtype
    if padded:  # the extra column _FlashAttentionCPU needs
        q, k, v = F.pad(q, (0, 1)), F.pad(k, (0, 1)), F.pad(v, (0, 1), value=1.0)  # (..., c + 1)
    o = _query_attention(q, k, v, scale=scale, softmax=softmax, chunk=chunk, padded=padded)
    return o[..., :-1] if padded else o


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
        chunk_elements: size of one score block of the portable path; bounds its workspace.

    Returns:
        ``(B, K, D)`` mask ``M``.
    """
    b, d = f.shape
    k = h.shape[-2]
    c = d // heads
    s = scale.to(_acc(f.dtype))
    # The rational matrix s·R[b, k] = s·f̂_b ⊙ ĥ_k is the projections' input:
    # O(B·K·D), recomputed in backward rather than kept.
    q_r, keys, values = _RationalProjection.apply(f, h, s, *qkv_rational).chunk(3, dim=-1)  # 3 × (B, K, D)
    q_i = F.linear(s.sqrt() * f, *query_image).unsqueeze(-2)  # (B, 1, D)
    q_t = F.linear(s.sqrt() * h, *query_text)  # (K, D) or (B, K, D)
    # On CPU the text and rational attentions run in the fused flash kernels,
    # which take one extra column per head: zero in queries and keys, one in
    # values (see _FlashAttentionCPU).
    padded = softmax == "flat" and _use_flash(keys)  # static: device and dtype only

    def split(x: Tensor, pad: float = 0.0) -> Tensor:  # (..., K, D) -> (..., H, K, c (+ 1)), one contiguous copy
        x = rearrange(x, "... k (h c) -> ... h k c", h=heads)
        return F.pad(x, (0, 1), value=pad) if padded else x.contiguous()

    keys, q_r, q_i = split(keys), split(q_r), split(q_i)  # (B, H, K, c'), q_i (B, H, 1, c')
    values = split(values, pad=1.0)  # (B, H, K, c')
    q_t = split(q_t)  # (H, K, c') or (B, H, K, c')
    q_t = q_t.expand(b, *q_t.shape[-3:])  # (B, H, K, c'), a view: shared text queries are never copied
    attn_scale = 1.0 / (math.sqrt(c) * temperature)
    chunk = _chunk_rows(b, heads, k, chunk_elements)

    # Image queries: all K rows of the map are equal, so the flat softmax
    # times K is a plain softmax over one (1, K) row per head and image.
    scores_i = _up(q_i @ keys.transpose(-1, -2)) * attn_scale  # (B, H, 1, K)
    o_i = torch.softmax(scores_i, dim=-1).to(values.dtype) @ values  # (B, H, 1, c')
    options = dict(scale=attn_scale, softmax=softmax, chunk=chunk, padded=padded)
    o_t = _query_attention(q_t, keys, values, **options)  # (B, H, K, c')
    o_r = _query_attention(q_r, keys, values, **options)  # (B, H, K, c')
    mixed = (o_t + o_r).add_(o_i).div_(3)  # (B, H, K, c'): A = (A_i V + A_t V + A_r V) / 3
    mixed = rearrange(mixed[..., :c], "b h k c -> b k (h c)")  # (B, K, D)
    return F.relu_(_up(F.linear(mixed, *out)).add_(1))  # (B, K, D), in place: the projection output is ours


def rada_logits(mask: Tensor, f: Tensor, h: Tensor, scale: Tensor) -> Tensor:
    """``s · Σ_d M[b,k,d] · f̂[b,d] · ĥ[k,d]`` in fp32; ``h`` is ``(K, D)`` or ``(B, K, D)``.

    Written as the released code writes it, products then one sum over ``d``:
    as accurate as the released logits (a three-operand einsum goes through a
    matmul that loses a few more ulps) and, with frozen features, autograd keeps
    no ``(B, K, D)`` tensor for it.
    """
    with _no_autocast(f):
        s = scale.to(_acc(f.dtype))
        return s * (_up(mask) * _up(f).unsqueeze(1) * _up(h)).sum(-1)  # (B, K)


def regularizer(mask: Tensor, kind: str) -> Tensor:
    """Distance of the mask from 1, as the released trainers compute it.

    ``"linf"``: per image ``max |M − 1|``, averaged over images (plain RAda);
    ``"mse"``: ``mean (M − 1)²`` (RAda+Adapter); ``"l1"``: ``mean |M − 1|``.
    """
    diff = _up(mask) - 1  # (B, K, D)
    if kind == "linf":
        return diff.abs().flatten(1).amax(dim=1).mean()
    if kind == "mse":
        return diff.pow(2).mean()
    if kind == "l1":
        return diff.abs().mean()
    raise ValueError(f"unknown regularizer {kind!r}; expected 'linf', 'mse' or 'l1'")


def clip_adapter(x: Tensor, w_down: Tensor, w_up: Tensor) -> Tensor:
    """CLIP-Adapter's bottleneck ``A(x) = ReLU(W_2 ReLU(W_1 x))``, no biases: ``(..., d) -> (..., d)``."""
    return F.relu(F.linear(F.relu(F.linear(x, w_down)), w_up)).to(x.dtype)


def residual_adapter(x: Tensor, w_down: Tensor, w_up: Tensor) -> Tensor:
    """RAda+Adapter as released: ``x + A(x)`` (:func:`clip_adapter`)."""
    return x + clip_adapter(x, w_down, w_up)


def blend_adapter(x: Tensor, w_down: Tensor, w_up: Tensor, ratio: Tensor) -> Tensor:
    """CLIP-Adapter's blend: ``ratio · A(x) + (1 − ratio) · x`` with a scalar ``ratio`` (:func:`clip_adapter`)."""
    ratio = ratio.to(x.dtype)
    return ratio * clip_adapter(x, w_down, w_up) + (1 - ratio) * x


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
    scores = _up(torch.einsum("bhc,khc->bhk", q_img, k_txt)) / math.sqrt(c)  # (B, H, K)
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
        f2, t, h = _up(f2), _up(t), _up(h)
        s = scale.to(_acc(f2.dtype))
        cos_th = t @ h.T  # (B, K)
        cos_fh = f2 @ h.T  # (B, K)
        cos_ft = (f2 * t).sum(-1, keepdim=True)  # (B, 1)
        norm2 = lam**2 + (1 - lam) ** 2 + 2 * lam * (1 - lam) * cos_th  # (B, K)
        return s * (lam * cos_ft + (1 - lam) * cos_fh) / norm2.clamp_min(1e-12).sqrt()


def mma_adapted_text(t: Tensor, h: Tensor, blend: float) -> Tensor:
    """``h'_{b,k} = norm(λ t̂_b + (1−λ) ĥ_k)`` explicitly, ``(B, K, D)`` (for stacking RAda on MMA)."""
    return normalize(blend * t.unsqueeze(1) + (1 - blend) * h.unsqueeze(0))


def mma_image_attention(
    x_img: Tensor, x_txt: Tensor, *, in_proj: tuple[Tensor, Tensor], heads: int, master: bool = False
) -> Tensor:
    """The image token's attention weights over the K class tokens, per head: ``(B, H, K)``.

    Args:
        x_img: ``(B, n)`` and x_txt: ``(K, n)``: down-sampled normalised features.
        in_proj: ``nn.MultiheadAttention``'s packed input projection.
        master: the earlier released variant: a softmax over the K texts (+1
            cross-modal bias) and the image itself, of which the K text weights
            are returned (a row then sums to less than 1).
    """
    n = x_img.shape[-1]
    q_img, k_img, _ = _mha_projections(x_img, in_proj)  # (B, n) each
    _, k_txt, _ = _mha_projections(x_txt, in_proj)  # (K, n)
    q_img, k_img = (rearrange(x, "b (h c) -> b h c", h=heads) for x in (q_img, k_img))  # (B, H, c)
    k_txt = rearrange(k_txt, "k (h c) -> k h c", h=heads)  # (K, H, c)
    inv = 1.0 / math.sqrt(n // heads)
    scores = _up(torch.einsum("bhc,khc->bhk", q_img, k_txt)) * inv  # (B, H, K)
    if not master:
        return torch.softmax(scores, dim=-1)
    itself = _up((q_img * k_img).sum(-1, keepdim=True)) * inv  # (B, H, 1)
    return torch.softmax(torch.cat([scores + 1, itself], dim=-1), dim=-1)[..., :-1]  # (B, H, K)


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
    tt = _up(torch.einsum("qhc,jhc->hqj", q_txt, k_txt)) * inv  # (H, K, K), once per class set
    m_tt = tt.amax(dim=-1).detach()  # (H, K)
    p_tt = torch.exp(tt - m_tt.unsqueeze(-1))  # (H, K, K)
    num = torch.einsum("hqj,jhc->hqc", p_tt, _up(v_txt))  # (H, K, c)
    den = p_tt.sum(-1)  # (H, K)
    ti = _up(torch.einsum("qhc,bhc->bhq", q_txt, k_img)) * inv + 1  # (B, H, K): text → own image
    m = torch.maximum(m_tt.unsqueeze(0), ti).detach()  # (B, H, K)
    w_tt, w_ti = torch.exp(m_tt - m), torch.exp(ti - m)  # (B, H, K) each
    o_txt = (w_tt.unsqueeze(-1) * num + w_ti.unsqueeze(-1) * _up(v_img).unsqueeze(2)) / (
        w_tt * den + w_ti
    ).unsqueeze(-1)  # (B, H, K, c)
    o_txt = rearrange(o_txt, "b h k c -> b k (h c)")  # (B, K, n)

    # Image row: K text keys (+1) and itself (+0): a softmax over K + 1 scores.
    it = _up(torch.einsum("bhc,khc->bhk", q_img, k_txt)) * inv + 1  # (B, H, K)
    ii = (_up(q_img) * _up(k_img)).sum(-1, keepdim=True) * inv  # (B, H, 1)
    attn = torch.softmax(torch.cat([it, ii], dim=-1), dim=-1)  # (B, H, K + 1)
    o_img = torch.einsum("bhk,khc->bhc", attn[..., :-1], _up(v_txt)) + attn[..., -1:] * _up(v_img)
    o_img = rearrange(o_img, "b h c -> b (h c)")  # (B, n)

    def up_map(x: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(x, *up[0])), *up[1])

    a_img = up_map(F.linear(o_img.to(out_proj[0].dtype), *out_proj))  # (B, D)
    a_txt = up_map(F.linear(o_txt.to(out_proj[0].dtype), *out_proj))  # (B, K, D)
    f2 = _blend(a_img, f, blend)  # (B, D)
    h2 = _blend(a_txt, h.unsqueeze(0), blend)  # (B, K, D)
    with _no_autocast(f2):
        return scale.to(_acc(f2.dtype)) * torch.einsum("bd,bkd->bk", f2, h2)  # (B, K)

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
    "attention_path",
    "blend_adapter",
    "clip_adapter",
    "flat_attention",
    "mma_adapted_text",
    "mma_class_terms",
    "mma_image_attention",
    "mma_logits",
    "mma_master_class_terms",
    "mma_master_logits",
    "mma_text_features",
    "normalize",
    "rada_attention",
    "rada_logits",
    "rada_mask",
    "rada_mask_and_logits",
    "rada_masked_logits",
    "rada_text_queries",
    "regularizer",
    "residual_adapter",
    "row_attention_with_lse",
]

# With gradients, RAda's attention maps of at most this many elements
# (B·heads·K², per query kind: up to K = 32 at B = 32, K = 64 at B = 8) are built
# whole and kept for backward: there that is cheaper than the flash/chunked
# kernels, which recompute blocks in backward and cost more calls; above it they
# win (measured on one CPU thread: docs/methods.md, section 3.5). Set to 0 to
# always use those kernels when training.
MATERIALISE_ELEMENTS = 1 << 18

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


def _row_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    """``softmax(q kᵀ · scale) v`` and the row log-sum-exps, ``chunk`` query rows at a time, no autograd."""
    # Contiguous keys and values: a strided (B, H) batch would be copied by every block's matmul.
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
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)  # (B, H, K, c), (B, H, K)


def _row_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_row_forward`, each block recomputed from ``lse``: ``dS = P ⊙ (dP − rowsum(dO ⊙ O) + dlse)``."""
    delta = (_up(do) * _up(o)).sum(-1)  # (B, H, K)
    if dlse is not None:
        delta = delta - _up(dlse)
    k, v = k.contiguous(), v.contiguous()
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)  # views
    dq_parts = []
    dk = torch.zeros(k.shape, dtype=_acc(k.dtype), device=k.device)
    dv = torch.zeros(v.shape, dtype=_acc(v.dtype), device=v.device)
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        qc, doc = q[..., rows, :] * scale, do[..., rows, :]  # (B, H, C, c)
        s = _up(qc @ kt)  # (B, H, C, J)
        p = s.sub_(lse[..., rows].unsqueeze(-1)).exp_()  # (B, H, C, J), in place
        ds = _up(doc.to(v.dtype) @ vt)  # dP: (B, H, C, J)
        ds = ds.sub_(delta[..., rows].unsqueeze(-1)).mul_(p)  # dS = P ⊙ (dP − delta), in place
        dv += _up(p.transpose(-1, -2) @ _up(doc))  # (B, H, J, c)
        ds_low = ds.to(q.dtype)
        dq_parts.append(_up(ds_low @ k) * scale)  # (B, H, C, c)
        dk += _up(ds_low.transpose(-1, -2) @ qc)  # (B, H, J, c): qc carries the scale
    return torch.cat(dq_parts, dim=-2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
        o, lse = _row_forward(q, k, v, scale, chunk)  # (B, H, K, c), (B, H, K)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        return (*_row_backward(do, dlse, q, k, v, o, lse, ctx.scale, ctx.chunk), None, None)


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, padded: bool) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU flash attention: output and fp32 row log-sum-exps (see :class:`_FlashAttentionCPU`)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    if padded:
        out[..., -1] = 0  # was Σ_j P = 1
    return out, lse


def _flash_backward(
    do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The flash kernels' gradients; ``dlse`` (padded inputs only) goes into ``do``'s extra column, in place."""
    if dlse is not None:
        do[..., -1] = dlse
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, scale=scale
    )


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
        out, lse = _flash_forward(q, k, v, scale, padded=True)
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
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        return (*_flash_backward(do, dlse, q, k, v, out, lse, ctx.scale), None)


class _MaskAttention(torch.autograd.Function):
    """RAda's three attentions and their mix ``(A_i V + A_t V + A_r V) / 3`` for training at large sizes.

    Inputs: normalised ``f`` ``(B, D)`` and ``h`` ``(K, D)`` or ``(B, K, D)``, the scale
    ``s``, the stacked ``(W_qr; W_k; W_v)`` with its bias, and the text and image
    queries ``(K or B·K, D)``, ``(B, D)``. Output ``(B, K, D)``.

    Only the heads-layout ``q_r, K, V`` and the two row-attention outputs (and
    their log-sum-exps) are kept for backward. The rational matrix ``s·R`` and
    its projection are formed ``block`` images at a time, straight into those
    buffers; backward goes through the same blocks, recomputing each block's
    ``s·R``, so that neither a ``(B, K, 3D)`` projection nor its gradient nor a
    whole batch of per-kind ``(B, H, K, c)`` gradients ever exists.
    ``attn = (scale, flat, flash, chunk, block, pad)``: the score scale, the
    released flat softmax (else the row softmax), the fused CPU kernels (else
    the chunked ones), the chunked kernels' query rows per step, images per
    block, and 1 when the heads carry the extra column of
    :class:`_FlashAttentionCPU` (flash kernels, flat softmax, gradients needed).
    """

    @staticmethod
    def forward(ctx, f, h, s, weight, bias, q_t, q_i, heads: int, attn: tuple):
        scale, flat, flash, chunk, block, pad = attn
        b, d = f.shape
        buffers = _rational_heads(f, h, s, weight, bias, heads, pad, block)  # q_r, K, V: (B, H, K, c')
        _, k_, v_ = buffers
        ctx.dtypes = q_t.dtype, q_i.dtype
        q_t = _heads(q_t.to(k_.dtype), heads, pad)  # (H, K, c') or (B, H, K, c')
        q_i = _heads(q_i.to(k_.dtype).unsqueeze(-2), heads, pad)  # (B, H, 1, c')
        outputs = []
        for q in (q_t.expand(b, *q_t.shape[-3:]), buffers[0]):  # text, then rational queries
            o, lse = _flash_forward(q, k_, v_, scale, bool(pad)) if flash else _row_forward(q, k_, v_, scale, chunk)
            outputs += [o, lse]  # (B, H, K, c'), (B, H, K)
        p_i = torch.softmax(_up(q_i @ k_.transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, K)
        mixed = p_i.to(v_.dtype) @ v_  # (B, H, 1, c'), broadcast over the K rows below
        for o, lse in zip(outputs[::2], outputs[1::2], strict=True):
            mixed = mixed + (o * _flat_weights(lse).unsqueeze(-1).to(o.dtype) if flat else o)  # (B, H, K, c')
        ctx.save_for_backward(f, h, s, weight, *buffers, q_t, q_i, *outputs)
        ctx.heads, ctx.attn, ctx.has_bias = heads, attn, bias is not None
        return rearrange(mixed[..., : d // heads] / 3, "b h k c -> b k (h c)")  # (B, K, D)

    @staticmethod
    def backward(ctx, dmixed: Tensor):
        f, h, s, weight, q_r, k_, v_, q_t, q_i, o_t, lse_t, o_r, lse_r = ctx.saved_tensors
        scale, flat, flash, chunk, block, _ = ctx.attn
        b, d = f.shape
        c = d // ctx.heads
        need = ctx.needs_input_grad
        acc = _acc(k_.dtype)
        dm = rearrange(dmixed, "b k (h c) -> b h k c", h=ctx.heads)  # (B, H, K, c), a view
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # (3D, D)
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if ctx.has_bias else None
        dq_t = torch.zeros(q_t.shape, dtype=acc, device=q_t.device)  # (H, K, c') or (B, H, K, c')
        dq_i = torch.empty((*q_i.shape[:-1], c), dtype=acc, device=q_i.device)  # (B, H, 1, c)
        df = torch.zeros(f.shape, dtype=acc, device=f.device) if need[0] else None
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need[1] else None
        ds = torch.zeros((), dtype=acc, device=s.device) if need[2] else None
        shared = q_t.dim() == 3  # one set of text queries for every image
        for start in range(0, b, block):
            rows = slice(start, start + block)
            dy = _up(dm[rows]) / 3  # (b, H, K, c): gradient of each kind's (weighted) output
            grads = []
            for q, o, lse in ((q_t if shared else q_t[rows], o_t, lse_t), (q_r[rows], o_r, lse_r)):
                q = q.expand(dy.shape[0], *q.shape[-3:])
                do, dlse = _weighted_output_grads(dy, o[rows], lse[rows], flat, pad=k_.shape[-1] - c)
                if flash:
                    grads.append(_flash_backward(do.to(q.dtype), dlse, q, k_[rows], v_[rows], o[rows], lse[rows], scale))
                else:
                    grads.append(_row_backward(do, dlse, q, k_[rows], v_[rows], o[rows], lse[rows], scale, chunk))
            (dqt_b, dk_t, dv_t), (dq_r, dk_r, dv_r) = grads
            if shared:
                dq_t += _up(dqt_b).sum(0)
            else:
                dq_t[rows] = _up(dqt_b)
            dk, dv = _up(dk_t[..., :c]) + _up(dk_r[..., :c]), _up(dv_t[..., :c]) + _up(dv_r[..., :c])
            dq_i[rows] = _image_row_backward(dy, q_i[rows], k_[rows], v_[rows], scale, dk, dv, c)
            dq_proj = torch.cat([rearrange(x, "b h k c -> b k (h c)") for x in (_up(dq_r[..., :c]), dk, dv)], dim=-1)
            _rational_backward(dq_proj, f, h, s, weight, rows, dw, db, df, dh, ds)
        dq_t = rearrange(dq_t[..., :c], "... h k c -> ... k (h c)").to(ctx.dtypes[0])
        dq_i = rearrange(dq_i[..., 0, :], "b h c -> b (h c)").to(ctx.dtypes[1])
        cast = lambda x, like: None if x is None else x.to(like.dtype)  # noqa: E731
        return cast(df, f), cast(dh, h), cast(ds, s), dw.to(weight.dtype), cast(db, weight), dq_t, dq_i, None, None


def _heads(x: Tensor, heads: int, pad: int, value: float = 0.0) -> Tensor:
    """``(..., K, D) -> (..., H, K, c + pad)``, one contiguous copy; the pad column holds ``value``."""
    x = rearrange(x, "... k (h c) -> ... h k c", h=heads)
    return F.pad(x, (0, pad), value=value) if pad else x.contiguous()


def _rational_block(f: Tensor, h: Tensor, s: Tensor, rows: slice) -> Tensor:
    """``s·f̂_b ⊙ ĥ_k`` for the images ``rows``: ``(b, K, D)``."""
    return (s * f[rows]).unsqueeze(-2) * (h if h.dim() == 2 else h[rows])


def _rational_heads(f, h, s, weight, bias, heads: int, pad: int, block: int) -> list[Tensor]:
    """``W(s·R) + bias`` split into q_r, K, V, each ``(B, H, K, c + pad)``, formed ``block`` images at a time."""
    b, k, d = f.shape[0], h.shape[-2], f.shape[1]
    buffers = None
    for start in range(0, b, block):
        rows = slice(start, start + block)
        y = F.linear(_rational_block(f, h, s, rows), weight, bias)  # (b, K, 3D), in autocast's dtype under autocast
        if buffers is None:
            buffers = [y.new_empty((b, heads, k, d // heads + pad)) for _ in range(3)]
            if pad:
                for buffer, value in zip(buffers, (0.0, 0.0, 1.0), strict=True):
                    buffer[..., -1] = value
        for buffer, part in zip(buffers, y.chunk(3, dim=-1), strict=True):
            buffer[rows, ..., : d // heads] = rearrange(part, "b k (h c) -> b h k c", h=heads)
    return buffers


def _flat_weights(lse: Tensor) -> Tensor:
    """Row ``q``'s weight ``K · exp(lse_q − L)`` of the flat softmax (``(B, H, K)``)."""
    return torch.softmax(lse, dim=-1) * lse.shape[-1]


def _weighted_output_grads(dy: Tensor, o: Tensor, lse: Tensor, flat: bool, pad: int) -> tuple[Tensor, Tensor | None]:
    """``dO`` of a row attention whose rows were weighted by :func:`_flat_weights` (row softmax: weight 1),
    padded by ``pad`` columns, and ``dlse``: ``dlse_j = w_j (a_j − Σ_q p_q a_q)`` with ``a_q = Σ_c dY ⊙ O``."""
    if not flat:
        return (F.pad(dy, (0, pad)) if pad else dy), None
    w = _flat_weights(lse)  # (b, H, K)
    do = F.pad(dy * w.unsqueeze(-1), (0, pad)) if pad else dy * w.unsqueeze(-1)  # (b, H, K, c')
    a = (dy * _up(o[..., : dy.shape[-1]])).sum(-1)  # (b, H, K): ∂loss / ∂w
    dlse = w * (a - (a * w).sum(-1, keepdim=True) / lse.shape[-1])  # (b, H, K)
    return do, dlse


def _image_row_backward(dy: Tensor, q_i: Tensor, k: Tensor, v: Tensor, scale: float, dk: Tensor, dv: Tensor, c: int) -> Tensor:
    """The image query's one row per head: adds its ``dK``, ``dV`` into ``dk``, ``dv``; returns ``dq_i``."""
    do = dy.sum(-2, keepdim=True)  # (b, H, 1, c): the row is broadcast over the K tokens
    kk, vv, qq = _up(k[..., :c]), _up(v[..., :c]), _up(q_i[..., :c])
    p = torch.softmax(_up(q_i @ k.transpose(-1, -2)) * scale, dim=-1)  # (b, H, 1, K)
    dv += p.transpose(-1, -2) @ do  # (b, H, K, c)
    dp = do @ vv.transpose(-1, -2)  # (b, H, 1, K)
    dscores = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale  # (b, H, 1, K)
    dk += dscores.transpose(-1, -2) @ qq  # (b, H, K, c)
    return dscores @ kk  # (b, H, 1, c)


def _rational_backward(dy: Tensor, f, h, s, weight, rows: slice, dw, db, df, dh, ds) -> None:
    """Adds one block's share of the projection's gradients: ``dW = Σ dY ⊗ s·R`` (``s·R`` recomputed), ``db``,
    and, where asked, ``df̂``, ``dĥ``, ``ds`` through ``dR = dY W``."""
    rational = _rational_block(f, h, s, rows)  # (b, K, D)
    flat = dy.flatten(0, -2)  # (b·K, 3D)
    dw += flat.T @ _up(rational.flatten(0, -2))
    if db is not None:
        db += flat.sum(0)
    if df is None and dh is None and ds is None:
        return
    dr = dy @ _up(weight)  # (b, K, D): gradient of s·R
    hh = _up(h if h.dim() == 2 else h[rows])
    if df is not None:
        df[rows] = s * (dr * hh).sum(-2)
    if dh is not None:
        part = s * _up(f[rows]).unsqueeze(1) * dr  # (b, K, D)
        if h.dim() == 2:
            dh += part.sum(0)
        else:
            dh[rows] = part
    if ds is not None:
        ds += (dr * _up(f[rows]).unsqueeze(1) * hh).sum()


def _use_flash(x: Tensor) -> bool:
    """Whether the fused CPU kernels serve this device and dtype (static: no tensor values read)."""
    return FLASH_CPU and x.device.type == "cpu" and x.dtype in _FLASH_DTYPES


def attention_path(batch: int, heads: int, classes: int, like: Tensor, *, needs_grad: bool) -> str:
    """The exact path RAda's text and rational attentions take (static: shapes, device, dtype, grad mode).

    - ``"plain"``: ordinary tensor ops, maps built a block of query rows at a time.
      ``torch.export`` and ONNX export trace this path (no private ops, no custom
      autograd functions), and so does every device without the fused CPU kernels
      when no gradient is needed. With gradients it builds the whole ``(B, heads, K, K)``
      maps and keeps them for backward, which it does only while they are small
      (``B·heads·K² ≤ MATERIALISE_ELEMENTS``).
    - ``"flash"``: PyTorch's fused CPU flash kernels (eager mode on CPU; a
      hand-written ``lse`` gradient when training).
    - ``"portable"``: the chunked kernel with a recomputing backward (training on other devices).
    """
    if torch.compiler.is_exporting():
        return "plain"
    if needs_grad and batch * heads * classes * classes <= MATERIALISE_ELEMENTS:
        return "plain"
    if _use_flash(like):
        return "flash"
    return "portable" if needs_grad else "plain"


def _plain_row_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    """``softmax(q kᵀ · scale) v`` and each row's log-sum-exp, ``chunk`` query rows at a time, by plain ops.

    Autograd differentiates it as written (so it keeps each block's map when gradients are on);
    ``torch.export`` and the ONNX exporter trace it.
    """
    kt = k.transpose(-1, -2)  # (B, H, c, J), a view
    rows = q.shape[-2]
    if chunk >= rows:  # one block: PyTorch's fused softmax, fewest ops (the small maps of training)
        s = _up((q * scale) @ kt)  # (B, H, K, J)
        return torch.softmax(s, dim=-1).to(v.dtype) @ v, torch.logsumexp(s, dim=-1)  # (B, H, K, c), (B, H, K)
    outs, lses = [], []
    for start in range(0, rows, chunk):
        s = _up((q[..., start : start + chunk, :] * scale) @ kt)  # (B, H, C, J)
        top = s.amax(dim=-1, keepdim=True).detach()  # (B, H, C, 1): for range only, the results do not depend on it
        p = (s - top).exp()  # (B, H, C, J)
        total = p.sum(dim=-1, keepdim=True)  # (B, H, C, 1)
        outs.append((p.to(v.dtype) @ v) / total.to(v.dtype))  # (B, H, C, c)
        lses.append((top + total.log()).squeeze(-1))  # (B, H, C)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)  # (B, H, K, c), (B, H, K)


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


def _query_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, softmax: str, chunk: int, path: str) -> Tensor:
    """``A V`` for one query kind on ``path`` (see :func:`attention_path`): ``(B, H, K, c)``.

    ``softmax="flat"`` rescales row ``q`` of the row-softmax output by
    ``K · exp(lse_q − logsumexp_q lse_q)``. On the ``"flash"`` path with the flat
    softmax, ``q, k, v`` carry the extra column of :class:`_FlashAttentionCPU`
    (the output keeps it, zero).
    """
    if path == "plain":
        o, lse = _plain_row_attention(q, k, v, scale=scale, chunk=chunk)  # (B, H, K, c), (B, H, K)
        if softmax == "row":
            return o
    elif softmax == "row":  # no log-sum-exp needed: PyTorch's own fused attention where it has one
        if path == "flash":
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return row_attention_with_lse(q, k, v, scale=scale, chunk=chunk)[0]
    elif path == "flash":
        o, lse = _FlashAttentionCPU.apply(q, k, v, scale)  # (B, H, K, c + 1), (B, H, K)
    else:
        o, lse = row_attention_with_lse(q, k, v, scale=scale, chunk=chunk)  # (B, H, K, c), (B, H, K)
    return o * _flat_weights(lse).unsqueeze(-1).to(o.dtype)  # row q times K · exp(lse_q − L)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def flat_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, softmax: str = "flat", chunk: int
) -> Tensor:
    """Attention of RAda's text or rational queries, without keeping a ``(K, K)`` map when it is large.

    Args:
        q: ``(B, H, K, c)`` queries (a broadcast view is fine).
        k, v: ``(B, H, K, c)`` keys and values.
        scale: multiplies the scores (``1 / (√c · τ)``).
        softmax: ``"flat"``: the released softmax over all ``K·K`` entries of a
            head's map, times ``K``; ``"row"``: the textbook row softmax.
        chunk: query rows per block of the chunked paths (the fused CPU
            kernels choose their own blocks).

    Returns:
        ``(B, H, K, c)``: ``A @ v`` for the chosen ``A``, by the path :func:`attention_path` picks.

    The flat softmax times ``K`` equals ``K · exp(lse_q − L) · rowsoftmax``
    with ``L = logsumexp_q lse_q``: rows are rescaled after the fact.
    """
    b, h, rows = k.shape[0], k.shape[1], q.shape[-2]
    path = attention_path(b, h, rows, k, needs_grad=_needs_grad(q, k, v))
    if path == "plain" and _needs_grad(q, k, v):
        chunk = rows  # small maps, kept whole for backward
    padded = path == "flash" and softmax == "flat" and k.dtype == q.dtype == v.dtype
    if path == "flash" and softmax == "flat" and not padded:
        path = "portable"
    if padded:  # the extra column _FlashAttentionCPU needs
        q, k, v = F.pad(q, (0, 1)), F.pad(k, (0, 1)), F.pad(v, (0, 1), value=1.0)  # (..., c + 1)
    o = _query_attention(q, k, v, scale=scale, softmax=softmax, chunk=chunk, path=path)
    return o[..., :-1] if padded else o


def _chunk_rows(batch: int, heads: int, keys: int, budget: int) -> int:
    # A symbolic batch (torch.export with a dynamic batch size) is budgeted per image.
    batch = batch if isinstance(batch, int) else 1
    return max(1, budget // max(1, batch * heads * keys))


def rada_text_queries(h: Tensor, scale: Tensor, query_text: tuple[Tensor, Tensor]) -> Tensor:
    """RAda's text queries ``W_qt(√s·ĥ_k)``: ``(K, D)``, or ``(B, K, D)`` for per-image ``h``.

    They do not depend on the image: computed once per forward pass, or once per
    class set for inference.
    """
    s = scale.to(_acc(h.dtype))
    return F.linear(s.sqrt() * h, *query_text)


def rada_attention(
    f: Tensor,
    h: Tensor,
    scale: Tensor,
    *,
    query_image: tuple[Tensor, Tensor],
    query_text: tuple[Tensor, Tensor],
    qkv_rational: tuple[Tensor, Tensor],
    heads: int,
    temperature: float,
    softmax: str = "flat",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    text_queries: Tensor | None = None,
) -> Tensor:
    """RAda's mask attention before its output map: ``(A_i V + A_t V + A_r V) / 3``, ``(B, K, D)``.

    Args:
        f: ``(B, D)`` normalised image features.
        h: ``(K, D)`` normalised class text features, or ``(B, K, D)`` when
            each image has its own (after MMA in ``"mma+rada"``).
        scale: the multiplicative logit scale ``s`` (a scalar tensor).
        query_image, query_text: ``(weight (D, D), bias (D,))`` of ``W_qi``, ``W_qt``.
        qkv_rational: the stacked ``W_qr, W_k, W_v``: ``((3D, D), (3D,))``.
        heads, temperature, softmax: as in :class:`rada_mma.RationalMask`.
        chunk_elements: size of one score block of the chunked paths; bounds their workspace.
        text_queries: :func:`rada_text_queries` of ``h``, when computed once per class set.

    The attentions take the path :func:`attention_path` picks for ``B``, ``K``, the
    device and whether gradients are needed; every path computes the same result.
    """
    b, d = f.shape
    k = h.shape[-2]
    c = d // heads
    s = scale.to(_acc(f.dtype))
    needs_grad = _needs_grad(f, h, s, text_queries, *query_image, *query_text, *qkv_rational)
    path = attention_path(b, heads, k, f, needs_grad=needs_grad)
    q_i = F.linear(s.sqrt() * f, *query_image)  # (B, D)
    q_t = rada_text_queries(h, s, query_text) if text_queries is None else text_queries  # (K, D) or (B, K, D)
    attn_scale = 1.0 / (math.sqrt(c) * temperature)
    if path != "plain":  # the fused kernels, in one memory-lean step (forward only without gradients)
        block = max(1, chunk_elements // (k * 3 * d))  # images per block of the projections
        flat, flash = softmax == "flat", path == "flash"
        pad = int(flash and flat and needs_grad)  # the extra column carries lse's gradient: forward alone needs none
        attn = (attn_scale, flat, flash, _chunk_rows(b, heads, k, chunk_elements), block, pad)
        return _MaskAttention.apply(f, h, s, *qkv_rational, q_t, q_i, heads, attn)  # (B, K, D)

    rational = (s * f).unsqueeze(-2) * h  # (B, K, D)
    q_r, keys, values = _split_projections(rational, qkv_rational, heads)  # (B, H, K, c) each, views
    q_t = rearrange(q_t, "... k (h c) -> ... h k c", h=heads)  # (H, K, c) or (B, H, K, c)
    q_t = q_t.expand(b, *q_t.shape[-3:])  # (B, H, K, c), a view: shared text queries are never copied
    q_i = rearrange(q_i, "b (h c) -> b h 1 c", h=heads)  # (B, H, 1, c)
    # with gradients the maps are kept whole (small by attention_path's rule), without they are built in blocks
    chunk = k if needs_grad else _chunk_rows(b, heads, k, chunk_elements)
    mixed = _mixed_attention(q_t, q_r, keys, values, q_i, scale=attn_scale, flat=softmax == "flat", flash=False,
                             chunk=chunk)  # (B, H, K, c)
    return rearrange(mixed, "b h k c -> b k (h c)")  # (B, K, D)


def _split_projections(rational: Tensor, qkv: tuple[Tensor, Tensor], heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``W(s·R) + b`` as the rational queries, keys and values, each ``(B, H, K, c)`` (views, no copies)."""
    y = F.linear(rational, *qkv)  # (B, K, 3D)
    return tuple(rearrange(x, "b k (h c) -> b h k c", h=heads) for x in y.chunk(3, dim=-1))


def _mixed_attention(
    q_t: Tensor, q_r: Tensor, keys: Tensor, values: Tensor, q_i: Tensor, *, scale: float, flat: bool, flash: bool,
    chunk: int,
) -> Tensor:
    """``(A_i V + A_t V + A_r V) / 3`` for a batch of images, ``(B, H, K, c)``, by plain ops (differentiable)
    or, without gradients, PyTorch's fused CPU flash kernels (which take strided views as they are)."""
    # Image queries: all K rows of the map are equal, so the flat softmax
    # times K is a plain softmax over one (1, K) row per head and image.
    scores_i = _up(q_i @ keys.transpose(-1, -2)) * scale  # (B, H, 1, K)
    mixed = torch.softmax(scores_i, dim=-1).to(values.dtype) @ values  # (B, H, 1, c)
    for q in (q_t, q_r):
        if flash:
            o, lse = _flash_forward(q, keys, values, scale, padded=False)  # (B, H, K, c), (B, H, K)
        else:
            o, lse = _plain_row_attention(q, keys, values, scale=scale, chunk=chunk)
        mixed = mixed + (o * _flat_weights(lse).unsqueeze(-1).to(o.dtype) if flat else o)  # (B, H, K, c)
    return mixed / 3


def rada_masked_logits(
    f: Tensor, h: Tensor, scale: Tensor, *, out: tuple[Tensor, Tensor], **attention: object
) -> tuple[Tensor, Tensor]:
    """RAda's logits ``(B, K)`` (fp32) and mask ``(B, K, D)``, by the cheapest exact route.

    Args:
        f, h, scale: as in :func:`rada_attention`.
        out: ``W_o`` as ``(weight, bias)``.
        **attention: :func:`rada_attention`'s keyword arguments (the projections, ``heads``, ...).

    With gradients: :func:`rada_attention` then :func:`rada_mask_and_logits`. Without
    (inference): a few images at a time, all of it in one pass (the flash kernels on CPU
    in eager mode, plain ops elsewhere and under ``torch.export``), so memory stays that
    of a block plus the mask, and the logits reuse the block's rational matrix.
    """
    s = scale.to(_acc(f.dtype))
    weights = [t for key in ("query_image", "query_text", "qkv_rational") for t in attention[key]]  # type: ignore[union-attr]
    if _needs_grad(f, h, s, attention.get("text_queries"), *weights, *out):  # type: ignore[arg-type]
        x = rada_attention(f, h, scale, **attention)  # type: ignore[arg-type]
        return rada_mask_and_logits(x, f, h, scale, out=out)
    return _masked_logits_inference(f, h, s, out=out, **attention)  # type: ignore[arg-type]


def _masked_logits_inference(
    f: Tensor,
    h: Tensor,
    s: Tensor,
    *,
    query_image: tuple[Tensor, Tensor],
    query_text: tuple[Tensor, Tensor],
    qkv_rational: tuple[Tensor, Tensor],
    out: tuple[Tensor, Tensor],
    heads: int,
    temperature: float,
    softmax: str = "flat",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    text_queries: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    b, d = f.shape
    k = h.shape[-2]
    q_t = rada_text_queries(h, s, query_text) if text_queries is None else text_queries  # (K, D) or (B, K, D)
    q_i = rearrange(F.linear(s.sqrt() * f, *query_image), "b (h c) -> b h 1 c", h=heads)  # (B, H, 1, c)
    exporting = torch.compiler.is_exporting()  # a symbolic batch: one block, plain ops
    options = dict(scale=1.0 / (math.sqrt(d // heads) * temperature), flat=softmax == "flat",
                   flash=_use_flash(f) and not exporting, chunk=_chunk_rows(b, heads, k, chunk_elements))
    block = b if exporting else max(1, chunk_elements // (k * 3 * d))  # images per block
    logits, masks = [], []
    for start in [0] if exporting else range(0, b, block):
        rows = slice(start, start + block) if not exporting else slice(None)
        rational = _rational_block(f, h, s, rows)  # (b, K, D): s·f̂ ⊙ ĥ
        # contiguous heads: the kernels run faster on them than on strided views (measured 14%)
        q_r, keys, values = (x.contiguous() for x in _split_projections(rational, qkv_rational, heads))
        texts = rearrange(q_t if q_t.dim() == 2 else q_t[rows], "... k (h c) -> ... h k c", h=heads)
        texts = texts.expand(keys.shape[0], *texts.shape[-3:])  # (b, H, K, c)
        mixed = _mixed_attention(texts, q_r, keys, values, q_i[rows], **options)  # (b, H, K, c)
        mask = F.relu(_up(F.linear(rearrange(mixed, "b h k c -> b k (h c)"), *out)) + 1)  # (b, K, D)
        logits.append((mask * _up(rational)).sum(-1))  # (b, K): s·Σ_d M f̂ ĥ
        masks.append(mask)
    return torch.cat(logits), torch.cat(masks)


def rada_mask(f: Tensor, h: Tensor, scale: Tensor, *, out: tuple[Tensor, Tensor], **attention: object) -> Tensor:
    """RAda's mask ``M = ReLU(1 + W_o(attention))`` over the rational matrix, ``(B, K, D)``.

    Args:
        f, h, scale: as in :func:`rada_attention`.
        out: ``W_o`` as ``(weight, bias)``.
        **attention: :func:`rada_attention`'s keyword arguments (the projections, ``heads``, ...).
    """
    x = rada_attention(f, h, scale, **attention)  # (B, K, D)
    return F.relu(_up(F.linear(x, *out)) + 1)  # (B, K, D)


class _MaskedLogits(torch.autograd.Function):
    """``M = ReLU(1 + W_o x + b_o)`` and the logits ``s·Σ_d M ⊙ f̂ ⊙ ĥ``, keeping only what backward needs.

    Autograd through the plain ops keeps ``M`` for the ReLU and builds two
    ``(B, K, D)`` products for the logits' gradient. This keeps where the ReLU
    passes as booleans (a quarter of the bytes; ``M`` itself only when ``f̂``,
    ``ĥ`` or ``s`` need gradients) and forms the gradient of ``W_o``'s output in
    one buffer: ``dZ = (dlogits·s·f̂ ⊙ ĥ + dM) ⊙ [M > 0]``. Under autocast the
    output map runs in autocast's dtype, and so do its gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, f: Tensor, h: Tensor, s: Tensor):
        # x: (B, K, D), f: (B, D), h: (K, D) or (B, K, D), s: ()
        z = F.linear(x, weight, bias)  # (B, K, D), in autocast's dtype under autocast
        mask = F.relu(_up(z) + 1)  # (B, K, D)
        logits = _plain_logits(mask, f, h, s)  # (B, K)
        features_grad = any(ctx.needs_input_grad[3:])
        ctx.save_for_backward(x, weight, f, h, s, mask if features_grad else mask > 0)
        ctx.linear_dtype, ctx.has_bias = z.dtype, bias is not None
        return logits, mask

    @staticmethod
    def backward(ctx, dlogits: Tensor, dmask: Tensor | None):
        x, weight, f, h, s, kept = ctx.saved_tensors
        acc = _acc(f.dtype)
        g = dlogits.to(acc) * s  # (B, K)
        dz = g.unsqueeze(-1) * _up(f).unsqueeze(1)  # (B, K, D)
        dz.mul_(_up(h))
        if dmask is not None:
            dz.add_(dmask)
        dz.mul_(kept > 0 if kept.dtype != torch.bool else kept)  # ReLU's gradient
        low = dz.to(ctx.linear_dtype)  # (B, K, D)
        rows = low.flatten(0, -2)  # (B·K, D)
        dw = (rows.T @ x.flatten(0, -2).to(low.dtype)).to(weight.dtype)  # (D, D)
        db = rows.sum(0, dtype=acc).to(weight.dtype) if ctx.has_bias else None
        dx = (low @ weight.to(low.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None  # (B, K, D)
        df = dh = ds = None
        if any(ctx.needs_input_grad[3:]):
            masked = _up(kept) * g.unsqueeze(-1)  # (B, K, D): dlogits·s·M
            if ctx.needs_input_grad[3]:
                df = (masked * _up(h)).sum(-2).to(f.dtype)  # (B, D)
            if ctx.needs_input_grad[4]:
                dh = masked * _up(f).unsqueeze(1)  # (B, K, D)
                dh = (dh.sum(0) if h.dim() == 2 else dh).to(h.dtype)
            if ctx.needs_input_grad[5]:
                ds = (dlogits.to(acc) * _plain_logits(kept, f, h, torch.ones_like(s))).sum().to(s.dtype)
        return dx, dw, db, df, dh, ds


def _plain_logits(mask: Tensor, f: Tensor, h: Tensor, scale: Tensor) -> Tensor:
    s = scale.to(_acc(f.dtype))
    return s * (_up(mask) * _up(f).unsqueeze(1) * _up(h)).sum(-1)  # (B, K)


def rada_mask_and_logits(
    x: Tensor, f: Tensor, h: Tensor, scale: Tensor, *, out: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """The mask ``M = ReLU(1 + W_o x)`` of the attention output ``x`` and RAda's logits with it.

    Args:
        x: ``(B, K, D)``, :func:`rada_attention`'s output.
        f, h, scale: as in :func:`rada_logits`.
        out: ``W_o`` as ``(weight, bias)``.

    Returns:
        ``(B, K)`` logits (fp32) and the ``(B, K, D)`` mask. With gradients, one
        fused step that keeps a boolean pattern instead of ``M`` (see
        :class:`_MaskedLogits`); without, plain ops that ``torch.export`` traces.
    """
    s = scale.to(_acc(f.dtype))
    if not _needs_grad(x, f, h, s, *out):
        mask = F.relu(_up(F.linear(x, *out)) + 1)  # (B, K, D)
        return rada_logits(mask, f, h, s), mask
    return _MaskedLogits.apply(x, *out, f, h, s)


def rada_logits(mask: Tensor, f: Tensor, h: Tensor, scale: Tensor) -> Tensor:
    """``s · Σ_d M[b,k,d] · f̂[b,d] · ĥ[k,d]`` in fp32; ``h`` is ``(K, D)`` or ``(B, K, D)``.

    Written as the released code writes it, products then one sum over ``d``:
    as accurate as the released logits (a three-operand einsum goes through a
    matmul that loses a few more ulps) and, with frozen features, autograd keeps
    no ``(B, K, D)`` tensor for it.
    """
    with _no_autocast(f):
        return _plain_logits(mask, f, h, scale)


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


def mma_class_terms(
    h: Tensor, *, down: tuple[Tensor, Tensor], in_proj: tuple[Tensor, Tensor], heads: int
) -> tuple[Tensor, Tensor]:
    """The class tokens' keys and values in MMA's attention, ``(K, H, c)`` each: once per class set.

    Args:
        h: ``(K, D)`` normalised class text features.
        down, in_proj: MMA's down-sampling map and packed input projection.
    """
    _, k_txt, v_txt = _mha_projections(F.linear(h, *down), in_proj)  # (K, n) each
    return rearrange(k_txt, "k (h c) -> k h c", h=heads), rearrange(v_txt, "k (h c) -> k h c", h=heads)


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
    class_terms: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The adapted image features and the one adapted text direction per image.

    A text token may attend only to the image token, so its attention weight
    is exactly 1 and every class of image ``b`` receives the same vector
    ``t_b = up(W_o(W_v down(f̂_b) + b_v) + b_o)``. The image token attends to
    the K text tokens: ordinary cross-attention of B queries over K shared keys.

    Args:
        f: ``(B, D)`` normalised image features; h: ``(K, D)`` normalised text.
        class_terms: :func:`mma_class_terms` of ``h``, when computed once per class set.

    Returns:
        ``f'`` ``(B, D)`` (blended, normalised) and ``t̂`` ``(B, D)`` (normalised).
    """
    n = down[0].shape[0]
    c = n // heads
    k_txt, v_txt = class_terms or mma_class_terms(h, down=down, in_proj=in_proj, heads=heads)  # (K, H, c) each
    q_img, _, v_img = _mha_projections(F.linear(f, *down), in_proj)  # (B, n) each
    q_img = rearrange(q_img, "b (h c) -> b h c", h=heads)
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


def _two_layers(x: Tensor, layers: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    return F.linear(F.linear(x, *layers[0]), *layers[1])


def mma_master_class_terms(
    h: Tensor,
    *,
    down: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    in_proj: tuple[Tensor, Tensor],
    heads: int,
) -> dict[str, Tensor]:
    """The earlier MMA's text-only part, once per class set: ``O(K²·n)``.

    Each text query's softmax over the K text keys, kept as its running maximum
    ``m`` ``(H, K)``, numerator ``num`` ``(H, K, c)`` and denominator ``den``
    ``(H, K)``, with the text queries, keys and values ``(K, H, c)``.
    """
    n = in_proj[0].shape[1]
    inv = 1.0 / math.sqrt(n // heads)
    q_txt, k_txt, v_txt = (
        rearrange(x, "k (h c) -> k h c", h=heads) for x in _mha_projections(_two_layers(h, down), in_proj)
    )  # (K, H, c) each
    # Text rows: shared text-text part, stabilised by its own row maximum.
    tt = _up(torch.einsum("qhc,jhc->hqj", q_txt, k_txt)) * inv  # (H, K, K)
    m_tt = tt.amax(dim=-1).detach()  # (H, K)
    p_tt = torch.exp(tt - m_tt.unsqueeze(-1))  # (H, K, K)
    num = torch.einsum("hqj,jhc->hqc", p_tt, _up(v_txt))  # (H, K, c)
    return dict(queries=q_txt, keys=k_txt, values=v_txt, max=m_tt, num=num, den=p_tt.sum(-1))


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
    class_terms: dict[str, Tensor] | None = None,
) -> Tensor:
    """The earlier released MMA: every token sees every token, +1 on cross-modal scores.

    Text→text scores do not depend on the image, so each text query's partial
    softmax numerator ``N`` and denominator ``Z`` over the K text keys are
    computed once per class set (:func:`mma_master_class_terms`, ``O(K²·n)``);
    each image adds only its own key (score + 1) to every text row, and its own
    row over K + 1 keys.

    Args:
        f: ``(B, D)``, h: ``(K, D)``: normalised features.
        down, up: the two linear layers of each side (``up`` has a GELU between).
        class_terms: :func:`mma_master_class_terms` of ``h``, when computed once per class set.

    Returns:
        ``(B, K)`` logits.
    """
    n = in_proj[0].shape[1]
    inv = 1.0 / math.sqrt(n // heads)
    terms = class_terms or mma_master_class_terms(h, down=down, in_proj=in_proj, heads=heads)
    q_txt, k_txt, v_txt = terms["queries"], terms["keys"], terms["values"]  # (K, H, c)
    m_tt, num, den = terms["max"], terms["num"], terms["den"]  # (H, K), (H, K, c), (H, K)
    q_img, k_img, v_img = (
        rearrange(x, "b (h c) -> b h c", h=heads) for x in _mha_projections(_two_layers(f, down), in_proj)
    )  # (B, H, c) each

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

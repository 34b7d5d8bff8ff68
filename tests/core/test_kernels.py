"""The fused kernels and modules against the literal released formulations.

Sections: property-based parity with ``tests/reference.py`` on random shapes
(every parameter randomised, so zero-initialised layers hide nothing); chunking;
custom-backward checks and float64 ``gradcheck``; the memory claims (no
``(B, H, K, K)`` map, no ``(K + 1)``-token sequence); bf16 autocast;
``torch.compile``; input validation; initialisation.

RAda's text and rational attentions have two exact paths, PyTorch's fused CPU
flash kernels (the default on CPU) and the portable chunked kernel (every other
device and dtype); the RAda tests run both.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rada_mma import kernels
from rada_mma.config import AdapterConfig
from rada_mma.modules import MMARationalMask, MultiModalAdapter, RationalMask, ResidualAdapter, build_adapter
from rada_mma.official import to_official
from tests.helpers.reference import ReleasedMMA, ReleasedRAdaAttention
from tests.helpers.tensors import (
    SCALE,
    assert_grads_close,
    attention_path,
    official_grads,
    randomize_,
    raw_features,
    reference_grads,
    released_mma,
    released_rada,
    seeded,
)

# Deterministic, quick, and nothing written to a .hypothesis folder.
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
FEW = settings(PROPERTY, max_examples=15)

# Multiples of 8 that are not powers of two (odd head widths, uneven chunks), plus 64.
DIMS = st.sampled_from([24, 40, 64, 72, 136])
TEMPERATURES = st.sampled_from([0.5, 1.0, 2.0])
SOFTMAXES = st.sampled_from(["flat", "row"])
RADA_HEADS = st.sampled_from([8, 8, 4, 2])
PATHS = st.sampled_from(["flash", "portable", "plain"])


def rada_gain(dim: int) -> float:
    """Parameter scale that keeps RAda's attention neither uniform nor one-hot at any width.

    The projections' input ``s·f̂⊙ĥ`` shrinks like ``1/D``; without this the
    scores at D = 136 are nearly constant and at D = 24 nearly one-hot.
    """
    return 1.25 * (dim / 64) ** 0.75


def objective(logits: Tensor, mask: Tensor | None = None, *, seed: int) -> Tensor:
    """A scalar whose gradient reaches every logit (and mask entry) with its own random weight."""
    g = seeded(seed)
    loss = (logits * torch.randn(logits.shape, generator=g)).sum()
    if mask is not None:
        loss = loss + (mask * torch.randn(mask.shape, generator=g)).sum()
    return loss


def assert_logits_close(got: Tensor, want: Tensor) -> None:
    # logits are s·cos ~ 100; float32 through a softmax layer drifts by ~1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-4)


def assert_mask_close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)


def inputs(image: Tensor, text: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh leaf copies of the features and the logit scale, so that their gradients are checked too."""
    scale = torch.tensor(SCALE) if scale is None else scale
    return tuple(t.detach().clone().requires_grad_() for t in (image, text, scale))


def input_grads(leaves: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    return dict(
        zip(("input.image", "input.text", "input.logit_scale"), (t.grad for t in leaves), strict=True)
    )


# ----------------------------------------------------------------------------
# Parity with the released formulations on random shapes
# ----------------------------------------------------------------------------


def check_rada_parity(module: RationalMask, batch: int, classes: int, path: str, seed: int) -> None:
    randomize_(module, seed=seed, gain=rada_gain(module.dim))
    ref = released_rada(module)
    ours = inputs(*raw_features(batch, classes, module.dim, seed=seed + 1))
    theirs = inputs(*ours)

    with attention_path(path):
        logits, mask = module(*ours, return_mask=True)
        objective(logits, mask, seed=seed + 2).backward()
    ref_logits, ref_mask = ref(*theirs)
    assert logits.shape == (batch, classes) and mask.shape == (batch, classes, module.dim)
    assert_mask_close(mask, ref_mask)
    assert_logits_close(logits, ref_logits)

    objective(ref_logits, ref_mask, seed=seed + 2).backward()
    got = {**official_grads(module), **input_grads(ours)}
    assert_grads_close(got, {**reference_grads(ref), **input_grads(theirs)}, rtol=1e-3, floor=1e-6)


@PROPERTY
@given(
    batch=st.integers(1, 5),
    classes=st.integers(1, 40),
    dim=DIMS,
    heads=RADA_HEADS,
    temperature=TEMPERATURES,
    softmax=SOFTMAXES,
    path=PATHS,
    seed=st.integers(0, 2**16),
)
@example(batch=2, classes=1, dim=64, heads=8, temperature=1.0, softmax="flat", path="flash", seed=0)
@example(batch=2, classes=1, dim=64, heads=8, temperature=1.0, softmax="flat", path="portable", seed=0)
@example(batch=1, classes=1, dim=24, heads=8, temperature=0.5, softmax="row", path="flash", seed=1)
@example(batch=1, classes=1, dim=24, heads=8, temperature=0.5, softmax="row", path="portable", seed=1)
@example(batch=2, classes=1, dim=64, heads=8, temperature=1.0, softmax="flat", path="plain", seed=0)
def test_rada_matches_released(batch, classes, dim, heads, temperature, softmax, path, seed):
    module = RationalMask(dim=dim, heads=heads, temperature=temperature, softmax=softmax)
    check_rada_parity(module, batch, classes, path, seed)


@FEW
@given(
    batch=st.integers(1, 5),
    classes=st.integers(1, 40),
    dim=DIMS,
    temperature=TEMPERATURES,
    softmax=SOFTMAXES,
    path=PATHS,
    init=st.sampled_from(["released", "blend", "small"]),
    seed=st.integers(0, 2**16),
)
@example(batch=3, classes=1, dim=40, temperature=1.0, softmax="flat", path="flash", init="released", seed=0)
@example(batch=3, classes=1, dim=40, temperature=1.0, softmax="flat", path="flash", init="blend", seed=0)
def test_rada_adapter_matches_released(batch, classes, dim, temperature, softmax, path, init, seed):
    """Each form against the authors' code: clip_adapter.py's residual adapters ("released", and "small",
    which differs from it only in W2's start), and the blend that rada.py carries and adapter_mask.py runs."""
    module = RationalMask(dim=dim, temperature=temperature, softmax=softmax, adapter_reduction=4, adapter_init=init)
    check_rada_parity(module, batch, classes, path, seed)


@st.composite
def mma_shapes(draw):
    dim = draw(DIMS)
    heads = draw(st.sampled_from([h for h in (4, 3, 2, 1) if (dim // 4) % h == 0]))
    return dim, heads


@PROPERTY
@given(
    batch=st.integers(1, 5),
    classes=st.integers(1, 40),
    shape=mma_shapes(),
    variant=st.sampled_from(["paper", "master"]),
    seed=st.integers(0, 2**16),
)
@example(batch=2, classes=1, shape=(64, 4), variant="paper", seed=0)
@example(batch=2, classes=1, shape=(64, 4), variant="master", seed=0)
def test_mma_matches_released(batch, classes, shape, variant, seed):
    dim, heads = shape
    module = randomize_(MultiModalAdapter(dim=dim, heads=heads, variant=variant), seed=seed, gain=2.0)
    ref = released_mma(module)
    ours = inputs(*raw_features(batch, classes, dim, seed=seed + 1))
    theirs = inputs(*ours)

    logits = module(*ours)
    ref_logits = ref(*theirs)
    assert_logits_close(logits, ref_logits)

    objective(logits, seed=seed + 2).backward()
    objective(ref_logits, seed=seed + 2).backward()
    got = {**official_grads(module), **input_grads(ours)}
    assert_grads_close(got, {**reference_grads(ref), **input_grads(theirs)}, rtol=1e-3, floor=1e-6)


def released_mma_features(ref: ReleasedMMA, image_features: Tensor, text_features: Tensor):
    """``ReleasedMMA.forward`` (paper variant) up to its adapted features, literally.

    Returns ``f'`` ``(B, D)`` and ``h'`` ``(B, K, D)``: the whole ``(K + 1)``-token
    sequence per image through ``nn.MultiheadAttention`` with the cross-modal mask.
    """
    f = image_features / image_features.norm(dim=-1, keepdim=True)
    h = text_features / text_features.norm(dim=-1, keepdim=True)
    b, k = f.shape[0], h.shape[0]
    seq = torch.cat([h.unsqueeze(1).expand(k, b, -1), f.unsqueeze(0)], dim=0)  # (K+1, B, D)
    allowed = torch.zeros(k + 1, k + 1, dtype=torch.bool)
    allowed[:k, k] = True
    allowed[k, :k] = True
    attn_mask = torch.zeros(k + 1, k + 1).masked_fill(~allowed, float("-inf"))
    x = ref.adapter.downsampler(seq)
    x, _ = ref.adapter.mha(x, x, x, attn_mask=attn_mask, need_weights=False)
    a = ref.adapter.upsampler(x)  # (K+1, B, D)
    a_txt, a_img = a[:k].transpose(0, 1), a[k]
    lam = ref.blend

    def norm(x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    f2 = norm(lam * norm(a_img) + (1 - lam) * f)
    h2 = norm(lam * norm(a_txt) + (1 - lam) * h.unsqueeze(0))
    return f2, h2


@FEW
@given(
    batch=st.integers(1, 4),
    classes=st.integers(1, 24),
    shape=mma_shapes(),
    heads=st.sampled_from([8, 4]),
    temperature=TEMPERATURES,
    softmax=SOFTMAXES,
    path=PATHS,
    seed=st.integers(0, 2**16),
)
@example(batch=2, classes=1, shape=(64, 4), heads=8, temperature=1.0, softmax="flat", path="flash", seed=0)
def test_mma_rada_matches_literal(batch, classes, shape, heads, temperature, softmax, path, seed):
    # No released code stacks the two: the literal version is MMA's sequence
    # attention followed by the released RAda attention on per-image texts.
    dim, mma_heads = shape
    module = MMARationalMask(
        dim=dim, heads=heads, temperature=temperature, softmax=softmax, mma_heads=mma_heads
    )
    randomize_(module.mma, seed=seed, gain=2.0)
    randomize_(module.rada, seed=seed + 1, gain=rada_gain(dim))
    mma_ref = released_mma(module.mma)
    attention = ReleasedRAdaAttention(dim, heads, temperature, softmax)
    rada_state = to_official("rada", module.rada)
    attention.load_state_dict(
        {name.removeprefix("mha."): value for name, value in rada_state.items() if name.startswith("mha.")}
    )
    ours = inputs(*raw_features(batch, classes, dim, seed=seed + 2))
    image, text, s = theirs = inputs(*ours)

    f2, h2 = released_mma_features(mma_ref, image, text)
    # the helper is the released forward: its logits are the released logits
    torch.testing.assert_close(s * torch.einsum("bd,bkd->bk", f2, h2), mma_ref(image, text, s))
    ref_mask = attention(f2, h2, s)
    ref_logits = s * (ref_mask * f2.unsqueeze(1) * h2).sum(-1)

    with attention_path(path):
        logits, mask = module(*ours, return_mask=True)
        objective(logits, mask, seed=seed + 3).backward()
    assert_mask_close(mask, ref_mask)
    assert_logits_close(logits, ref_logits)

    mma_ref.zero_grad()  # the check above ran the released forward once more
    objective(ref_logits, ref_mask, seed=seed + 3).backward()
    want = {**reference_grads(mma_ref), **input_grads(theirs)}
    want.update({f"mha.{name}": g for name, g in reference_grads(attention).items()})
    got = {**official_grads(module), **input_grads(ours)}
    assert_grads_close(got, want, rtol=1e-3, floor=1e-6)


# The portable path's blocks: B·H·K = 2·8·13 = 208 elements per query row, so 1
# gives one-row chunks and 208·5 + 7 chunks of 5, 5 and 3 rows.
@pytest.mark.parametrize("chunk_elements", [1, 208 * 5 + 7], ids=["one-row", "uneven"])
@pytest.mark.parametrize("softmax", ["flat", "row"])
@attention_path("portable")
def test_chunking_does_not_change_rada(chunk_elements, softmax):
    dim, batch, classes = 40, 2, 13
    default = randomize_(RationalMask(dim=dim, softmax=softmax), seed=3, gain=rada_gain(dim))
    chunked = RationalMask(dim=dim, softmax=softmax, chunk_elements=chunk_elements)
    chunked.load_state_dict(default.state_dict())
    image, text = raw_features(batch, classes, dim, seed=4)
    results = []
    for module in (default, chunked):
        logits, mask = module(image, text, SCALE, return_mask=True)
        objective(logits, mask, seed=5).backward()
        results.append((logits, mask, official_grads(module)))
    (logits, mask, grads), (c_logits, c_mask, c_grads) = results
    torch.testing.assert_close(c_logits, logits)
    torch.testing.assert_close(c_mask, mask)
    assert_grads_close(c_grads, grads, rtol=1e-5, floor=1e-7)


# ----------------------------------------------------------------------------
# The custom backward and float64 gradcheck
# ----------------------------------------------------------------------------


def naive_row_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, K, J)
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def naive_flat_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softmax: str) -> Tensor:
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, K, J)
    if softmax == "row":
        return scores.softmax(-1) @ v
    return F.softmax(scores.flatten(-2), dim=-1).view_as(scores) * scores.shape[-2] @ v


def qkv(*, batch=2, heads=2, keys=5, width=4, dtype=torch.float32, broadcast_q=False, seed=0):
    g = seeded(seed)
    shape = (batch, heads, keys, width)
    q = torch.randn((1, *shape[1:]) if broadcast_q else shape, generator=g, dtype=dtype)
    k, v = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("broadcast_q", [False, True], ids=["q", "broadcast-q"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_row_attention_backward_matches_autograd(chunk, broadcast_q):
    # Both outputs carry a cotangent, so the lse term of the backward is exercised.
    q, k, v = qkv(broadcast_q=broadcast_q)
    qx = q.expand(2, -1, -1, -1)
    o, lse = kernels.row_attention_with_lse(qx, k, v, scale=0.7, chunk=chunk)
    ref_o, ref_lse = naive_row_attention(qx, k, v, 0.7)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    g = seeded(1)
    do, dlse = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_o * do).sum() + (ref_lse * dlse).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("broadcast_q", [False, True], ids=["q", "broadcast-q"])
@pytest.mark.parametrize("softmax", ["flat", "row"])
@pytest.mark.parametrize("path", ["flash", "portable", "plain"])
def test_flat_attention_matches_naive(path, softmax, broadcast_q):
    # On the flash path with the flat softmax, the gradient through the row
    # log-sum-exp rides on a padding column (kernels._FlashAttentionCPU).
    q, k, v = qkv(keys=6, broadcast_q=broadcast_q)
    qx = q.expand(2, -1, -1, -1)
    with attention_path(path):
        out = kernels.flat_attention(qx, k, v, scale=0.6, softmax=softmax, chunk=4)
        cotangent = torch.randn(out.shape, generator=seeded(2))
        got = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    ref = naive_flat_attention(qx, k, v, 0.6, softmax)
    torch.testing.assert_close(out, ref)
    want = torch.autograd.grad((ref * cotangent).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")




def test_row_attention_gradcheck_float64():
    q, k, v = qkv(batch=1, keys=3, dtype=torch.float64)
    w = torch.randn(1, 2, 3, generator=seeded(3), dtype=torch.float64)

    def both_outputs(q, k, v):
        o, lse = kernels.row_attention_with_lse(q, k, v, scale=0.5, chunk=2)
        return o.sum(-1) * w + lse

    assert torch.autograd.gradcheck(both_outputs, (q, k, v))


@pytest.mark.parametrize("softmax", ["flat", "row"])
def test_flat_attention_gradcheck_float64(softmax):
    q, k, v = qkv(batch=1, keys=3, dtype=torch.float64)

    def attention(q, k, v):
        return kernels.flat_attention(q, k, v, scale=0.5, softmax=softmax, chunk=2)

    assert torch.autograd.gradcheck(attention, (q, k, v))


GRADCHECK_MODULES = {
    "rada": lambda **kw: RationalMask(dim=16, heads=4, **kw),
    "rada+adapter": lambda **kw: RationalMask(dim=16, heads=4, adapter_reduction=4, adapter_init="released", **kw),
    "rada+adapter blend": lambda **kw: RationalMask(dim=16, heads=4, adapter_reduction=4, adapter_init="blend", **kw),
    "mma": lambda **kw: MultiModalAdapter(dim=16, heads=2),
    "mma-master": lambda **kw: MultiModalAdapter(dim=16, heads=2, variant="master", hidden=8),
    "mma+rada": lambda **kw: MMARationalMask(dim=16, heads=4, mma_heads=2, **kw),
}
# RAda's attention on each path; chunk_elements=1: one image per block and one query row per step
GRADCHECK_CASES = [(m, "flash") for m in GRADCHECK_MODULES] + [
    (m, path) for m in ("rada", "rada+adapter", "mma+rada") for path in ("portable", "plain")
]


@pytest.mark.parametrize("method, path", GRADCHECK_CASES)
def test_module_gradcheck_float64(method, path):
    module = randomize_(GRADCHECK_MODULES[method](chunk_elements=1), seed=4).double()
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    image, text = (x.double().requires_grad_() for x in raw_features(2, 3, 16, seed=5))

    def logits(image, text, *params):
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (image, text, 10.0))

    # fast mode: random projections keep this to a few dozen forward calls
    with attention_path(path):
        assert torch.autograd.gradcheck(logits, (image, text, *params), fast_mode=True)


@pytest.mark.parametrize("path", ["flash", "portable", "plain"])
@pytest.mark.parametrize("per_image_text", [False, True])
def test_rada_kernels_gradcheck_float64_with_the_scale(path, per_image_text):
    # the modules take the scale in fp32; the kernels differentiate it too (here in float64)
    module = randomize_(RationalMask(dim=16, heads=4), seed=6).double()
    image, text = (kernels.normalize(x.double()) for x in raw_features(2, 3, 16, seed=7))
    text = text.expand(2, 3, 16).clone() if per_image_text else text
    inputs = (image, text, torch.tensor(10.0, dtype=torch.float64))
    pairs = [module.query_image, module.query_text, module.to_qkv_rational, module.to_out]
    weights = [t.detach().clone() for layer in pairs for t in (layer.weight, layer.bias)]
    args = tuple(t.requires_grad_() for t in (*inputs, *weights))

    def logits(f, h, s, *w):
        x = kernels.rada_attention(f, h, s, query_image=w[0:2], query_text=w[2:4], qkv_rational=w[4:6], heads=4,
                                   temperature=1.0, chunk_elements=1)
        out, mask = kernels.rada_mask_and_logits(x, f, h, s, out=w[6:8])
        return out, mask

    with attention_path(path):
        assert torch.autograd.gradcheck(logits, args, fast_mode=True)


# ----------------------------------------------------------------------------
# Memory: what the fused paths never build
# ----------------------------------------------------------------------------


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns while the mode is active, and the ops run."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), func, tuple(t.shape)
        return out

    def __str__(self) -> str:
        return f"{self.numel} elements: {self.op} -> {self.shape}"


def profile(run_forward):
    """Largest op output in forward and in backward, and the largest tensor saved for backward."""
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] = max(saved[0], t.numel())
        return t

    forward, backward = LargestOutput(), LargestOutput()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), forward:
        out = run_forward()
    with backward:
        objective(out, seed=0).backward()
    return forward, backward, saved[0]


MEMORY_B, MEMORY_K, MEMORY_D, MEMORY_H = 2, 64, 64, 8
MAPS = MEMORY_B * MEMORY_H * MEMORY_K * MEMORY_K  # one (B, H, K, K) attention map


def memory_case(softmax: str) -> tuple[RationalMask, Tensor, Tensor]:
    # portable path: 8 query rows per block, a (2, 8, 8, 64) block is MAPS / 8
    chunk_elements = MEMORY_B * MEMORY_H * MEMORY_K * 8
    module = RationalMask(dim=MEMORY_D, heads=MEMORY_H, softmax=softmax, chunk_elements=chunk_elements)
    randomize_(module, seed=6, gain=rada_gain(MEMORY_D))
    return module, *raw_features(MEMORY_B, MEMORY_K, MEMORY_D, seed=7)


@pytest.mark.parametrize("softmax", ["flat", "row"])
@pytest.mark.parametrize("path", ["flash", "portable"])
def test_rada_never_builds_a_heads_by_k_by_k_map(path, softmax):
    module, image, text = memory_case(softmax)
    with attention_path(path):
        forward, backward, saved = profile(lambda: module(image, text, SCALE))
    assert forward.numel < MAPS, f"forward built {forward}"
    assert backward.numel < MAPS, f"backward built {backward}"
    assert saved < MAPS, f"saved a {saved}-element tensor for backward"
    used_flash = any("flash_attention" in op for op in forward.ops | backward.ops)
    assert used_flash == (path == "flash" and kernels.FLASH_CPU), "the attention path switch did not take"


def test_released_rada_builds_heads_by_k_by_k_maps():
    # so that the check above can fail
    module, image, text = memory_case("flat")
    ref = released_rada(module)
    forward, backward, saved = profile(lambda: ref(image, text, torch.tensor(SCALE))[0])
    assert min(forward.numel, backward.numel, saved) >= MAPS


def test_mma_never_builds_a_sequence_per_image():
    batch, classes, dim, heads = 8, 32, 64, 4
    # what the fused paper MMA needs: per-image and per-class vectors, (B, H, K) scores
    bound = batch * dim + classes * dim + batch * heads * classes
    module = randomize_(MultiModalAdapter(dim=dim, heads=heads), seed=8, gain=2.0)
    ref = released_mma(module)
    image, text = raw_features(batch, classes, dim, seed=9)

    forward, backward, saved = profile(lambda: module(image, text, SCALE))
    assert forward.numel <= bound, f"forward built {forward}"
    assert backward.numel <= bound, f"backward built {backward}"
    assert saved <= bound, f"saved a {saved}-element tensor for backward"

    # the released (K + 1, B, D) sequence is far larger
    forward, backward, saved = profile(lambda: ref(image, text, torch.tensor(SCALE)))
    assert min(forward.numel, backward.numel, saved) >= (classes + 1) * batch * dim > bound


# ----------------------------------------------------------------------------
# Mixed precision and torch.compile
# ----------------------------------------------------------------------------

ALL_METHODS = ["rada", "rada+adapter", "mma", "mma-master", "mma+rada"]


def random_adapter(method: str, dim: int, *, seed: int):
    return randomize_(build_adapter(AdapterConfig.for_method(method, dim)), seed=seed, gain=1.25)


BF16_CASES = [(method, "flash") for method in ALL_METHODS] + [("rada", "portable"), ("mma+rada", "portable"), ("rada", "plain")]


@pytest.mark.parametrize("method, path", BF16_CASES)
def test_bf16_autocast_matches_fp32(method, path):
    module = random_adapter(method, 64, seed=10)
    image, text = raw_features(4, 20, 64, seed=11)
    with attention_path(path):
        full = module(image, text, SCALE).detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = module(image, text, SCALE)
        objective(logits, seed=12).backward()
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits in the projections; observed error ~3e-3·max|logit|
    err = (logits - full).abs().max()
    assert err <= 1e-2 * full.abs().max(), f"bf16 logits off by {err:.3g}"
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


# Dynamo alone: it traces the custom autograd.Functions' forward and backward
# (fullgraph=True makes any graph break an error); aot_eager doubles the time.
COMPILE_BACKEND = "eager"
COMPILED = {
    "rada-flash": ("flash", lambda: RationalMask(dim=16, heads=2)),
    # B·H·K = 2·2·5 elements a query row: blocks of 2, 2 and 1 rows
    "rada-portable": ("portable", lambda: RationalMask(dim=16, heads=2, chunk_elements=2 * 2 * 5 * 2)),
    "rada-plain": ("plain", lambda: RationalMask(dim=16, heads=2)),
    "mma": ("flash", lambda: MultiModalAdapter(dim=16, heads=2)),
}


@pytest.mark.parametrize("case", COMPILED)
def test_torch_compile_fullgraph_matches_eager(case):
    path, make = COMPILED[case]
    module = randomize_(make(), seed=13)
    image, text = raw_features(2, 5, 16, seed=14)
    torch._dynamo.reset()
    try:
        with attention_path(path):
            compiled = torch.compile(module, fullgraph=True, backend=COMPILE_BACKEND)
            logits = compiled(image, text, torch.tensor(SCALE))
            objective(logits, seed=15).backward()
    finally:
        torch._dynamo.reset()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    with attention_path(path):
        eager = module(image, text, torch.tensor(SCALE))
        objective(eager, seed=15).backward()
    torch.testing.assert_close(logits, eager)
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------

D, B, K = 16, 3, 5


def finite_features():
    g = seeded(16)
    return torch.randn(B, D, generator=g), torch.randn(K, D, generator=g)


def with_value(which: int, value: float):
    features = list(finite_features())
    features[which][1, 2] = value
    return tuple(features)


IMAGE_SHAPE, TEXT_SHAPE = r"image_features must be \(B, D\)", r"text_features must be \(K, D\)"
BAD_FEATURES = {
    "image-1d": (lambda: (torch.randn(D), torch.randn(K, D)), ValueError, IMAGE_SHAPE),
    "image-3d": (lambda: (torch.randn(B, 1, D), torch.randn(K, D)), ValueError, IMAGE_SHAPE),
    "text-1d": (lambda: (torch.randn(B, D), torch.randn(D)), ValueError, TEXT_SHAPE),
    "text-3d": (lambda: (torch.randn(B, D), torch.randn(2, K, D)), ValueError, TEXT_SHAPE),
    "no-classes": (lambda: (torch.randn(B, D), torch.randn(0, D)), ValueError, r"K = 0 classes"),
    "no-images": (lambda: (torch.randn(0, D), torch.randn(K, D)), ValueError, r"B = 0 images"),
    "widths-differ": (lambda: (torch.randn(B, D), torch.randn(K, 2 * D)), ValueError, r"must both equal"),
    "width-not-dim": (lambda: (torch.randn(B, 2 * D), torch.randn(K, 2 * D)), ValueError, r"dim=16"),
    "nan-image": (lambda: with_value(0, float("nan")), ValueError, r"image_features contains NaN or inf"),
    "inf-text": (lambda: with_value(1, float("inf")), ValueError, r"text_features contains NaN or inf"),
    "not-tensors": (lambda: (torch.randn(B, D).tolist(), torch.randn(K, D)), TypeError, r"must be tensors"),
    # a zero row has no direction: once NaN logits for every class (a text row) or image
    "zero-text-row": (lambda: with_row(1, 3, 0.0), ValueError, r"text_features has 1 all-zero row\(s\) \(e.g. row 3\)"),
    "zero-image-row": (lambda: with_row(0, 1, 0.0), ValueError, r"image_features has 1 all-zero row\(s\) \(e.g. row 1\)"),
    # once a raw "mat1 and mat2 must have the same dtype" from inside a kernel
    "float64": (lambda: tuple(x.double() for x in finite_features()), TypeError,
                r"features are torch.float64 but the adapter's parameters are torch.float32; pass features.to"),
    "integers": (lambda: (torch.ones(B, D, dtype=torch.long), torch.randn(K, D)), TypeError,
                 r"image_features must be a floating-point tensor, got torch.int64"),
}


def with_row(which: int, row: int, value: float):
    features = list(finite_features())
    features[which][row] = value
    return tuple(features)


@pytest.mark.parametrize("case", BAD_FEATURES)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_features_raise_clear_errors(method, case):
    module = build_adapter(AdapterConfig.for_method(method, D))
    make, error, message = BAD_FEATURES[case]
    with pytest.raises(error, match=message):
        module(*make(), SCALE)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_scalar_logit_scale_raises(method):
    module = build_adapter(AdapterConfig.for_method(method, D))
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar, got shape \(2,\)"):
        module(*finite_features(), torch.tensor([100.0, 100.0]))


@pytest.mark.parametrize("scale", [-100.0, 0.0, float("nan"), float("inf"), torch.tensor(-1.0), torch.tensor(float("nan"))])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_invalid_logit_scales_are_refused(method, scale):
    """Once: RAda all NaN (it takes √s), MMA silently negated logits (s < 0) or ±inf."""
    module = build_adapter(AdapterConfig.for_method(method, D))
    with pytest.raises(ValueError, match=r"logit_scale must be a finite number > 0 .* got"):
        module(*finite_features(), scale)


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e-25])
@pytest.mark.parametrize("method", ["rada", "mma"])
def test_huge_and_tiny_features_give_the_logits_of_unit_features(method, magnitude):
    """``x / ‖x‖`` overflowed at 1e20 (norm inf: logits of zero vectors) and underflowed at 1e-25 (NaN)."""
    module = build_adapter(AdapterConfig.for_method(method, D), generator=seeded(3))
    image, text = finite_features()
    expected = module(image, text, SCALE)
    got = module(image * magnitude, text * magnitude, SCALE)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["mma", "mma-master"])
def test_return_mask_on_mma_raises(method):
    module = build_adapter(AdapterConfig.for_method(method, D))
    with pytest.raises(ValueError, match=r"has no rational mask"):
        module(*finite_features(), SCALE, return_mask=True)


BAD_LABELS = {
    "too-large": (torch.tensor([0, 1, K]), ValueError, rf"labels must lie in \[0, {K}\)"),
    "negative": (torch.tensor([0, -1, 2]), ValueError, rf"labels must lie in \[0, {K}\)"),
    "too-few": (torch.tensor([0, 1]), ValueError, r"labels must be \(B,\) = \(3,\)"),
    "column": (torch.tensor([[0], [1], [2]]), ValueError, r"labels must be \(B,\) = \(3,\)"),
    "float": (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"labels must be an integer tensor"),
    "list": ([0, 1, 2], TypeError, r"labels must be an integer tensor"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_bad_labels_raise_clear_errors(case):
    module = RationalMask(dim=D, alpha=0.5)
    logits, mask = module(*finite_features(), SCALE, return_mask=True)
    labels, error, message = BAD_LABELS[case]
    with pytest.raises(error, match=message):
        module.loss(logits, labels, mask)


NOT_A_DIVISOR = r"must be a positive divisor of"
BAD_CONFIGS = {
    "heads-not-dividing": (dict(method="rada", heads=5), ValueError, rf"heads=5 {NOT_A_DIVISOR}"),
    "mma-heads-not-dividing": (dict(method="mma", mma_heads=3), ValueError, rf"mma_heads=3 {NOT_A_DIVISOR}"),
    "unknown-method": (dict(method="lora"), ValueError, r"unknown method 'lora'; choose one of rada"),
    "unknown-option": (dict(method="rada", head=4), TypeError, r"unknown adapter option\(s\) \['head'\]"),
    "bad-softmax": (dict(method="rada", softmax="column"), ValueError, r"softmax must be one of"),
    "bad-regularizer": (dict(method="rada", regularizer="l2"), ValueError, r"regularizer must be one of"),
    "bad-temperature": (dict(method="rada", temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
    "bad-blend": (dict(method="mma", blend=1.5), ValueError, r"blend \(λ\) must lie in \[0, 1\]"),
    # non-finite and mistyped options (once accepted: NaN logits, or a raw comparison error)
    "nan-temperature": (dict(method="rada", temperature=float("nan")), ValueError, r"temperature must be a finite"),
    "inf-alpha": (dict(method="rada", alpha=float("inf")), ValueError, r"alpha must be a finite number, got inf"),
    "nan-alpha": (dict(method="mma+rada", alpha=float("nan")), ValueError, r"alpha must be a finite number, got nan"),
    "nan-blend": (dict(method="mma", blend=float("nan")), ValueError, r"blend must be a finite number, got nan"),
    "inf-blend": (dict(method="mma", blend=float("-inf")), ValueError, r"blend must be a finite number, got -inf"),
    "bool-heads": (dict(method="rada", heads=True), TypeError, r"heads must be an integer, got True \(bool\)"),
    "float-heads": (dict(method="rada", heads=8.0), TypeError, r"heads must be an integer, got 8.0"),
    "word-temperature": (dict(method="rada", temperature="abc"), TypeError, r"temperature must be a number, got 'abc'"),
    "list-softmax": (dict(method="rada", softmax=["flat"]), TypeError, r"softmax must be a string"),
    "zero-hidden": (dict(method="mma-master", hidden=0), ValueError, r"hidden must be a positive int up to 65536"),
    "huge-bottleneck": (dict(method="mma", bottleneck=1 << 40), ValueError, r"bottleneck must be > 0 .* at most"),
}


@pytest.mark.parametrize("dim", [0, -4, 1 << 17, 1 << 40])
def test_widths_are_bounded(dim):
    with pytest.raises(ValueError, match=r"dim must be a positive int up to 65536"):
        AdapterConfig.for_method("rada", dim)


def test_numbers_are_stored_as_plain_python_numbers():
    import numpy as np

    config = AdapterConfig.for_method("mma", 64, blend=1, mma_heads=np.int64(2))
    assert config.blend == 1.0 and type(config.blend) is float and type(config.mma_heads) is int


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_raises_clear_errors(case):
    options, error, message = BAD_CONFIGS[case]
    with pytest.raises(error, match=message):
        AdapterConfig.for_method(dim=64, **options)


def test_bad_module_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"heads=3 must be a positive divisor"):
        RationalMask(dim=64, heads=3)
    with pytest.raises(ValueError, match=r"softmax must be one of"):
        RationalMask(dim=64, softmax="rows")
    with pytest.raises(ValueError, match=r"variant must be 'paper' or 'master'"):
        MultiModalAdapter(dim=64, variant="v2")
    with pytest.raises(ValueError, match=r"unknown regularizer 'l2'"):
        kernels.regularizer(torch.ones(1, 2, 3), "l2")


# ----------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"adapter_reduction": 4, "adapter_init": "released"}],
                         ids=["rada", "rada+adapter released"])
def test_fresh_rada_is_zero_shot_clip(options):
    # to_out starts at zero (and the released adapters' up maps), so M ≡ 1 exactly
    module = RationalMask(dim=64, **options, generator=seeded(0))
    image, text = raw_features(3, 7, 64, seed=1)
    logits, mask = module(image, text, SCALE, return_mask=True)
    assert torch.equal(mask, torch.ones_like(mask))
    f, h = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(logits, SCALE * f @ h.T, rtol=1e-6, atol=1e-5)


def test_fresh_mma_rada_is_mma():
    module = MMARationalMask(dim=64, generator=seeded(0))
    image, text = raw_features(3, 7, 64, seed=1)
    logits, mask = module(image, text, SCALE, return_mask=True)
    assert torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(logits, module.mma(image, text, SCALE), rtol=1e-6, atol=1e-5)


def test_residual_adapter_starts_as_identity():
    adapter = ResidualAdapter(dim=64, generator=seeded(0))
    x = torch.randn(5, 64, generator=seeded(1))
    assert torch.equal(adapter(x), x)
    assert adapter.down.weight.abs().sum() > 0  # only the up map is zero


def test_adapter_forms_start_where_the_authors_code_starts():
    x = torch.randn(5, 64, generator=seeded(1))
    bound = 1 / 16**0.5  # nn.Linear's for the up map's 16 inputs
    small = ResidualAdapter(dim=64, init="small", generator=seeded(0))
    assert 0 < small.up.weight.abs().max() <= 1e-2 * bound and small.ratio is None
    assert not torch.equal(small(x), x) and torch.allclose(small(x), x, atol=1e-2)  # a hair from the identity
    blend = ResidualAdapter(dim=64, init="blend", ratio=0.2, generator=seeded(0))
    assert blend.ratio.shape == () and blend.ratio.item() == pytest.approx(0.2)
    assert blend.up.weight.abs().max() > 0.5 * bound  # nn.Linear's default, as adapter_mask.py leaves it
    a = F.relu(F.relu(x @ blend.down.weight.T) @ blend.up.weight.T)
    torch.testing.assert_close(blend(x), 0.2 * a + 0.8 * x)
    module = RationalMask(dim=64, adapter_reduction=4, adapter_init="blend")
    assert (module.image_adapter.ratio.item(), module.text_adapter.ratio.item()) == pytest.approx((0.2, 0.0))
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        RationalMask(dim=64, adapter_reduction=4, adapter_init="zero")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_generator_seed_fixes_parameters(method):
    config = AdapterConfig.for_method(method, 64)
    first, again, other = (build_adapter(config, generator=seeded(s)) for s in (0, 0, 1))
    for (name, a), b, c in zip(
        first.state_dict().items(), again.state_dict().values(), other.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs for the same seed"
        if a.abs().sum() > 0 and a.dim() > 0:  # zero-initialised tensors and fixed blend ratios agree across seeds
            assert not torch.equal(a, c), f"{name} ignores the generator"


# ----------------------------------------------------------------------------
# Inference: the blocked pass without gradients equals the training path
# ----------------------------------------------------------------------------

INFERENCE_MODULES = {
    "rada": lambda: RationalMask(dim=64, chunk_elements=3 * 20 * 3 * 64),  # blocks of 3 images
    "rada+adapter": lambda: RationalMask(dim=64, adapter_reduction=4, softmax="row", chunk_elements=1),
    "mma+rada": lambda: MMARationalMask(dim=64, mma_heads=2, chunk_elements=2 * 20 * 3 * 64),
}


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "plain"])
@pytest.mark.parametrize("method", INFERENCE_MODULES)
def test_inference_pass_matches_the_training_path(method, flash):
    module = randomize_(INFERENCE_MODULES[method](), seed=16, gain=rada_gain(64))
    image, text = raw_features(7, 20, 64, seed=17)
    with attention_path("plain"):
        logits, mask = module(image, text, SCALE, return_mask=True)  # with gradients: whole maps, autograd
    saved = kernels.FLASH_CPU
    kernels.FLASH_CPU = saved and flash
    try:
        with torch.no_grad():
            got, got_mask = module(image, text, SCALE, return_mask=True)
    finally:
        kernels.FLASH_CPU = saved
    assert_logits_close(got, logits.detach())
    assert_mask_close(got_mask, mask.detach())

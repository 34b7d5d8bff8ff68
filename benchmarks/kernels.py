"""Fused kernels against the released formulation: time and peak memory of one training step.

One training step is forward + cross-entropy + backward of the adapter alone,
on cached features (the frozen encoders are not part of it). Two
implementations run on the same inputs and the same weights:

- ``released``: ``tests/reference.py``, a literal transcription of the authors'
  formulation (RAda's three ``(B, 8, K, K)`` maps, MMA's ``(K + 1)``-token
  sequence per image), the same reference the tests use;
- ``fused``: ``rada_mma``'s modules and kernels.

Usage, from the repository root::

    python benchmarks/kernels.py --device cpu --quick --json benchmarks/results/kernels_cpu_quick.json  # K = 10, 32, 1000
    python benchmarks/kernels.py --device cpu --json benchmarks/results/kernels_cpu.json       # all sizes
    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels_cuda.json     # + bf16 autocast
    python benchmarks/kernels.py --classes 4 --batch 2 --dim 32 --repeats 1 --json /tmp/k.json  # smoke test

``--quick`` runs K = 10, 32 and 1000 at the CPU targets' batch sizes (RAda 8,
MMA 256) only, timing a slow step once. Sizes: K in 10, 32, 100, 320, 1000; B in 8, 32
(RAda) and 32, 256 (MMA); D = 512; fp32, plus bf16 autocast on CUDA.

Timing: after a tiny step that lets thread pools and BLAS set themselves up,
one warm-up step, then timed steps (at least ``--min-repeats``, more while
they fit ``--budget`` seconds, at most ``--repeats``); the median is
``ms_median``. A step slower than ``--slow`` seconds is warm already and counts.
``cpu_ms_median`` (all threads' CPU time) and the load average show how much
other work on the machine skewed the wall times; ``--threads`` sets torch's
thread count in every point process (default: torch's).

Memory: each point runs in fresh processes (``--point``). On CPU a memory
process runs one step and reports its resident-set growth over the RSS after
imports, inputs and weights (the high-water mark reset through
``/proc/self/clear_refs``), twice per implementation: once with glibc's mmap
threshold fixed at 1 MiB (``peak_mb``), so that every large block is returned
on free and RSS tracks live memory, and once with malloc's defaults
(``peak_mb_default_malloc``), which keep freed blocks of up to 32 MB resident
for reuse, so that RSS also counts heap fragmentation: what a user's process sees.
On CUDA the peak is ``max_memory_allocated`` over each implementation's
first step minus what was allocated before it. A point that runs out of
memory is recorded with ``oom: true``.

Errors are against the released formulation in fp32 with the same inputs and
weights: ``max_abs_err_logits`` and ``max_rel_err_grads`` (``‖g − g_ref‖ /
‖g_ref‖``, the largest over parameters). Where the released form ran out of
memory at full batch, its reference outputs come from micro-batches (images
are independent and the loss is a batch mean, so this is the same gradient).
fp32 is not exact, so where a float64 run of the released form fits
``--fp64-budget``, both implementations' errors against it are recorded too
(``*_fp64``).

The same run times a large fp32 matmul (``machine_matmul_gflops``: the best of
the run's start, its end and every size's timing process) so that the fused kernels' FLOP rate
(:func:`fused_flops`, counted analytically) reads as a fraction of what the
machine can do. JSON, a markdown table and a plot of time and memory against
K are written next to ``--json`` (same stem).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the repository root, for the imports below

from benchmarks.common import REPO, environment, load_average, write_results  # noqa: E402
from rada_mma import kernels  # noqa: E402
from rada_mma.modules import MultiModalAdapter, RationalMask  # noqa: E402
from rada_mma.official import to_official  # noqa: E402
from tests.helpers.reference import ReleasedMMA, ReleasedRAda  # noqa: E402  (the released formulation)

METHODS = ("rada", "mma", "rada+adapter")
IMPLS = ("released", "fused")
CLASSES = (10, 32, 100, 320, 1000)
BATCHES = {"rada": (8, 32), "rada+adapter": (8, 32), "mma": (32, 256)}
QUICK_BATCHES = {"rada": (8,), "rada+adapter": (8,), "mma": (256,)}  # the CPU targets
QUICK_CLASSES = (10, 32, 1000)  # where the small-K path and the memory-lean path are chosen
LOGIT_SCALE = 100.0
REQUIRED_KEYS = (
    "method",
    "impl",
    "batch",
    "classes",
    "dim",
    "device",
    "dtype",
    "ms_median",
    "peak_mb",
    "max_abs_err_logits",
    "max_rel_err_grads",
    "oom",
)


# ----------------------------------------------------------------------------
# FLOP counts
# ----------------------------------------------------------------------------


def _linear_flops(rows: int, d_in: int, d_out: int, input_grad: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``rows`` vectors through a ``d_in → d_out`` matrix.

    Backward is the weight gradient, plus the input gradient where the input
    needs one (frozen features do not).
    """
    forward = 2 * rows * d_in * d_out
    return forward, forward * (2 if input_grad else 1)


def fused_flops(method: str, batch: int, classes: int, dim: int, heads: int = 8) -> dict[str, int]:
    """Multiply-add FLOPs (2 per multiply-add) of one fused training step, counted analytically.

    The count is that of the exact fused form in ``docs/methods.md``, matmuls only
    (elementwise work, softmaxes and normalisations are a few FLOPs per element
    of ``O(B·K·D)`` tensors and are left out):

    RAda, with ``B`` images, ``K`` classes, width ``D``:

    - projections: rational query, key, value ``3 · 2BKD²``; image query
      ``2BD²``; text query ``2KD²``; output ``2BKD²``;
    - text and rational attention (two query kinds, each ``K × K`` per head
      and image): scores ``2BK²D`` and values ``2BK²D`` per kind, ``8BK²D``;
    - image attention (one row per head and image): ``4BKD``;
    - logits ``Σ_d M f̂ ĥ``: ``2BKD``;
    - ``rada+adapter``: two residual adapters ``D → D/4 → D`` on ``B + K`` vectors.

    Backward: each attention matmul costs twice its forward (``dQ, dK`` from
    the scores, ``dP, dV`` from the values); each projection costs its weight
    gradient plus, where its input needs a gradient, the input gradient. The
    blocks recomputed in backward (flash-style) are not counted: they are work
    the fused form chooses to redo, not work the step needs.

    MMA (bottleneck ``n = D/4``): down-projection of ``B + K`` vectors, packed
    in-projection ``n → 3n`` of both, cross-attention of ``B`` queries over
    ``K`` keys (``4BKn``), output and up projections of the two per-image
    vectors, and two ``(B, K)`` logit matmuls (``4BKD``).

    Returns:
        ``{"forward": ..., "backward": ..., "total": ...}``.
    """
    b, k, d = batch, classes, dim
    fwd = bwd = 0

    def add(pair: tuple[int, int]) -> None:
        nonlocal fwd, bwd
        fwd, bwd = fwd + pair[0], bwd + pair[1]

    if method in ("rada", "rada+adapter"):
        adapted = method == "rada+adapter"  # features carry gradients into the adapters
        if adapted:
            r = d // 4
            add(_linear_flops(b + k, d, r, input_grad=False))
            add(_linear_flops(b + k, r, d, input_grad=True))
        add(_linear_flops(b * k, d, 3 * d, input_grad=adapted))  # rational query, key, value
        add(_linear_flops(b, d, d, input_grad=adapted))  # image query
        add(_linear_flops(k, d, d, input_grad=adapted))  # text query
        attention = 2 * (2 * b * k * k * d + 2 * b * k * k * d)  # text + rational kinds
        attention += 2 * b * k * d + 2 * b * k * d  # image query: one row per head
        add((attention, 2 * attention))
        add(_linear_flops(b * k, d, d, input_grad=True))  # output projection
        add((2 * b * k * d, 2 * 2 * b * k * d))  # logits
    elif method == "mma":
        n = d // 4
        add(_linear_flops(b + k, d, n, input_grad=False))  # down
        add(_linear_flops(b + k, n, 3 * n, input_grad=True))  # packed in-projection
        attention = 2 * b * k * n + 2 * b * k * n
        add((attention, 2 * attention))
        add(_linear_flops(2 * b, n, n, input_grad=True))  # output projection
        add(_linear_flops(2 * b, n, d, input_grad=True))  # up
        add((2 * 2 * b * k * d, 2 * 2 * 2 * b * k * d))  # cos(t, h), cos(f', h)
    else:
        raise ValueError(f"no FLOP count for method {method!r}")
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 7) -> float:
    """Median fp32 throughput of a ``size³`` matmul: the machine's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------
# One point, in its own process
# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Memory:
    """Peak memory growth over a block: CUDA allocator peak, or resident-set peak on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.hwm_reset = _reset_peak_rss()
            self.base = _proc_status("VmRSS")
            if not self.hwm_reset or self.base is None:
                import resource

                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status("VmHWM") if self.hwm_reset else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self.base) / 2**20


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter uniform in ``±1/√fan_in``, zero-initialised ones included.

    RAda's output map and the adapters' up maps start at zero, which would make
    the mask exactly 1 and the comparison empty; random weights exercise every path.
    """
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))


def build(method: str, dim: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The fused module and the released one, with identical random weights (CPU, fp32)."""
    generator = torch.Generator().manual_seed(seed)
    if method == "mma":
        fused = MultiModalAdapter(dim=dim)
        released = ReleasedMMA(dim)
    elif method in ("rada", "rada+adapter"):
        adapters = method == "rada+adapter"
        fused = RationalMask(dim=dim, adapter_reduction=4 if adapters else None)
        released = ReleasedRAda(dim, adapters=adapters)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    _randomise(fused, generator)
    released.load_state_dict(to_official(method, fused), strict=True)
    return fused, released


def inputs(batch: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw features with a shared offset, so that cosines are positive as CLIP's are (~0.2), and labels."""
    generator = torch.Generator().manual_seed(seed + 1)
    offset = torch.randn(dim, generator=generator)
    image = 3 * (torch.randn(batch, dim, generator=generator) + offset)
    text = 2 * (torch.randn(classes, dim, generator=generator) + offset)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return image, text, labels


def _logits(model: torch.nn.Module, image, text, scale) -> torch.Tensor:
    out = model(image, text, scale)
    return out[0] if isinstance(out, tuple) else out  # the released RAda also returns its mask


def _official_grads(method: str, fused: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fused module's gradients under the released parameter names."""
    holder = copy.deepcopy(fused)  # deepcopy leaves .grad behind: copy the gradients in as values
    params = dict(fused.named_parameters())
    with torch.no_grad():
        for name, p in holder.named_parameters():
            grad = params[name].grad
            p.copy_(grad if grad is not None else torch.zeros_like(p))
    return {k: v.float().cpu() for k, v in to_official(method, holder).items()}


def released_outputs(
    method: str, released: torch.nn.Module, image, text, labels, scale, micro_batch: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients of the released form in fp32, ``micro_batch`` images at a time.

    Images never interact and the loss is a batch mean, so weighting each
    micro-batch's mean loss by its share of the batch gives the full-batch gradient.
    """
    released.zero_grad(set_to_none=True)
    logits = []
    for start in range(0, image.shape[0], micro_batch):
        part = slice(start, start + micro_batch)
        out = _logits(released, image[part], text, scale)
        share = out.shape[0] / image.shape[0]
        (F.cross_entropy(out, labels[part]) * share).backward()
        logits.append(out.detach().float().cpu())
    grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).float().cpu()
        for k, p in released.named_parameters()
    }
    return torch.cat(logits), grads


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),) if t is not None)
    if oom_types and isinstance(error, oom_types):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def _errors(logits, grads, ref_logits, ref_grads) -> tuple[float, float]:
    """Max |Δ logits| and the largest ``‖g − g_ref‖ / ‖g_ref‖`` over parameters."""
    err_logits = float((logits.double() - ref_logits.double()).abs().max())
    err_grads = max(
        float((grads[n].double() - g.double()).norm() / g.double().norm().clamp_min(1e-30))
        for n, g in ref_grads.items()
    )
    return err_logits, err_grads


# A float64 released step costs about this many fp32 ones (double-precision matmuls).
FP64_COST = 2.5


def _setup(spec: dict):
    """Both modules (identical weights) on the device, the autocast context and the logit scale."""
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    fused, released = build(spec["method"], spec["dim"], spec["seed"])
    models = {"released": released.to(device), "fused": fused.to(device)}
    bf16 = spec["dtype"] == "bf16-autocast"

    def autocast():
        return (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )

    return device, models, autocast, torch.tensor(LOGIT_SCALE, device=device)


def _make_step(model: torch.nn.Module, autocast, scale: torch.Tensor, outputs: dict):
    def step(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            logits = _logits(model, image, text, scale)
        F.cross_entropy(logits.float(), labels).backward()
        outputs["logits"] = logits.detach()

    return step


def _oom_record(record: dict, error: BaseException) -> dict:
    if not _is_oom(error):
        raise error
    return {**record, "oom": True, "error": f"{type(error).__name__}: {str(error)[:200]}"}


def _tiny_step(step, spec: dict, device: torch.device) -> None:
    """One step at B = 1, K = 2, through the attention path the real size takes.

    The fused kernels choose their path by size (``kernels.attention_path``): a tiny step
    would take the plain path and leave the flash kernels' first-use set-up inside the
    measurement, which the released form's tiny step does not.
    """
    real = kernels.attention_path(spec["batch"], 8, spec["classes"], torch.empty(0, device=device), needs_grad=True)
    saved = kernels.MATERIALISE_ELEMENTS
    kernels.MATERIALISE_ELEMENTS = saved if real == "plain" else 0
    try:
        step(*(x.to(device) for x in inputs(1, 2, spec["dim"], spec["seed"])))
    finally:
        kernels.MATERIALISE_ELEMENTS = saved


def memory_point(spec: dict) -> dict:
    """Peak memory of one training step of ``spec["impl"]``, in this (fresh) process."""
    device, models, autocast, scale = _setup(spec)
    model = models.pop(spec["impl"])
    models.clear()
    step = _make_step(model, autocast, scale, {})
    # A tiny step first: thread pools and BLAS set themselves up outside the measurement.
    _tiny_step(step, spec, device)
    data = tuple(x.to(device) for x in inputs(spec["batch"], spec["classes"], spec["dim"], spec["seed"]))
    record = _base_record(spec)
    memory = _Memory(device)
    try:
        memory.start()
        step(*data)
        _sync(device)
    except Exception as error:  # noqa: BLE001 - an OOM becomes a record; anything else is re-raised
        return _oom_record(record, error)
    record["peak_mb"] = round(memory.peak_mb(), 2)
    return record


def timing_point(spec: dict) -> list[dict]:
    """Time ``spec["impls"]`` at one size in this process, their steps interleaved; their records.

    Interleaving gives both implementations the same share of whatever else
    runs on the machine. Each implementation's first step (fused first, so
    that its memory is measured on a fresh heap) gives the default-allocator
    memory peak (on CUDA, ``peak_mb``) and warms it up; then one more warm-up
    step unless that first step was slow, and then timed steps in turn.
    Finally the errors against the released form, fp32 and float64.
    """
    device, models, autocast, scale = _setup(spec)
    method, k = spec["method"], spec["classes"]
    # The machine's matmul throughput now, beside the steps: the run's peak is the best of these.
    here = round(matmul_gflops(device, spec["matmul_size"]), 1)
    impls = [impl for impl in ("fused", "released") if impl in spec["impls"]]
    outputs = {impl: {} for impl in impls}
    steps = {impl: _make_step(models[impl], autocast, scale, outputs[impl]) for impl in impls}
    for impl in impls:
        _tiny_step(steps[impl], spec, device)
    data = tuple(x.to(device) for x in inputs(spec["batch"], k, spec["dim"], spec["seed"]))
    records = {impl: _base_record({**spec, "impl": impl}) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu_times: dict[str, list[float]] = {impl: [] for impl in impls}

    def timed_step(impl: str) -> float:
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        steps[impl](*data)
        _sync(device)
        cpu_times[impl].append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    def done(impl: str) -> bool:
        t = times[impl]
        return len(t) >= spec["repeats"] or (len(t) >= spec["repeats_min"] and sum(t) >= spec["budget_s"])

    memory = _Memory(device)
    for impl in list(impls):
        try:
            memory.start()
            first = timed_step(impl)
            peak = round(memory.peak_mb(), 2)
            if device.type == "cuda":
                records[impl]["peak_mb"] = peak
            if first >= spec["slow_s"]:  # after the tiny step, a slow first step is warm: it counts
                times[impl].append(first)
            else:
                for _ in range(spec["warmup"]):
                    timed_step(impl)
        except Exception as error:  # noqa: BLE001 - an OOM becomes a record; anything else is re-raised
            records[impl] = _oom_record(records[impl], error)
            impls.remove(impl)
    active = [impl for impl in impls if not done(impl)]
    while active:
        for impl in list(active):
            times[impl].append(timed_step(impl))
            if done(impl):
                active.remove(impl)
    load = round(os.getloadavg()[0], 2)  # 1-minute load: other work skews timings
    for impl in impls:
        records[impl].update(
            ms_median=round(1e3 * statistics.median(times[impl]), 3),
            ms_all=[round(1e3 * t, 3) for t in times[impl]],
            # CPU time of all threads over the same steps: steadier than wall time on a shared machine
            cpu_ms_median=round(1e3 * statistics.median(cpu_times[impl][-len(times[impl]) :]), 3),
            load_average=load,
            matmul_gflops_here=here,
        )

    # Errors against the released form in fp32 (the released steps' own outputs when
    # they ran in fp32, else rebuilt in micro-batches) and, where affordable, in
    # float64: fp32 itself is not exact, and the float64 errors say which side is off.
    got = {}
    for impl in impls:
        model = models[impl]
        grads = (
            _official_grads(method, model)
            if impl == "fused"
            else {n: p.grad.float().cpu() for n, p in model.named_parameters()}
        )
        got[impl] = (outputs[impl]["logits"].float().cpu(), grads)
    released = models["released"]
    if "released" in impls and spec["dtype"] == "fp32":
        ref = got["released"]
    else:
        micro = max(1, int(spec["ref_bytes"] // (20 * 8 * k * k * 4)))  # ~20 (8, K, K) maps per image
        ref = released_outputs(method, released, *data, scale, micro)
        for record in records.values():
            record["reference_micro_batch"] = micro
    released_ms = records.get("released", {}).get("ms_median") or float("inf")
    exact = None
    if spec["dtype"] == "fp32" and released_ms * FP64_COST < 1e3 * spec["fp64_budget_s"]:
        micro = max(1, int(spec["ref_bytes"] // (20 * 8 * k * k * 8)))
        data64 = tuple(x.double() if x.is_floating_point() else x for x in data)
        default = torch.get_default_dtype()
        torch.set_default_dtype(
            torch.float64
        )  # the released MMA builds its attention mask in the default dtype
        try:
            exact = released_outputs(method, copy.deepcopy(released).double(), *data64, scale.double(), micro)
        finally:
            torch.set_default_dtype(default)
    for impl in impls:
        record = records[impl]
        record["max_abs_err_logits"], record["max_rel_err_grads"] = _errors(*got[impl], *ref)
        if exact is not None:
            record["max_abs_err_logits_fp64"], record["max_rel_err_grads_fp64"] = _errors(*got[impl], *exact)
    return [records[impl] for impl in spec["impls"] if impl in records]


# ----------------------------------------------------------------------------
# The run: points, machine throughput, outputs
# ----------------------------------------------------------------------------


def _limit_memory(limit_bytes: int | None) -> None:
    """Cap this process's address space so that the released form fails with an error, not the OOM killer."""
    if not limit_bytes:
        return
    try:
        import resource

        size = _proc_status("VmSize") or 0
        resource.setrlimit(resource.RLIMIT_AS, (size + limit_bytes, size + limit_bytes))
    except (ImportError, ValueError, OSError):
        pass


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# glibc's malloc keeps freed blocks under its (adaptive, up to 32 MB) mmap threshold
# resident for reuse, so a process's RSS overstates what its tensors need by
# however fragmented its heap got. A fixed 1 MiB threshold maps every large block
# on its own and returns it on free: the RSS of the memory process then tracks
# live memory, like CUDA's max_memory_allocated. Timing runs with the default.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _subprocess(spec: dict, timeout: float, env: dict | None = None):
    """Run ``--point spec`` in a fresh process: its JSON result, or None if it died of memory."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"point {spec} timed out after {timeout:.0f} s") from error
    lines = [line for line in done.stdout.splitlines() if line.startswith(("{", "["))]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    killed = done.returncode in (-9, 137)  # the kernel's OOM killer
    if killed or any(word in done.stderr[-500:] for word in ("MemoryError", "out of memory", "can't allocate")):
        return None
    raise RuntimeError(f"point {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def measure(spec: dict, timeout: float) -> list[dict]:
    """Records of every implementation at one size.

    CPU: one memory process per implementation (one step, fixed mmap
    threshold), then one timing process for those that fit. CUDA: the timing
    process alone (the allocator's peak is exact there).
    """
    impls = spec["impls"]
    peaks = {}
    if spec["device"] == "cpu":
        for impl in impls:
            record = _subprocess({**spec, "impl": impl, "mode": "memory"}, timeout, env=MEMORY_ENV)
            peaks[impl] = record or {**_base_record({**spec, "impl": impl}), "oom": True, "error": "killed"}
            if record:  # the same step with malloc's defaults: what a user's process holds
                default = _subprocess({**spec, "impl": impl, "mode": "memory"}, timeout)
                peaks[impl]["peak_mb_default_malloc"] = default["peak_mb"] if default else None
    fits = [impl for impl in impls if not peaks.get(impl, {}).get("oom")]
    timed = _subprocess({**spec, "impls": fits, "mode": "time"}, timeout) if fits else []
    if timed is None and "released" in fits:  # the timing process died of the released form: time the rest
        peaks["released"] = {**_base_record({**spec, "impl": "released"}), "oom": True, "error": "killed"}
        fits = [impl for impl in fits if impl != "released"]
        timed = _subprocess({**spec, "impls": fits, "mode": "time"}, timeout) if fits else []
    if timed is None:
        raise RuntimeError(f"point {spec} ran out of memory with {fits}")
    by_impl = {record["impl"]: record for record in timed}
    records = []
    for impl in impls:
        record = by_impl.get(impl) or peaks[impl]
        if impl in peaks and not record.get("oom"):
            record["peak_mb"] = peaks[impl]["peak_mb"]
            record["peak_mb_default_malloc"] = peaks[impl].get("peak_mb_default_malloc")
        records.append(record)
    return records


def _base_record(spec: dict) -> dict:
    record = {key: spec.get(key) for key in ("method", "impl", "batch", "classes", "dim", "device", "dtype")}
    record.update(
        ms_median=None, ms_all=[], peak_mb=None, max_abs_err_logits=None, max_rel_err_grads=None, oom=False
    )
    return record


def plan(args: argparse.Namespace) -> list[dict]:
    """Every size of the run, each with the implementations to compare there."""
    dtypes = ["fp32"] + (["bf16-autocast"] if args.device == "cuda" and not args.fp32_only else [])
    methods = args.methods.split(",")
    impls = args.impls.split(",")
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {','.join(METHODS)}")
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown implementation {impl!r}; choose from {','.join(IMPLS)}")
    classes = args.classes or (QUICK_CLASSES if args.quick else CLASSES)
    sizes = []
    for method in methods:
        for batch in args.batch or (QUICK_BATCHES[method] if args.quick else BATCHES[method]):
            for k in classes:
                for dtype in dtypes:
                    sizes.append(
                        dict(
                            method=method,
                            impls=impls,
                            batch=batch,
                            classes=k,
                            dim=args.dim,
                            device=args.device,
                            dtype=dtype,
                        )
                    )
    return sizes


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def summarise(records: list[dict]) -> list[dict]:
    """One row per (method, batch, classes, dtype): released and fused side by side."""
    rows = {}
    for r in records:
        key = (r["method"], r["batch"], r["classes"], r["dtype"])
        rows.setdefault(key, {})[r["impl"]] = r
    out = []
    for (method, batch, classes, dtype), pair in rows.items():
        rel, fus = pair.get("released", {}), pair.get("fused", {})
        out.append(
            dict(
                method=method,
                batch=batch,
                classes=classes,
                dtype=dtype,
                released_ms=rel.get("ms_median"),
                fused_ms=fus.get("ms_median"),
                released_mb=rel.get("peak_mb"),
                fused_mb=fus.get("peak_mb"),
                released_oom=rel.get("oom", False),
                speedup=_ratio(rel.get("ms_median"), fus.get("ms_median")),
                cpu_speedup=_ratio(rel.get("cpu_ms_median"), fus.get("cpu_ms_median")),
                load=max(
                    (x for x in (rel.get("load_average"), fus.get("load_average")) if x is not None),
                    default=None,
                ),
                memory_ratio=_ratio(rel.get("peak_mb"), fus.get("peak_mb")),
                released_mb_default=rel.get("peak_mb_default_malloc"),
                fused_mb_default=fus.get("peak_mb_default_malloc"),
                memory_ratio_default=_ratio(rel.get("peak_mb_default_malloc"), fus.get("peak_mb_default_malloc")),
                err_logits=fus.get("max_abs_err_logits"),
                err_grads=fus.get("max_rel_err_grads"),
                released_err64=rel.get("max_rel_err_grads_fp64"),
                fused_err64=fus.get("max_rel_err_grads_fp64"),
                achieved_gflops=fus.get("achieved_gflops"),
                fraction_of_matmul=fus.get("fraction_of_matmul"),
            )
        )
    return out


def _fmt(x, spec: str = ".1f") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else ""
    return format(x, spec)


def _with_default(value, default, spec: str, unit: str = "") -> str:
    """``"12.0 (15.0)"``: a figure and, where measured, its malloc-defaults twin."""
    text = _fmt(value, spec) + (unit if value is not None else "")
    return text if default is None else f"{text} ({_fmt(default, spec)}{unit})"


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# Fused kernels vs the released formulation ({meta['device']})",
        "",
        f"One training step (forward + cross-entropy + backward), D = {records[0]['dim'] if records else '?'}, "
        f"median of timed steps. Machine: {meta['machine']}; torch {meta['torch']}, "
        f"{meta['threads']} threads; large fp32 matmul: **{meta['machine_matmul_gflops']:.0f} GFLOP/s**. "
        "Peak memory (MB): CUDA, `max_memory_allocated` over a step minus what inputs and weights "
        "held; CPU, the resident-set growth of a fresh process over one step, with glibc's mmap "
        "threshold fixed at 1 MiB so that freed blocks leave the resident set as they leave CUDA's "
        "allocated count, and in parentheses with malloc's defaults (freed blocks of up to 32 MB stay "
        "resident: what a user's process holds, fragmentation included; "
"measured the same way in its own process). Errors: fused vs released, "
        "max |Δ logits| and the largest relative gradient error over parameters; where affordable, "
        "both implementations' gradient errors against the released form run in float64 "
        "(fp32 is not exact: the released form's own fp32 gradients are the less accurate ones). "
        "Fused GFLOP/s counts the exact fused form's matmul FLOPs (`fused_flops`, backward "
        "included, recomputation not counted). CPU-time speed-up: the same ratio in CPU time of all "
        "threads; load: the machine's 1-minute load average when the points ran (the machine has "
        f"{os.cpu_count()} CPUs; a load above that means other work shared them and skewed the wall times).",
        "",
        "| method | B | K | dtype | released ms | fused ms | speed-up | CPU-time speed-up | load | released MB | "
        "fused MB | memory ratio | err logits | err grads | grads vs fp64: released / fused | fused GFLOP/s | "
        "of matmul |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summarise(records):
        rel_ms = "OOM" if r["released_oom"] else _fmt(r["released_ms"])
        rel_mb = "OOM" if r["released_oom"] else _with_default(r["released_mb"], r["released_mb_default"], ".1f")
        fus_mb = _with_default(r["fused_mb"], r["fused_mb_default"], ".1f")
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['classes']} | {r['dtype']} | {rel_ms} | {_fmt(r['fused_ms'])} | "
            f"{_fmt(r['speedup'], '.1f')}× | {_fmt(r['cpu_speedup'], '.1f')}× | {_fmt(r['load'], '.1f')} | "
            f"{rel_mb} | {fus_mb} | "
            f"{_with_default(r['memory_ratio'], r['memory_ratio_default'], '.1f', '×')} | "
            f"{_fmt(r['err_logits'], '.1e')} | {_fmt(r['err_grads'], '.1e')} | "
            f"{_fmt(r['released_err64'], '.1e')} / {_fmt(r['fused_err64'], '.1e')} | "
            f"{_fmt(r['achieved_gflops'], '.1f')} | {_fmt(r['fraction_of_matmul'] and 100 * r['fraction_of_matmul'], '.0f')}% |"
        )
    return "\n".join(lines).replace("–×", "–").replace("–%", "–") + "\n"


def plot(records: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    groups = sorted(
        {(r["method"], r["batch"], r["dtype"]) for r in records},
        key=lambda g: (METHODS.index(g[0]), g[1], g[2]),
    )
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3 * len(groups)), squeeze=False)
    for row, (method, batch, dtype) in enumerate(groups):
        for col, (key, label) in enumerate((("ms_median", "ms per step"), ("peak_mb", "peak MB"))):
            ax = axes[row][col]
            for impl, style in (("released", "o--"), ("fused", "s-")):
                pts = sorted(
                    (r["classes"], r[key])
                    for r in records
                    if (r["method"], r["batch"], r["dtype"], r["impl"]) == (method, batch, dtype, impl)
                    and r[key]
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=impl)
                ooms = [
                    r["classes"]
                    for r in records
                    if r.get("oom")
                    and r["impl"] == impl
                    and (r["method"], r["batch"], r["dtype"]) == (method, batch, dtype)
                ]
                for k in ooms:
                    ax.axvline(k, color="red", alpha=0.3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("K (classes)")
            ax.set_ylabel(label)
            ax.set_title(f"{method}, B = {batch}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only K = 1000 at the CPU targets' batch sizes (RAda 8, MMA 256), one timed step where a step is slow",
    )
    parser.add_argument("--json", type=Path, help="write the records here (and .md, .png with the same stem)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--classes", type=int, nargs="+", help="override K (default: 10 32 100 320 1000)")
    parser.add_argument("--batch", type=int, nargs="+", help="override B (default per method)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="most timed steps per point")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed steps per point")
    parser.add_argument("--warmup", type=int, default=1, help="extra warm-up steps after the first")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps per point")
    parser.add_argument(
        "--slow", type=float, default=2.0, help="a first step slower than this is the only warm-up"
    )
    parser.add_argument(
        "--fp64-budget",
        type=float,
        default=30.0,
        help="seconds a float64 released reference may take per size",
    )
    parser.add_argument("--fp32-only", action="store_true", help="skip bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-limit-gb", type=float, help="address-space cap per point (CPU; default 3/4 of available)"
    )
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="side of the square matmul timed for peak FLOP/s"
    )
    parser.add_argument("--point-timeout", type=float, default=900.0)
    parser.add_argument("--threads", type=int, help="torch threads in every point process (default: torch's)")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print its record
    args = parser.parse_args(argv)

    if args.point:
        spec = json.loads(args.point)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if spec["device"] == "cpu":
            _limit_memory(spec.get("memory_limit"))
        print(json.dumps(memory_point(spec) if spec["mode"] == "memory" else timing_point(spec)))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    repeats_min = 1 if args.quick else min(args.min_repeats, args.repeats)
    available = _available_bytes()
    memory_limit = (
        int(args.memory_limit_gb * 2**30)
        if args.memory_limit_gb
        else (int(0.75 * available) if available else None)
    )
    points = plan(args)
    print(f"{len(points)} sizes on {args.device}", file=sys.stderr)
    load_before = load_average()
    peak_before = matmul_gflops(device, args.matmul_size)
    records = []
    for spec in points:
        spec.update(
            seed=args.seed,
            warmup=args.warmup,
            repeats=args.repeats,
            repeats_min=repeats_min,
            budget_s=args.budget,
            fp64_budget_s=args.fp64_budget,
            slow_s=args.slow,
            matmul_size=args.matmul_size,
            memory_limit=memory_limit,
            threads=args.threads,
            ref_bytes=4 * 2**30,
        )
        started = time.perf_counter()
        for record in measure(spec, args.point_timeout):
            records.append(record)
            print(
                f"{record['method']:>13} {record['impl']:>8} B={record['batch']:<4} K={record['classes']:<5} "
                f"{record['dtype']:<13} ms={_fmt(record['ms_median'])} MB={_fmt(record['peak_mb'])} "
                f"err={_fmt(record['max_abs_err_logits'], '.1e')}/{_fmt(record['max_rel_err_grads'], '.1e')}"
                f"{' OOM' if record.get('oom') else ''} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
    peak_after = matmul_gflops(device, args.matmul_size)
    load_after = load_average()
    peak = max(
        [peak_before, peak_after] + [r["matmul_gflops_here"] for r in records if r.get("matmul_gflops_here")]
    )
    meta = dict(environment(device), machine_matmul_gflops=peak)
    for r in records:
        r.update(
            machine_matmul_gflops=round(peak, 1),
            matmul_gflops_start=round(peak_before, 1),
            matmul_gflops_end=round(peak_after, 1),
            machine=meta["machine"],
            torch=meta["torch"],
            threads=meta["threads"],
            run_load_average=[load_before, load_after],
        )
        if r["impl"] == "fused" and r.get("ms_median") and r["method"] in ("rada", "rada+adapter", "mma"):
            flops = fused_flops(r["method"], r["batch"], r["classes"], r["dim"])
            r["flops"] = flops["total"]
            achieved = flops["total"] / (r["ms_median"] / 1e3) / 1e9
            r["achieved_gflops"] = float(f"{achieved:.4g}")
            r["fraction_of_matmul"] = float(f"{achieved / peak:.4g}")

    text = markdown(records, meta)
    print(text)
    if args.json:
        write_results(args.json, records, text)
        plot(
            records,
            args.json.with_suffix(".png"),
            f"rada_mma fused vs released, {meta['device']}, D = {args.dim}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

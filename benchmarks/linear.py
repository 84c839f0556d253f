"""Benchmark FP8-weight Linear implementations against the bf16 ``F.linear`` baseline.

Shapes: Llama-3-8B's Linears (``K x N`` = in x out: 4096x4096 q/o, 4096x14336 gate/up,
14336x4096 down) and SmolLM2-135M's (576x1536 gate/up, 1536x576 down) at ``M`` = 1 (decode),
16, 256, 2048 tokens. Each candidate computes bf16 ``y[M, N]`` from bf16 ``x[M, K]`` and a
``float8_e4m3fn`` weight ``[N, K]`` with per-tensor scales (``x ≈ q * s``); the ``bf16``
baseline multiplies the original bf16 weight. CPU candidates:

- ``reference``: ``fp8fx.ops.linear_reference``, the definition (FP8 casts, float32 GEMM); it
  was the op's eager kernel before the fast one;
- ``fp8fx_op``: ``torch.ops.fp8fx.linear``, its eager kernel now (``fp8fx.ops.linear_fast``:
  integer-op weight conversion in cache-sized blocks, no FP8 casts);
- ``scaled_mm``: static activation quantization + ``torch._scaled_mm`` (per-tensor scales);
- ``deq_native+qdq``: ``F.linear(qdq(x), w.to(bf16) * s_w)``, the native FP8 cast;
- ``deq_bits_finite``: E4M3 -> bf16 by the shortest bit trick (below) into reused int16
  buffers, no NaN fix-up (weight checked once) and a bf16 GEMM: the fastest eager formula,
  but a float32 subnormal multiply (wrong under flushed denormals) and a bf16 rounding of the
  scaled weight (not the op's numerics); shown as a bound;
- ``lowering_before``: ``torch.compile`` (Inductor, ``dynamic=False``) of the previous
  lowering's formula (``previous_lowering``): ``M == 1`` a reduction that casts the FP8 bytes
  and re-quantizes ``x`` per output row, else a bf16 GEMM of FP8-cast operands;
- ``inductor_op``: ``torch.compile`` of ``torch.ops.fp8fx.linear`` with
  ``fp8fx.backends.inductor`` registered, the lowering as it is now.

E4M3 -> bf16 by bits (``deq_bits_finite``): code ``s.eeee.mmm`` becomes the bf16 pattern
``s.0000eeee.mmm0000`` (sign-extend to int16, shift left 4, mask ``0x87F0``), which reads as
the E4M3 value times ``2**-120`` (subnormal codes as bf16 subnormals), so one multiply by
``scale * 2**120`` restores the value and applies the scale.

A row reports per candidate the median time per call (candidates timed round-robin, see
"timing"), the ratio to ``bf16``, the error against ``reference`` (max abs difference over max
abs of its output), the stored weight's bytes, the bytes of the weight-sized temporaries a
call materializes (``None`` where hidden), Inductor's first-call time (``compile_s``) and the
share of CPU time other processes took meanwhile (``other_cpu_share``; rows are re-run while it
exceeds ``--max-contention``). The summary checks the fp8fx conversions bit for bit over all
256 codes of both formats.

CUDA (only when ``torch.cuda.is_available()``; nothing touches CUDA otherwise): ``bf16``,
``bf16_compiled``, ``reference``, ``deq_native+qdq``, ``inductor_op`` (the op compiled with
fp8fx's lowering), ``scaled_mm`` with e4m3 operands and the weight passed as ``w.t()``, the
column-major ``[K, N]`` view ``_scaled_mm`` requires (``raw_scaled_mm``: the same call on the
pre-quantized activation), and torchao's float8 configs (per-tensor and per-row dynamic
activation, weight-only) when torchao imports; CUDA events. ``--shapes llama70b`` adds
Llama-3-70B's shapes (not in ``all``: meant for a GPU).

Output: one JSON object per row (``"kind": "row"``), a summary object, then markdown tables.
Nothing is asserted: benchmarks measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8fx import ops  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SHAPES: dict[str, tuple[int, int]] = {  # name -> (K, N)
    "4096x4096": (4096, 4096),
    "4096x14336": (4096, 14336),
    "14336x4096": (14336, 4096),
    "576x1536": (576, 1536),
    "1536x576": (1536, 576),
    # Llama-3-70B (hidden 8192, intermediate 28672): q/o, gate/up, down; meant for a GPU
    "8192x8192": (8192, 8192),
    "8192x28672": (8192, 28672),
    "28672x8192": (28672, 8192),
}
DEFAULT_SHAPES = ("4096x4096", "4096x14336", "14336x4096", "576x1536", "1536x576")  # "all"
LLAMA_SHAPES = ("4096x4096", "4096x14336", "14336x4096")
LLAMA70B_SHAPES = ("8192x8192", "8192x28672", "28672x8192")
SMALL_SHAPES = ("4096x4096",)
DEFAULT_M = (1, 16, 256, 2048)
_BF16_MASK = -30736  # 0x87F0 as int16: sign bit, 4 exponent bits at 10..7, 3 mantissa at 6..4
_TWO_POW_120 = 2.0 ** 120
_CPU_BF16 = ops._cpu_has_bf16()


# ---------------------------------------------------------------- numerics (pure functions)

def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor E4M3 weight quantization: ``(q, scale)`` with ``w ≈ q * scale``."""
    scale = (w.float().abs().amax() / FP8_MAX).clamp_min(1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def qdq_activation(x: Tensor, scale: Tensor) -> Tensor:
    """Quantize ``x`` to E4M3 at a static scale and dequantize back to bf16."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.bfloat16) * scale


def e4m3_to_bf16_bits(w: Tensor, scale: Tensor | float, out: Tensor) -> Tensor:
    """``w.to(bf16) * scale`` by int16 ops into ``out`` (module docstring); NaN codes are not
    handled and E4M3 subnormals need unflushed denormals."""
    out.copy_(w.view(torch.int8))  # sign-extend s.eeee.mmm to 16 bits
    out.bitwise_left_shift_(4).bitwise_and_(_BF16_MASK)
    return out.view(torch.bfloat16).mul_(scale * _TWO_POW_120)


def previous_lowering(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                      bias: Optional[Tensor], fp8_max: float) -> Tensor:
    """The CPU lowering of ``fp8fx::linear`` before the integer-op conversion (same math)."""
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    qx = (x2d.float() / input_scale).clamp(-fp8_max, fp8_max).to(weight.dtype)
    if _is_one(x2d.shape[0]):
        acc = (qx.float() * weight.float()).sum(dim=-1).unsqueeze(0)
    elif x.dtype == torch.bfloat16 and _CPU_BF16:
        acc = torch.mm(qx.float().to(torch.bfloat16), weight.float().to(torch.bfloat16).t())
    else:
        acc = torch.mm(qx.float(), weight.float().t())
    y = acc.float() * (input_scale * weight_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _is_one(size: object) -> bool:
    from fp8fx.backends.inductor import _is_one as is_one  # no guard on a symbolic size

    return is_one(size)


def check_conversions() -> dict[str, bool]:
    """The fp8fx weight conversions (eager kernel, Inductor lowering) against the FP8 cast,
    bit for bit over all 256 codes of both formats."""
    from fp8fx.backends import inductor

    out: dict[str, bool] = {}
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = torch.arange(256, dtype=torch.uint8).view(fmt)
        ref = codes.to(torch.float32)
        for name, conv in (("op", ops.fp8_to_float32), ("lowering", inductor._fp8_to_float32)):
            got = conv(codes)
            same = (got.view(torch.int32) == ref.view(torch.int32)) | (got.isnan() & ref.isnan())
            out[f"{name}_{str(fmt).replace('torch.float8_', '')}_bit_exact_256"] = bool(same.all())
    return out


# ---------------------------------------------------------------- candidates

@dataclass
class Case:
    """Inputs of one (shape, M) row; built once, shared by every candidate."""
    M: int
    K: int
    N: int
    device: str
    x: Tensor
    w_bf16: Tensor
    w_fp8: Tensor
    w_scale: Tensor
    x_scale: Tensor
    notes: dict[str, Any] = field(default_factory=dict)  # copied into the row


def make_case(K: int, N: int, M: int, device: str, seed: int = 0) -> Case:
    # CUDA: drawn on the GPU (a 28672x8192 weight takes seconds on the CPU); CPU unchanged
    gen_device = "cuda" if device == "cuda" else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(seed)
    w = (torch.randn(N, K, generator=g, device=gen_device) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g, device=gen_device).to(torch.bfloat16)
    w_fp8, w_scale = quantize_weight(w)
    x_scale = (x.float().abs().amax() / FP8_MAX).clamp_min(1e-12)
    return Case(M, K, N, device, x.to(device), w.to(device), w_fp8.to(device),
                w_scale.to(device), x_scale.to(device))


def _reference(c: Case) -> Callable[[], Tensor]:
    return lambda: ops.linear_reference(c.x, c.w_fp8, c.w_scale, c.x_scale, None, FP8_MAX)


def _fp8fx_op(c: Case) -> Callable[[], Tensor]:
    op = torch.ops.fp8fx.linear
    return lambda: op(c.x, c.w_fp8, c.w_scale, c.x_scale, None, FP8_MAX)


def _quantize_x(c: Case) -> Tensor:
    return (c.x.float() / c.x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _scaled_mm(c: Case) -> Callable[[], Tensor]:
    # CPU accepts either layout of mat2, any M/K/N, fp32 scales (0-d or rowwise) and
    # e4m3/e5m2 operands; mat1/mat2 must be 2-D and out_dtype defaults to mat1's FP8 dtype.
    return lambda: torch._scaled_mm(_quantize_x(c), c.w_fp8.t(), scale_a=c.x_scale,
                                    scale_b=c.w_scale, out_dtype=torch.bfloat16)


def _deq_native_qdq(c: Case) -> Callable[[], Tensor]:
    return lambda: F.linear(qdq_activation(c.x, c.x_scale),
                            c.w_fp8.to(torch.bfloat16) * c.w_scale)


def _deq_bits_finite(c: Case) -> Callable[[], Tensor]:
    if bool((c.w_fp8.view(torch.uint8) & 0x7F).eq(0x7F).any()):
        raise ValueError("weight holds NaN codes; deq_bits_finite needs a NaN-free weight")
    out = torch.empty(c.w_fp8.shape, dtype=torch.int16, device=c.device)
    return lambda: F.linear(c.x, e4m3_to_bf16_bits(c.w_fp8, c.w_scale, out))


def _op_call(x: Tensor, w: Tensor, w_scale: Tensor, x_scale: Tensor, bias: Optional[Tensor],
             fp8_max: float) -> Tensor:
    return torch.ops.fp8fx.linear(x, w, w_scale, x_scale, bias, fp8_max)


def _compiled(fn: Callable[..., Tensor]) -> Callable[[Case], Callable[[], Tensor]]:
    def build(c: Case) -> Callable[[], Tensor]:
        from fp8fx.backends import inductor

        inductor.register_lowering()
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        return lambda: compiled(c.x, c.w_fp8, c.w_scale, c.x_scale, None, FP8_MAX)
    return build


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[Case], Callable[[], Tensor]]
    fp8_weight: bool = True
    temp_bytes_per_elem: Optional[int] = None  # largest weight-sized temporary, bytes/element
    compiled: bool = False
    max_m: Optional[int] = None


def _fp32(c: Case) -> Callable[[], Tensor]:
    x32, w32 = c.x.float(), c.w_bf16.float()  # the baseline of CPUs without bf16 instructions
    return lambda: F.linear(x32, w32)


def _compiled_fp32_x(c: Case) -> Callable[[], Tensor]:
    """The op compiled for float32 activations: an FP8 model made from a float32 one."""
    from fp8fx.backends import inductor

    inductor.register_lowering()
    compiled = torch.compile(_op_call, dynamic=False, fullgraph=True)
    x32 = c.x.float()
    return lambda: compiled(x32, c.w_fp8, c.w_scale, c.x_scale, None, FP8_MAX)


def _gemv(c: Case) -> Callable[[], Tensor]:
    """``fp8fx.kernels.gemv.gemv_fp8`` alone on the quantized activation (un-scaled, float32
    output): the decode path's product, without quantization and epilogue."""
    from fp8fx.kernels import gemv

    qx = _quantize_x(c).float()
    return lambda: gemv.gemv_fp8(qx, c.w_fp8)


CPU_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("bf16", lambda c: (lambda: F.linear(c.x, c.w_bf16)), False, 0),
    Candidate("fp32", _fp32, False, 0),
    Candidate("reference", _reference, temp_bytes_per_elem=4),
    Candidate("fp8fx_op", _fp8fx_op, temp_bytes_per_elem=0),
    Candidate("scaled_mm", _scaled_mm),
    Candidate("deq_native+qdq", _deq_native_qdq, temp_bytes_per_elem=2),
    Candidate("deq_bits_finite", _deq_bits_finite, temp_bytes_per_elem=2),
    Candidate("lowering_before", _compiled(previous_lowering), temp_bytes_per_elem=None,
              compiled=True),
    Candidate("inductor_op", _compiled(_op_call), temp_bytes_per_elem=None,
              compiled=True),
    Candidate("inductor_op_fp32x", _compiled_fp32_x, temp_bytes_per_elem=None, compiled=True),
    Candidate("gemv", _gemv, temp_bytes_per_elem=0, max_m=64),
)
BASELINES = ("bf16", "fp32")  # high precision: every ratio is also taken to the faster one


# ---------------------------------------------------------------- timing
#
# Candidates of one row are timed round-robin (one call of each, then the next round), so a
# machine whose load changes during the run slows every candidate of a row alike and the
# ratios to bf16 stay meaningful. A row stops after ``--repeats`` rounds, or after at least 3
# rounds once ``--budget`` seconds per candidate have passed.

class CpuSampler:
    """Time of one call, in ms: wall clock, or (``clock="thread"``, one thread only) the CPU
    time of the calling thread, which a shared machine's other processes do not inflate by
    descheduling it (they still share its caches and memory bandwidth)."""

    def __init__(self, clock: str = "wall") -> None:
        self.now = time.thread_time if clock == "thread" else time.perf_counter

    def calibrate(self, fn: Callable[[], Any]) -> int:
        return 1

    def sample(self, fn: Callable[[], Any], inner: int) -> float:
        t0 = self.now()
        fn()
        return (self.now() - t0) * 1e3


class CudaSampler:
    """CUDA-event time per call, in ms, over ``inner`` back-to-back calls (~1 ms a sample)."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def calibrate(self, fn: Callable[[], Any]) -> int:
        return max(1, min(100, int(1.0 / max(self.sample(fn, 1), 1e-3))))

    def sample(self, fn: Callable[[], Any], inner: int) -> float:
        torch.cuda.synchronize()
        self.start.record()
        for _ in range(inner):
            fn()
        self.end.record()
        torch.cuda.synchronize()
        return self.start.elapsed_time(self.end) / inner


def _rel_err(y: Tensor, ref: Optional[Tensor]) -> Optional[float]:
    if ref is None:
        return None
    ref32 = ref.float()
    return float((y.float() - ref32).abs().amax() / ref32.abs().amax().clamp_min(1e-30))


def run_row(cands: tuple[Candidate, ...], shape: str, M: int, args: argparse.Namespace,
            sampler: CpuSampler | CudaSampler, device: str) -> list[dict]:
    K, N = SHAPES[shape]
    c = make_case(K, N, M, device)
    torch._dynamo.reset()  # fresh compiled graphs per row: no recompile-limit fallbacks
    rows: list[dict] = []
    live: list[tuple[dict, Callable[[], Tensor], int]] = []  # (row, fn, inner calls/sample)
    ref_out: Optional[Tensor] = None
    order = sorted(cands, key=lambda cd: cd.name != "reference")  # its output is the yardstick
    for cand in order:
        if cand.name not in args.candidates_set or (cand.max_m is not None and M > cand.max_m):
            continue
        row: dict[str, Any] = {"kind": "row", "device": device, "shape": shape, "K": K, "N": N,
                               "M": M, "candidate": cand.name,
                               "weight_bytes": K * N * (1 if cand.fp8_weight else 2),
                               "temp_bytes": (None if cand.temp_bytes_per_elem is None
                                              else K * N * cand.temp_bytes_per_elem)}
        try:
            fn = cand.build(c)
            t0 = time.perf_counter()
            y = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if cand.compiled:
                row["compile_s"] = round(time.perf_counter() - t0, 3)
            if cand.name == "reference":
                ref_out = y
            row["rel_err_vs_reference"] = _rel_err(y, ref_out)
            for _ in range(args.warmup):
                fn()
            live.append((row, fn, sampler.calibrate(fn)))
        except Exception as exc:  # a candidate that cannot run is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row.update(c.notes)
        c.notes.clear()
        rows.append(row)
    times: dict[int, list[float]] = {id(r): [] for r, _, _ in live}
    start = time.perf_counter()
    for rnd in range(args.repeats):
        for row, fn, inner in live:
            try:
                times[id(row)].append(sampler.sample(fn, inner))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        live = [e for e in live if "error" not in e[0]]
        if rnd >= 2 and time.perf_counter() - start > args.budget * max(len(live), 1):
            break
    for row in rows:
        ts = times.get(id(row))
        if "error" not in row and ts:
            q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0], 0, ts[0])
            row.update(median_ms=round(statistics.median(ts), 4), q1_ms=round(q1, 4),
                       q3_ms=round(q3, 4), repeats=len(ts))
    rank = {cd.name: i for i, cd in enumerate(cands)}
    rows.sort(key=lambda r: rank[r["candidate"]])
    base = next((r.get("median_ms") for r in rows if r["candidate"] == "bf16"), None)
    hp = [r for r in rows if r["candidate"] in BASELINES and r.get("median_ms") is not None]
    best = min(hp, key=lambda r: r["median_ms"]) if hp else None
    for r in rows:
        if base and r.get("median_ms") is not None:
            r["vs_bf16"] = round(r["median_ms"] / base, 3)
        if best and r.get("median_ms") is not None:
            r["vs_best_hp"] = round(r["median_ms"] / best["median_ms"], 3)
            r["best_hp"] = best["candidate"]
    return rows


def other_cpu_s() -> float:
    busy, own = cpu_seconds()
    return busy - own


def wait_for_quiet(max_wait_s: float, share: float) -> None:
    """Return once other processes use at most ``share`` of the CPUs for 2 s, or on timeout."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        o0 = other_cpu_s()
        time.sleep(2.0)
        if (other_cpu_s() - o0) / (2.0 * (os.cpu_count() or 1)) <= share:
            return


def run_row_checked(cands: tuple[Candidate, ...], shape: str, M: int,
                    args: argparse.Namespace, sampler: CpuSampler | CudaSampler,
                    device: str) -> list[dict]:
    """``run_row``, repeated (up to ``--retries`` times) while other processes took more
    than ``--max-contention`` of the machine's CPU time; the share is kept in each row."""
    for attempt in range(args.retries + 1):
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait, args.max_contention)
        o0, t0 = other_cpu_s(), time.perf_counter()
        rows = run_row(cands, shape, M, args, sampler, device)
        share = (other_cpu_s() - o0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
        if share <= args.max_contention:
            break
    for r in rows:
        r.update(other_cpu_share=round(share, 3), attempts=attempt + 1)
    return rows


# ---------------------------------------------------------------- CUDA (only when available)

def _cuda_scaled_mm(quantize: bool) -> Callable[[Case], Callable[[], Tensor]]:
    def build(c: Case) -> Callable[[], Tensor]:
        # mat1 row-major [M, K]; mat2 column-major [K, N] (the .t() of the row-major [N, K]
        # weight); K and N multiples of 16; fp32 scales. Some builds also want M % 16 == 0:
        # a failing M is retried zero-padded to a multiple of 16, and the row says so.
        w_t = c.w_fp8.t()

        def call(q: Tensor) -> Tensor:
            return torch._scaled_mm(q, w_t, scale_a=c.x_scale, scale_b=c.w_scale,
                                    out_dtype=torch.bfloat16)
        try:
            call(_quantize_x(c))
            zeros = None
        except RuntimeError:
            if c.M % 16 == 0:
                raise
            zeros = torch.zeros(-c.M % 16, c.K, device=c.device).to(FP8)
            c.notes["padded_m"] = c.M + zeros.shape[0]

        def quantized() -> Tensor:
            q = _quantize_x(c)
            return q if zeros is None else torch.cat([q, zeros])
        if quantize:
            return lambda: call(quantized())[:c.M]
        qx = quantized()
        return lambda: call(qx)[:c.M]
    return build


def _torchao(config_name: str,
             granularity: str = "PerTensor") -> Callable[[Case], Callable[[], Tensor]]:
    def build(c: Case) -> Callable[[], Tensor]:
        import torchao.quantization as tq  # optional; its absence is recorded as an error
        cfg_cls = getattr(tq, config_name)
        kwargs: dict[str, Any] = {}
        if config_name.startswith("Float8DynamicActivation"):
            kwargs["granularity"] = getattr(tq, granularity)()
        with torch.inference_mode(False), torch.no_grad():  # quantize_ swaps real parameters
            lin = torch.nn.Linear(c.K, c.N, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.copy_(c.w_bf16)
            model = torch.nn.Sequential(lin)
            tq.quantize_(model, cfg_cls(**kwargs))
        return lambda: model(c.x)
    return build


def _bf16_compiled(c: Case) -> Callable[[], Tensor]:
    compiled = torch.compile(F.linear, dynamic=False, fullgraph=True)
    return lambda: compiled(c.x, c.w_bf16)


def cuda_candidates() -> tuple[Candidate, ...]:
    return (
        Candidate("bf16", lambda c: (lambda: F.linear(c.x, c.w_bf16)), False, 0),
        Candidate("bf16_compiled", _bf16_compiled, False, 0, compiled=True),
        Candidate("reference", _reference, temp_bytes_per_elem=4),
        Candidate("deq_native+qdq", _deq_native_qdq, temp_bytes_per_elem=2),
        # the op compiled with fp8fx's lowering: on CUDA quantize + _scaled_mm + epilogue
        Candidate("inductor_op", _compiled(_op_call), temp_bytes_per_elem=None, compiled=True),
        Candidate("scaled_mm", _cuda_scaled_mm(True)),
        # the bare GEMM on the same FP8 operands (x quantized outside the timed call)
        Candidate("raw_scaled_mm", _cuda_scaled_mm(False)),
        Candidate("torchao_f8dyn_pertensor",
                  _torchao("Float8DynamicActivationFloat8WeightConfig")),
        Candidate("torchao_f8dyn_perrow",
                  _torchao("Float8DynamicActivationFloat8WeightConfig", "PerRow")),
        Candidate("torchao_f8_weight_only", _torchao("Float8WeightOnlyConfig")),
    )


# ---------------------------------------------------------------- reporting

def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), Linux only.

    Their difference over a run is the CPU time other processes took from the benchmark; a
    value near zero means the numbers were measured on a quiet machine.
    """
    import resource

    own = sum(getattr(resource.getrusage(who), f) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, own


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores_available": len(os.sched_getaffinity(0)),
                            "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _fmt_cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    ms = r["median_ms"]
    txt = f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
    return f"{txt} ({r['vs_best_hp']:.2f}x)" if "vs_best_hp" in r else txt


def _mb(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def tables(rows: list[dict]) -> str:
    """Markdown: median ms (ratio to bf16) per row and candidate, then per-candidate notes."""
    out: list[str] = []
    for device in dict.fromkeys(r["device"] for r in rows):
        drows = [r for r in rows if r["device"] == device]
        names = list(dict.fromkeys(r["candidate"] for r in drows))
        keys = list(dict.fromkeys((r["shape"], r["M"]) for r in drows))
        out.append(f"\n{device}: median ms per call (ratio to the faster of bf16 and fp32, "
                   "named per row)\n")
        out.append("| K x N | M | " + " | ".join(names) + " | faster hp | other CPU |")
        out.append("|---|---:|" + "---:|" * (len(names) + 2))
        for shape, m in keys:
            cells = [_fmt_cell(next((r for r in drows if r["shape"] == shape and r["M"] == m
                                     and r["candidate"] == n), None)) for n in names]
            share = next(r.get("other_cpu_share") for r in drows
                         if r["shape"] == shape and r["M"] == m)
            fastest = next((r.get("best_hp") for r in drows if r["shape"] == shape
                            and r["M"] == m and "best_hp" in r), "-")
            out.append(f"| {shape} | {m} | " + " | ".join(cells) + f" | {fastest} | {share:.0%} |")
        out.append(f"\n{device}: per candidate (4096x4096 bytes; max over rows)\n")
        out.append("| candidate | weight MB | temp MB | rel err vs reference | compile s |")
        out.append("|---|---:|---:|---:|---:|")
        for n in names:
            rs = [r for r in drows if r["candidate"] == n]
            ok = [r for r in rs if "error" not in r]
            sq = next((r for r in rs if r["K"] == r["N"] == 4096), None)
            errs = [r["rel_err_vs_reference"] for r in ok
                    if r.get("rel_err_vs_reference") is not None]
            comp = [r["compile_s"] for r in ok if "compile_s" in r]
            cells = [_mb(sq and sq["weight_bytes"]), _mb(sq and sq["temp_bytes"]),
                     f"{max(errs):.2e}" if errs else "-", f"{max(comp):.1f}" if comp else "-"]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
            for e in sorted({r["error"] for r in rs if "error" in r}):
                out.append(f"| {n} error: {e} | | | | |")
    return "\n".join(out)


def summary(rows: list[dict], extra: dict[str, Any], args: argparse.Namespace,
            wall_s: float) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for r in rows:
        if r["candidate"] in BASELINES or "median_ms" not in r or r["candidate"] == "gemv":
            continue
        key = f"{r['device']}:{r['shape']}:M={r['M']}"
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = {"candidate": r["candidate"], "median_ms": r["median_ms"],
                         "vs_bf16": r.get("vs_bf16"), "vs_best_hp": r.get("vs_best_hp"),
                         "best_hp": r.get("best_hp")}
    return {"kind": "summary", "machine": machine_info(), "cpu_class": cpu_class(),
            "command": " ".join(sys.argv),
            "shapes": args.shapes_list, "m": args.m_list, "warmup": args.warmup,
            "repeats": args.repeats, "budget_s": args.budget, **extra,
            "fastest_fp8_candidate": best, "wall_s": round(wall_s, 1)}


# ---------------------------------------------------------------- main

from cpuclass import AVX2_ENV, cpu_class, emulate_isa  # noqa: E402,F401


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all",
                   help="'all' (Llama-3-8B's and SmolLM2's shapes), 'llama' (the three "
                        "Llama-3-8B shapes), 'llama70b' (Llama-3-70B's three), 'small' "
                        "(4096x4096 only) or a comma list of KxN names")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="comma list of M")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --shapes small --m 1,16, 1 warmup, 3 repeats")
    p.add_argument("--candidates", default="all", help="comma list of candidate names")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, plus CUDA when available")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="maximum timed rounds per row")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds per candidate after which a row stops (at least 3 rounds)")
    p.add_argument("--max-contention", type=float, default=0.1,
                   help="re-run a row when other processes took more than this share of the "
                        "CPUs while it ran (shared machines)")
    p.add_argument("--retries", type=int, default=1, help="re-runs allowed per row")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="seconds to wait, before each row, for other processes to go quiet")
    p.add_argument("--threads", type=int, default=0, help="0: the number of usable cores")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="CPU rows: wall clock, or the thread's CPU time (needs --threads 1)")
    p.add_argument("--json-out", default="", help="also write the JSON lines to this file")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: emulate an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2, "
                        "ONEDNN_MAX_CPU_ISA=AVX2, Inductor cpp.simdlen=256)")
    args = p.parse_args(argv)
    emulate_isa(args.isa)
    if args.quick:
        args.shapes, args.m, args.warmup, args.repeats = "small", "1,16", 1, 3
    if args.shapes == "all":
        args.shapes_list = list(DEFAULT_SHAPES)
    elif args.shapes == "small":
        args.shapes_list = list(SMALL_SHAPES)
    elif args.shapes == "llama":
        args.shapes_list = list(LLAMA_SHAPES)
    elif args.shapes == "llama70b":
        args.shapes_list = list(LLAMA70B_SHAPES)
    else:
        args.shapes_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes_list if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}, 'all', 'llama', "
                "'llama70b' or 'small'")
    try:
        args.m_list = [int(m) for m in args.m.split(",") if m.strip()]
    except ValueError:
        p.error(f"--m: expected a comma list of integers, got {args.m!r}")
    names = {c.name for c in CPU_CANDIDATES} | {c.name for c in cuda_candidates()}
    args.candidates_set = (names if args.candidates == "all"
                           else {s.strip() for s in args.candidates.split(",") if s.strip()})
    if not args.candidates_set <= names:
        p.error(f"--candidates: unknown {sorted(args.candidates_set - names)}; "
                f"choose from {sorted(names)}")
    args.candidates_set |= set(BASELINES)  # every ratio needs the baselines
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures the calling thread only: use it with --threads 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    json_fh = open(args.json_out, "w", encoding="utf-8") if args.json_out else None

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if json_fh:
            json_fh.write(line + "\n")
            json_fh.flush()  # a run stopped by a timeout keeps the rows it finished

    def emit_all(objs: list[dict]) -> list[dict]:
        for obj in objs:
            emit(obj)
        return objs

    t_start = time.perf_counter()
    busy0, own0 = cpu_seconds()
    extra: dict[str, Any] = dict(check_conversions())
    rows: list[dict] = []
    with torch.inference_mode():
        if args.device in ("auto", "cpu"):
            for shape in args.shapes_list:
                for m in args.m_list:
                    rows += emit_all(run_row_checked(CPU_CANDIDATES, shape, m, args,
                                                     CpuSampler(args.clock), "cpu"))
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                print("--device cuda: CUDA is not available in this torch build/machine; "
                      "run with --device cpu", file=sys.stderr)
                return 2
            cands, sampler = cuda_candidates(), CudaSampler()
            for shape in args.shapes_list:
                for m in args.m_list:
                    rows += emit_all(run_row_checked(cands, shape, m, args, sampler, "cuda"))
    busy1, own1 = cpu_seconds()
    extra["other_processes_cpu_s"] = round((busy1 - busy0) - (own1 - own0), 1)
    emit(summary(rows, extra, args, time.perf_counter() - t_start))
    if json_fh:
        json_fh.close()
    if not args.no_table:
        print(tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lower ``fp8fx::linear`` to Inductor by decomposing it into aten ops.

``register_lowering()`` puts one entry into Inductor's decomposition table, the dict that
``compile_fx`` hands to AOTAutograd through ``torch._inductor.decomposition.select_decomp_table``.
AOTAutograd then traces ``torch.ops.fp8fx.linear.default`` into plain aten ops while it builds
the graph, so ``torch.compile(model)`` with the default Inductor backend generates kernels for
the FP8 linear itself (activation quantization fused into one pointwise kernel, a GEMM or a
reduction, a fused epilogue) instead of calling the op's eager reference kernel. Nothing happens
at import: callers call ``register_lowering()`` (idempotent) before their first compile. Dynamo
keeps what it compiled in-process, so a model compiled before the call keeps the eager op until
``torch._dynamo.reset()``.

On-disk caches: AOTAutograd's cache keys on the graph *before* decompositions, so an artifact
compiled without this decomposition (or with an older version of it) would be served after
registration. ``register_lowering()`` therefore appends a tag naming this module's source hash
to ``torch.compiler.config.cache_key_tag`` (documented for breaking caches); that tag is its
only change to global configuration.

Numerics (reference: ``fp8fx.ops.linear``)
------------------------------------------
Every path quantizes the activation exactly as the reference does (float32 ``x / s_x``, clamp
to ``±fp8_max``, round-to-nearest-even cast to the weight's FP8 dtype) and applies the scales,
the bias and the cast to ``x.dtype`` in a float32 epilogue: ``y = acc * (s_x * s_w) + b``. FP8
values are exact in bfloat16 and float32, so the GEMM operands are exactly the reference's and
only the GEMM differs:

=====================================  =========================================================
CPU, ``M == 1`` (static)               ``(q_x * q_w).sum(-1)`` in float32: Inductor fuses it
                                       into one reduction that reads the FP8 bytes (and redoes
                                       the activation quantization per row); float32
                                       accumulation (equal to the reference up to summation
                                       order)
CPU, bfloat16 ``x``, ``M > 1`` or      ``mm`` of bfloat16 operands (oneDNN accumulates in
dynamic, CPU with AVX512-BF16/AMX      float32, then rounds the product to bfloat16 before the
                                       float32 epilogue): within about one bfloat16 ulp of the
                                       reference, which rounds to bfloat16 only once; tests
                                       compare with a relative tolerance
CPU, any other case                    ``mm`` of float32 operands: float32 accumulation
CUDA, sm89+, E4M3, ``K, N % 16 == 0``  ``torch._scaled_mm`` with float32 output: float32
                                       accumulation (cuBLASLt)
CUDA, sm89+, other shapes/E5M2         float32 ``mm`` of the dequantized operands
=====================================  =========================================================

CPU choice, by measurement
--------------------------
Inductor-compiled candidates (``dynamic=False``), per-tensor E4M3 weight, bfloat16 ``x``; the
fastest of 30 calls after warmup, in ms, with one thread / two threads (the 2-core host was
shared with other jobs, so single-thread numbers are the steadier ones). "bf16 eager" is
``F.linear`` on a bfloat16 weight, "ref op" the eager reference kernel.

``K = N = 2048``:

=====  ===========  ===========  =============  =============  ============  ===========
``M``  bf16 eager   ref op       dequant->fp32  dequant->bf16  _scaled_mm    reduction
=====  ===========  ===========  =============  =============  ============  ===========
1      0.71 / 0.87  13.8 / 8.4   1.42 / 1.83    2.24 / 2.55    16.2 / --     3.77 / 2.80
4      0.71 / --    14.5 / --    2.16 / --      2.87 / --      28.4 / --     --
16     0.93 / 0.81  16.0 / 9.7   3.33 / 3.40    2.99 / 2.44    24.7 / --     --
64     1.78 / --    19.7 / --    7.25 / --      3.76 / --      22.1 / --     --
256    5.35 / 3.35  37.8 / 23.6  24.1 / 15.1    7.62 / 5.20    40.2 / --     --
=====  ===========  ===========  =============  =============  ============  ===========

``K = N = 4096`` (the weight no longer fits the caches, as in LLM layers), two threads:
``M = 1``: reduction 7.8, dequant->bf16 15.9, dequant->fp32 26.0 (bf16 eager 1.6); ``M = 16``:
dequant->bf16 17.3, dequant->fp32 33.0. One thread, ``K = 4096, N = 14336, M = 1``: reduction
68, dequant->bf16 116. Hence: ``M == 1`` (decode) takes the reduction, which is exact and wins
once the weight is LLM-sized (it loses to a GEMM while the float32 weight copy stays in
cache); larger ``M`` takes the bfloat16 GEMM for bfloat16 models. ``torch._scaled_mm`` runs on
CPU (oneDNN) but was the slowest everywhere and not exact (up to 2.5e-3 relative error with a
float32 output), so it is not used on CPU. Every CPU path converts the FP8 weight on each call,
which is why all of them stay several times slower than a bfloat16 weight: FP8 on CPU saves
memory, not time.

The bfloat16 operands are made through float32 (``w.float().to(bfloat16)``): Inductor's direct
FP8 -> bfloat16 vector conversion took 8.8 ms for a 2048 x 2048 weight, FP8 -> float32 ->
bfloat16 1.35 ms.

Inductor fuses a cast to bfloat16 with the float32 math that follows and skips the rounding
(``torch._inductor.config.emulate_precision_casts`` is off by default). An activation that a
compiled graph produces in bfloat16 right before an ``Fp8Linear`` can therefore differ from
eager by a bfloat16 rounding, and its FP8 quantization by one FP8 step now and then; turn that
option on for eager-exact activations.

CUDA
----
Needs compute capability 8.9 or newer (FP8 tensor cores); on an older GPU the trace raises
``QuantizationError`` instead of failing inside a kernel. ``q_x`` (row-major ``[M, K]``) and the
weight's transpose (column-major ``[K, N]``, as cuBLASLt requires) go to ``torch._scaled_mm``
with 0-d float32 scales ``scale_a = s_x``, ``scale_b = s_w`` and a float32 output; bias and cast
are the fused epilogue (``_scaled_mm`` refuses a bias with a float32 output anyway). A
per-channel weight scale also goes in the epilogue, with ``scale_b = 1``: the row-wise recipe
(``scale_a [M, 1]``, ``scale_b [1, N]``) needs cuBLAS >= 12.9 on sm90+ or a build with the
CUTLASS row-wise kernel, and rounds its product to bfloat16. ``_scaled_mm`` needs ``K`` and
``N`` to be multiples of 16 and refuses E5M2 x E5M2 operands (the activation takes the weight's
format, so an E5M2 weight means both); those cases use the float32 dequantize-and-``mm`` path,
which Inductor compiles to Triton kernels and cuBLAS just the same. This path is written
against torch's documented ``_scaled_mm`` checks and is not exercised by the CPU test suite.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fp8fx import ops
from fp8fx.errors import QuantizationError

__all__ = ["register_lowering"]

_MIN_CUDA_CAPABILITY = (8, 9)
_SCALED_MM_ALIGNMENT = 16


# --------------------------------------------------------------------------------------------
# The decomposition
# --------------------------------------------------------------------------------------------


def _quantize_activation(x: Tensor, input_scale: Tensor, fp8_dtype: torch.dtype,
                         fp8_max: float) -> Tensor:
    """``saturate(x / s_x)`` in float32 cast to ``fp8_dtype``, as the reference kernel does."""
    return (x.to(torch.float32) / input_scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)


def _epilogue(acc: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
              dtype: torch.dtype) -> Tensor:
    """``acc * scale + bias`` in float32, cast to ``dtype``."""
    y = acc.to(torch.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def _dequant_mm(qx: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``q_x @ q_wᵀ`` with both operands converted (exactly) to ``dtype`` through float32."""
    a = qx.to(torch.float32)
    b = weight.to(torch.float32)
    if dtype != torch.float32:
        a, b = a.to(dtype), b.to(dtype)
    return torch.mm(a, b.t())


def _is_one(size: object) -> bool:
    """True only when ``size`` is 1 without adding a guard on a symbolic size."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(size == 1))


def _cpu_has_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def _cpu_linear(x2d: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                bias: Optional[Tensor], fp8_max: float) -> Tensor:
    qx = _quantize_activation(x2d, input_scale, weight.dtype, fp8_max)
    if _is_one(x2d.shape[0]):
        acc = (qx.to(torch.float32) * weight.to(torch.float32)).sum(dim=-1).unsqueeze(0)
    elif x2d.dtype == torch.bfloat16 and _cpu_has_bf16():
        acc = _dequant_mm(qx, weight, torch.bfloat16)
    else:
        acc = _dequant_mm(qx, weight, torch.float32)
    return _epilogue(acc, input_scale * weight_scale, bias, x2d.dtype)


def _cuda_linear(x2d: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 bias: Optional[Tensor], fp8_max: float) -> Tensor:
    major, minor = torch.cuda.get_device_capability(x2d.device)
    if (major, minor) < _MIN_CUDA_CAPABILITY:
        raise QuantizationError(
            f"fp8fx::linear cannot run on {x2d.device} (compute capability {major}.{minor}): FP8 "
            "GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell). Run the "
            "converted model on such a GPU or on CPU, or keep this model in high precision")
    qx = _quantize_activation(x2d, input_scale, weight.dtype, fp8_max)
    n, k = weight.shape
    if (weight.dtype != torch.float8_e4m3fn or k % _SCALED_MM_ALIGNMENT != 0
            or n % _SCALED_MM_ALIGNMENT != 0):
        acc = _dequant_mm(qx, weight, torch.float32)
        return _epilogue(acc, input_scale * weight_scale, bias, x2d.dtype)
    if weight_scale.numel() == 1:
        scale_b, post_scale = weight_scale.reshape(()), None
    else:
        scale_b = torch.ones((), dtype=torch.float32, device=x2d.device)
        post_scale = weight_scale.reshape(-1)
    acc = torch._scaled_mm(qx, weight.contiguous().t(), scale_a=input_scale.reshape(()),
                           scale_b=scale_b, out_dtype=torch.float32)
    return _epilogue(acc, post_scale, bias, x2d.dtype)


def _decompose_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                      bias: Optional[Tensor], fp8_max: float) -> Tensor:
    """``fp8fx::linear`` in aten ops; the kernel is chosen by device (module docstring)."""
    ops._check_weight(weight)
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    lower = _cuda_linear if x.device.type == "cuda" else _cpu_linear
    y = lower(x2d, weight, weight_scale, input_scale, bias, fp8_max)
    return y.reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _decomposition_tables() -> list[dict]:
    """Every dict ``select_decomp_table`` can return.

    ``decompositions`` is the base table; ``fast_random_decomps()`` is a cached copy of it
    (``functools.cache``) that Inductor uses unless ``config.fallback_random`` is set, so an
    entry added after the first compile has to go into that copy as well.
    """
    from torch._inductor import decomposition

    tables = [decomposition.decompositions]
    fast = getattr(decomposition, "fast_random_decomps", None)
    if fast is not None:
        tables.append(fast())
    return tables


def _cache_tag() -> str:
    try:
        digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    except OSError:  # not a plain file (zip import): fall back to the decomposition's bytecode
        digest = hashlib.sha256(_decompose_linear.__code__.co_code).hexdigest()[:16]
    return f"fp8fx-inductor-{digest}"


def register_lowering() -> None:
    """Register the Inductor decomposition of ``fp8fx::linear`` (idempotent).

    Call it before the first ``torch.compile`` of a converted model; see the module docstring
    for the per-device kernels and the cache tag it adds.
    """
    op = torch.ops.fp8fx.linear.default
    for table in _decomposition_tables():
        table[op] = _decompose_linear
    from torch.compiler import config as compiler_config

    tag = _cache_tag()
    current = compiler_config.cache_key_tag
    if tag not in current.split("|"):
        compiler_config.cache_key_tag = f"{current}|{tag}" if current else tag

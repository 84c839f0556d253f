"""Lower ``fp8fx::linear`` to Inductor by decomposing it into aten ops.

``register_lowering()`` puts one entry into Inductor's decomposition table, the dict that
``compile_fx`` hands to AOTAutograd through ``torch._inductor.decomposition.select_decomp_table``.
AOTAutograd then traces ``torch.ops.fp8fx.linear.default`` into plain aten ops while it builds
the graph, so ``torch.compile(model)`` with the default Inductor backend generates kernels for
the FP8 linear itself (activation quantization fused into one pointwise kernel, a GEMM or a
reduction, a fused epilogue) instead of calling the op's eager kernel. Nothing happens
at import: callers call ``register_lowering()`` (idempotent) before their first compile. Dynamo
keeps what it compiled in-process, so a model compiled before the call keeps the eager op until
``torch._dynamo.reset()``.

On-disk caches: AOTAutograd's cache keys on the graph *before* decompositions, so an artifact
compiled without this decomposition (or with an older version of it) would be served after
registration. ``register_lowering()`` therefore appends a tag naming the hash of this module's
source and of the modules the decomposition calls into (``_cache_tag``) to
``torch.compiler.config.cache_key_tag`` (documented for breaking caches); that tag is its
only change to global configuration.

Numerics (reference: ``fp8fx.kernels.linear.linear_reference``)
----------------------------------------------------------------
Every path quantizes the activation exactly as the reference does (float32 ``x / s_x``, clamp
to ``±fp8_max``, round-to-nearest-even cast to the weight's FP8 dtype) and applies the scales,
the bias and the cast to ``x.dtype`` in a float32 epilogue: ``y = acc * (s_x * s_w) + b``. FP8
values are exact in bfloat16 and float32, so the GEMM operands are exactly the reference's and
only the GEMM differs:

=====================================  =========================================================
CPU, few static rows (``M`` up to     an extern call of the C++ GEMV
``_GEMV_MAX_M``), C++ kernel built     (``torch.ops.fp8fx_cpp.gemv_fp8``,
                                       :mod:`fp8fx.kernels.gemv`) on ``q_x`` in float32 and
                                       the FP8 weight itself: float32 accumulation, equal to
                                       the reference up to summation order
CPU, ``M == 1`` (static), no C++ GEMV  ``(q_x * q_w).sum(-1)`` in float32: one reduction that
                                       reads the FP8 bytes; ``q_x`` is computed once into a
                                       buffer (``_materialized``), not per output row; float32
                                       accumulation, equal to the reference up to summation
                                       order
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

CPU kernels, and why
--------------------
Each choice below was picked by ``benchmarks/linear.py`` against a bfloat16 ``F.linear`` and
against the previous form of this decomposition (``lowering_before``); the figures, the command
and the machine are in ``benchmarks/README.md``.

The weight is converted by integer ops (``_fp8_to_float32``), never by an FP8 cast: Inductor's
vectorized FP8 -> float32 conversion handles subnormal and NaN codes with masks and branches
and made the ``M == 1`` reduction slower; a shorter bit trick that maps subnormal codes to
float32 denormals was faster still but wrong with flushed denormals. The integer form is exact
for all 256 codes of both formats and forms no float32 denormal (a test runs it with
denormals flushed). Its shifts, biases and special codes come from the format table
(:mod:`fp8fx.fp8`).

* Few static rows (decode, decode with a batch): the C++ GEMV of :mod:`fp8fx.kernels.gemv`
  (``fp8fx.kernels.linear.gemv_rows`` decides, by the same limits as the eager kernel), an
  extern call Inductor schedules between its generated kernels (activation quantization
  before, the epilogue fused after). The reduction below vectorizes well on AVX512 but on an
  AVX2 CPU (``cpp.simdlen=256``) Inductor turns its int8/int32 vector conversions into scalar
  loops through stack buffers and it ran at 4.5x bfloat16's time; the C++ kernel converts
  in registers on both ISAs. A symbolic ``M`` (prefill under ``dynamic=True``) never takes
  it, so no guard is added. ``register_lowering()`` builds the kernel (once per machine,
  cached on disk by torch) before any compile, so that graphs served from the compile cache
  find its op defined; the cache tag records whether it is in use.
* ``M == 1`` without the C++ GEMV: the reduction streams the FP8 bytes (1 byte per weight against bfloat16's 2),
  which beats bfloat16 on LLM-sized weights; on small cache-resident weights the ~20
  instructions per 16 weights of the conversion are the cost, and with a long ``K`` the
  float32 ``q_x`` no longer fits L1. ``q_x`` is computed once (``_materialized``): inlined
  into the reduction, Inductor would re-quantize it for every output row. Inductor sums more
  than ``_MAX_REDUCTION`` float32 elements through a cascade helper that keeps its partial
  sums in a heap vector per output, so long rows are summed in equal parts
  (``_reduction_parts``).
* ``M > 1``: the weight is converted into float32 in row groups of ``_GROUP_ELEMS`` and each
  group is multiplied as soon as it is converted. A weight-sized temporary comes from ``mmap``
  and page-faults on every call (more than the conversion itself costs), and a conversion
  fused with the cast to bfloat16 runs at Inductor's 32-lane width, much slower than the
  16-lane float32 one; ``_materialized`` keeps the two apart. Where the GEMM dominates
  (thousands of rows) the grouping is within noise of one conversion. The activation is
  quantized by the C++ ``fp8fx_cpp::fp8_codes`` where it is built (``_cpu_codes``): the
  cast's codes bit for bit, by 8-lane integer ops, where Inductor's float32 -> FP8 cast is a
  scalar loop under AVX2 (before this, the lowered op took 1.18-1.39x the float32 GEMM's time
  at 2040 rows of SmolLM2's sizes, ``benchmarks/linear.py --m 2040``).
* ``torch._scaled_mm`` runs on CPU (oneDNN) but was the slowest candidate everywhere, so it is
  not used on CPU.

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

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.linear, which this lowers)
from fp8fx.errors import QuantizationError
from fp8fx.fp8 import FORMATS
from fp8fx.kernels.linear import check_fp8_weight, cpu_has_bf16, quantize_activation

__all__ = ["register_lowering"]

_MIN_CUDA_CAPABILITY = (8, 9)
_SCALED_MM_ALIGNMENT = 16


# --------------------------------------------------------------------------------------------
# The decomposition
# --------------------------------------------------------------------------------------------


def _epilogue(acc: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
              dtype: torch.dtype) -> Tensor:
    """``acc * scale + bias`` in float32, cast to ``dtype``."""
    y = acc.to(torch.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


_SIGN_BIT = -(2**31)
_MAX_REDUCTION = 4096  # Inductor's CPU cascade-sum threshold (codegen/cpp.py, chunk_size)
_GROUP_ELEMS = 1 << 22  # weight elements converted per group on the M > 1 path (16 MiB fp32)


def _fp8_to_float32(weight: Tensor) -> Tensor:
    """``weight.to(float32)`` by integer ops that Inductor fuses and vectorizes (no FP8 cast).

    The 7 magnitude bits shift into float32's exponent and mantissa fields and the bias
    difference is added to the exponent: exact for normal codes. Subnormal codes (exponent
    field 0) are ``magnitude * 2**(1 - bias - mantissa bits)`` by an int -> float conversion,
    so no float32 denormal is ever formed (the result does not depend on the denormal mode);
    NaN (and E5M2's inf) codes are selected; the sign bit is ORed in last.
    """
    fmt = FORMATS[weight.dtype]
    mbits, bias = fmt.mantissa_bits, fmt.bias
    code = weight.view(torch.int8).to(torch.int32)  # sign-extended: bit 31 is the sign
    mag = code & 0x7F
    normal = ((mag << (23 - mbits)) + ((127 - bias) << 23)).view(torch.float32)
    subnormal = mag.to(torch.float32) * 2.0 ** (1 - bias - mbits)
    value = torch.where(mag < (1 << mbits), subnormal, normal)
    if fmt.has_inf:  # E5M2: the exponent field all ones is inf, then NaN
        top = fmt.inf_magnitude
        special = torch.where(mag == top, float("inf"), float("nan"))
        value = torch.where(mag >= top, special, value)
    else:  # E4M3fn: the one NaN magnitude
        value = torch.where(mag == fmt.nan_magnitude, float("nan"), value)
    return (value.view(torch.int32) | (code & _SIGN_BIT)).view(torch.float32)


def _materialized(t: Tensor) -> Tensor:
    """``t``, computed once into a buffer: Inductor realizes the input of ``as_strided``.

    Without it Inductor inlines the activation quantization into the ``M == 1`` reduction and
    recomputes it for every output row (``N`` times); a test checks the generated code.
    """
    return t.as_strided(t.shape, t.stride())


def _dequant_mm(qx: Tensor, weight: Tensor) -> Tensor:
    """``q_x @ q_wᵀ`` in float32 with both operands cast (exactly) to float32 (GPUs)."""
    return torch.mm(qx.to(torch.float32), weight.to(torch.float32).t())


def _cpu_dequant_mm(qx: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``q_x @ q_wᵀ`` in ``dtype`` (both operands exact in it) for ``M > 1`` on CPU.

    The weight is converted by the C++ conversion op where it is built (``_cpp_dequant``,
    straight into ``dtype``), else by ``_fp8_to_float32`` into a float32 buffer (``_materialized``:
    fused with the cast to bfloat16, the conversion runs at Inductor's 32-lane bfloat16 width
    and is much slower) in row groups of ``_GROUP_ELEMS`` elements, each multiplied as soon
    as it is converted: a weight-sized temporary comes from ``mmap`` and page-faults on every
    call, which costs more than the conversion itself (figures: ``benchmarks/README.md``).
    """
    n, k = weight.shape
    a = qx.to(torch.float32).to(dtype)
    static = isinstance(n, int) and isinstance(k, int)  # weights are static unless forced
    groups = max(1, -(-n * k // _GROUP_ELEMS)) if static else 1
    rows = -(-n // groups)
    parts = []
    dequant = _cpp_dequant(dtype)
    for r0 in range(0, n, rows):
        group = weight[r0:r0 + rows]
        b = dequant(group) if dequant is not None else _materialized(_fp8_to_float32(group)).to(dtype)
        parts.append(torch.mm(a, b.t()))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _cpp_dequant(dtype: torch.dtype):
    """The C++ FP8 -> ``dtype`` (float32 or bfloat16) conversion op (:mod:`fp8fx.kernels.gemv`)
    where it is built, else None. Inductor vectorizes ``_fp8_to_float32`` well on AVX512, but on
    an AVX2 CPU its int8/int32 vector conversions become scalar loops; the extern op converts in
    registers on both and writes the same exact values, in bfloat16 straight into the GEMM's
    operand (no float32 group written, read back and cast)."""
    from fp8fx.kernels import gemv

    return gemv.cpp_dequant_op(dtype)


def _reduction_parts(k: int) -> int:
    """In how many equal parts to sum ``k`` products: Inductor's CPU sum over more than
    ``_MAX_REDUCTION`` float32 elements uses a cascade (pairwise) helper that keeps its partial
    sums in a heap vector per output, much slower here; smaller sums of equal length avoid it.
    1 when no divisor of ``k`` gives parts of at least 256 (then the cascade it is)."""
    if not isinstance(k, int):
        return 1
    parts = -(-k // _MAX_REDUCTION)
    while parts > 1 and k % parts and k // parts >= 256:
        parts += 1
    return parts if k % parts == 0 and k // parts >= 256 else 1


def _is_one(size: object) -> bool:
    """True only when ``size`` is 1 without adding a guard on a symbolic size."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(size == 1))


def _static_rows(size: object) -> Optional[int]:
    """``size`` as an int when it is static (no guard added on a symbolic size), else None."""
    return size if isinstance(size, int) else None


def _cpu_gemv(qx: Tensor, weight: Tensor) -> Optional[Tensor]:
    """``q_x @ q_wᵀ`` (float32) by the C++ GEMV op for a static, small ``M`` where it is
    built (``fp8fx.kernels.linear.gemv_rows``), else None. An extern call in the graph that
    reads the FP8 bytes; its fake kernel gives Inductor the shape."""
    from fp8fx.kernels import gemv
    from fp8fx.kernels.linear import gemv_rows

    m = _static_rows(qx.shape[0])
    if m is None or not gemv_rows(m):
        return None
    return gemv.cpp_op()(qx.to(torch.float32), weight)


def _cpu_qgemv(x2d: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
               bias: Optional[Tensor], fp8_max: float, activations: str) -> Optional[Tensor]:
    """The whole few-row op (quantization, GEMV, epilogue) as one call of the C++ kernel
    (``fp8fx.kernels.gemv.qgemv_op``) for a static, small ``M`` where it is built, else None:
    one extern call per Linear at decode instead of two generated kernels around the GEMV."""
    from fp8fx.kernels import gemv
    from fp8fx.kernels.linear import gemv_rows
    from fp8fx.kernels.schemes import AMAX_FLOOR

    m = _static_rows(x2d.shape[0])
    if (m is None or not gemv_rows(m) or x2d.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or activations not in gemv.QGEMV_MODES):
        return None
    return gemv.qgemv_op()(x2d, weight, weight_scale, input_scale, bias, fp8_max, gemv.QGEMV_MODES[activations],
                           AMAX_FLOOR)


def _cpu_codes(x2d: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> Optional[Tensor]:
    """The float32 FP8 codes of ``x2d / scale`` (one scale, or ``[M, 1]``) by the C++ op where
    it is built and ``M`` is more than the GEMV's few rows, else None (the module docstring
    says why). The codes are the cast's bit for bit; few rows keep the fused forms (GEMV,
    reduction)."""
    from fp8fx.kernels import gemv
    from fp8fx.kernels.linear import gemv_rows

    m = _static_rows(x2d.shape[0])
    if _is_one(x2d.shape[0]) or (m is not None and gemv_rows(m)):
        return None
    return gemv.codes(x2d, scale, fp8_dtype, fp8_max)


def _cpu_linear(x2d: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                bias: Optional[Tensor], fp8_max: float) -> Tensor:
    fused = _cpu_qgemv(x2d, weight, weight_scale, input_scale, bias, fp8_max, "static")
    if fused is not None:
        return fused
    bf16_gemm = x2d.dtype == torch.bfloat16 and cpu_has_bf16()
    codes = _cpu_codes(x2d, input_scale, weight.dtype, fp8_max)
    if codes is not None:  # prefill: the C++ quantization, then the converted-weight GEMM
        acc = _cpu_dequant_mm(codes, weight, torch.bfloat16 if bf16_gemm else torch.float32)
        return _epilogue(acc, input_scale * weight_scale, bias, x2d.dtype)
    qx = quantize_activation(x2d, input_scale, weight.dtype, fp8_max)
    acc = _cpu_gemv(qx, weight)
    if acc is None and _is_one(x2d.shape[0]):  # no C++ kernel: a reduction Inductor generates
        n, k = weight.shape
        qx32 = _materialized(qx.to(torch.float32))
        parts = _reduction_parts(k)
        prod = qx32.reshape(1, parts, k // parts) * _fp8_to_float32(weight).reshape(n, parts, -1)
        acc = prod.sum(dim=-1).sum(dim=-1).unsqueeze(0)
    elif acc is None:
        acc = _cpu_dequant_mm(qx, weight, torch.bfloat16 if bf16_gemm else torch.float32)
    return _epilogue(acc, input_scale * weight_scale, bias, x2d.dtype)


def _cuda_linear(x2d: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 bias: Optional[Tensor], fp8_max: float) -> Tensor:
    major, minor = torch.cuda.get_device_capability(x2d.device)
    if (major, minor) < _MIN_CUDA_CAPABILITY:
        raise QuantizationError(
            f"fp8fx::linear cannot run on {x2d.device} (compute capability {major}.{minor}): FP8 "
            "GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell). Run the "
            "converted model on such a GPU or on CPU, or keep this model in high precision")
    qx = quantize_activation(x2d, input_scale, weight.dtype, fp8_max)
    n, k = weight.shape
    if (weight.dtype != torch.float8_e4m3fn or k % _SCALED_MM_ALIGNMENT != 0
            or n % _SCALED_MM_ALIGNMENT != 0):
        acc = _dequant_mm(qx, weight)
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
    check_fp8_weight(weight)
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
    """A hash of the sources the decomposition is made of: this module, the quantization it
    calls (``fp8fx.numerics``, ``fp8fx.kernels.linear``) and the format table (``fp8fx.fp8``)."""
    from fp8fx import fp8, numerics
    from fp8fx.backends import inductor_schemes
    from fp8fx.kernels import gemv, linear, schemes

    # what the decomposition chooses by: graphs with or without the C++ GEMV op (building it
    # here, before any compile, also defines the op for graphs served from the cache), and
    # bfloat16 or float32 GEMMs
    choices = repr((gemv.available(), linear.cpu_has_bf16())).encode()
    digest = hashlib.sha256()
    try:
        for module in (__file__, numerics.__file__, linear.__file__, fp8.__file__, inductor_schemes.__file__,
                       schemes.__file__, gemv.__file__):
            digest.update(Path(module).read_bytes())
    except (OSError, TypeError):  # not plain files (zip import): the decomposition's bytecode
        digest = hashlib.sha256(_decompose_linear.__code__.co_code)
    digest.update(choices)
    return f"fp8fx-inductor-{digest.hexdigest()[:16]}"


def register_lowering() -> None:
    """Register the Inductor decomposition of ``fp8fx::linear`` (idempotent).

    Call it before the first ``torch.compile`` of a converted model; see the module docstring
    for the per-device kernels and the cache tag it adds.
    """
    op = torch.ops.fp8fx.linear.default
    for table in _decomposition_tables():
        table[op] = _decompose_linear
    from fp8fx.backends.inductor_schemes import register_scheme_lowerings

    register_scheme_lowerings(_decomposition_tables())
    from fp8fx.backends.cpu_attention import register_cpu_attention

    register_cpu_attention()
    from torch.compiler import config as compiler_config

    tag = _cache_tag()
    current = compiler_config.cache_key_tag
    if tag not in current.split("|"):
        compiler_config.cache_key_tag = f"{current}|{tag}" if current else tag

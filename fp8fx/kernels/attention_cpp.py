"""``sdpa_fp8``: the CPU kernel of ``fp8fx::sdpa`` with more than one query row (prefill).

``fp8fx_cpp::sdpa_fp8(q, k, v, mask, causal, sm_scale, sq, sk, sv, qk, pv, sp, so, fp8_max,
fmt) -> out`` computes what :func:`fp8fx.backends.cpu_attention.sdpa_cpu` computes, in the same
float32 operations and order, one block of query rows at a time:

* q, k and v to their FP8 codes (``x / s``, saturated at ``±fp8_max``, rounded to nearest even
  on the FP8 grid by integer ops on the float32 bits; exact in float32), K and V once per call
  (``[B, H_kv, S_k, D]``: no copy per query head);
* per block of up to 32 positions of the ``r = H / H_kv`` query heads of one KV head: the
  scores ``(q8·k8ᵀ · qk[h]) · sm_scale`` by one float32 GEMM (ATen's ``mm``) over the keys the
  block can see (``causal``: keys ``j <= i``, top-left aligned as ``masked_softmax``; the keys
  past the block's last row are never multiplied), the causal ``-inf`` and the additive mask,
  ATen's softmax, NaN rows (fully masked) to 0, the probabilities' FP8 codes (``p / sp``), one
  GEMM by the value codes and the epilogue ``o · pv[h]`` rounded to FP8 with ``so`` and
  written as ``so · code`` in q's dtype.

So no ``[B, H, S, S_k]`` float32 tensor exists: a block's scores are ``r · 32 · S_k`` floats
(390 KB for SmolLM2's 3 query heads per KV head at 2048 keys), reused through the softmax and
the rounding while they are in cache, and a causal prefill skips the masked half of both
GEMMs. The FP8 rounding loops are 8-lane AVX2 intrinsics (both ISA sections of the GEMV
extension, :mod:`fp8fx.kernels.gemv`, enable AVX2) with a scalar form for the tails: the same
rounding as ``attention_layer.py``'s grid check, bit-identical to the FP8 cast (GCC does not
vectorize the scalar form's selects by itself).

Scales arrive as lists of Python floats, one per query head (``sq``, ``qk``, ``pv``) or per KV
head (``sk``, ``sv``), each exactly the float32 number the torch lowering multiplies or divides
by (:func:`call` computes them), so the kernel is bit for bit the lowering up to the GEMMs'
summation order (checked against the op's definition in ``tests/test_cpu_attention.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import struct

import torch
from torch import Tensor

from fp8fx import attention_ops

__all__ = ["ROWS", "ENTRY", "SCHEMA", "call", "fake"]

Scale = Union[float, Sequence[float]]

#: row loops, instantiated in each ISA section of the extension (both enable AVX2: 8-lane
#: intrinsics, the scalar form for the tails; the compiler does not vectorize the selects itself)
ROWS = r"""
template <int FMT>
static inline float fp8_grid(float x) {
  // x within ±max: round-to-nearest-even to FP8's 3 (E4M3) or 2 (E5M2) mantissa bits; below the
  // smallest normal, to a multiple of the subnormal step; NaN stays NaN (vector form: fp8_grid8)
  constexpr int DROP = FMT == 0 ? 20 : 21;
  constexpr float QSUB = FMT == 0 ? 512.0f : 65536.0f;
  constexpr float MIN_NORMAL = FMT == 0 ? 0.015625f : 6.103515625e-05f;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const uint32_t r = (b + ((1u << (DROP - 1)) - 1u) + ((b >> DROP) & 1u)) & ~((1u << DROP) - 1u);
  float nrm;
  std::memcpy(&nrm, &r, 4);
  const float sub = __builtin_roundevenf(x * QSUB) * (1.0f / QSUB);
  return std::fabs(x) < MIN_NORMAL ? sub : (x != x ? x : nrm);
}

template <int FMT>
static inline __m256 fp8_grid8(__m256 x) {
  constexpr int DROP = FMT == 0 ? 20 : 21;
  constexpr float QSUB = FMT == 0 ? 512.0f : 65536.0f;
  constexpr float MIN_NORMAL = FMT == 0 ? 0.015625f : 6.103515625e-05f;
  const __m256i b = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, DROP), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32((1 << (DROP - 1)) - 1)), odd);
  r = _mm256_and_si256(r, _mm256_set1_epi32(~((1 << DROP) - 1)));
  const __m256 sub = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(QSUB)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm256_set1_ps(1.0f / QSUB));
  const __m256 small = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(MIN_NORMAL),
                                     _CMP_LT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_blendv_ps(_mm256_castsi256_ps(r), x, nan), sub, small);
}

static inline float saturate(float v, float mx) { return v < -mx ? -mx : (v > mx ? mx : v); }

static inline __m256 saturate8(__m256 v, __m256 mx) {
  // min/max return their second operand when one is NaN: NaN stays NaN
  return _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), mx), _mm256_min_ps(mx, v));
}

template <int FMT>
static void codes_row(const float* __restrict x, int64_t n, float s, float mx, float* __restrict out) {
  const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(mx);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(out + k, fp8_grid8<FMT>(saturate8(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), mv)));
  for (; k < n; ++k) out[k] = fp8_grid<FMT>(saturate(x[k] / s, mx));
}

static void scores_row(float* __restrict s, int64_t n, float qk, float sm, int64_t keep,
                       const float* __restrict mask, int64_t mstride) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t kept = std::min(keep, n);
  const __m256 qv = _mm256_set1_ps(qk), smv = _mm256_set1_ps(sm);
  int64_t j = 0;
  for (; j + 8 <= kept; j += 8)
    _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), qv), smv));
  for (; j < kept; ++j) s[j] = (s[j] * qk) * sm;
  for (j = std::max<int64_t>(kept, 0); j < n; ++j) s[j] = ninf;
  if (mask != nullptr) {
    if (mstride == 1) {
      for (j = 0; j + 8 <= n; j += 8)
        _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(mask + j)));
      for (; j < n; ++j) s[j] = s[j] + mask[j];
    } else {
      for (j = 0; j < n; ++j) s[j] = s[j] + mask[j * mstride];
    }
  }
}

template <int FMT>
static void probs_codes(float* __restrict p, int64_t n, float sp, float mx) {
  // softmax of a fully masked row is NaN: 0, as the definition's nan_to_num
  const __m256 sv = _mm256_set1_ps(sp), mv = _mm256_set1_ps(mx), zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(p + j);
    v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm256_storeu_ps(p + j, fp8_grid8<FMT>(saturate8(_mm256_div_ps(v, sv), mv)));
  }
  for (; j < n; ++j) {
    const float v = p[j] != p[j] ? 0.0f : p[j];
    p[j] = fp8_grid<FMT>(saturate(v / sp, mx));
  }
}

template <int FMT, typename T>
static void out_row(const float* __restrict o, int64_t n, float f, float so, float mx, T* __restrict y) {
  const __m256 fv = _mm256_set1_ps(f), sv = _mm256_set1_ps(so), mv = _mm256_set1_ps(mx);
  alignas(32) float t[8];
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = fp8_grid8<FMT>(saturate8(_mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(o + k), fv), sv), mv));
    _mm256_store_ps(t, _mm256_mul_ps(v, sv));
    for (int i = 0; i < 8; ++i) y[k + i] = T(t[i]);
  }
  for (; k < n; ++k) y[k] = T(fp8_grid<FMT>(saturate((o[k] * f) / so, mx)) * so);
}
"""

#: the operator (after the GEMV extension's entry points, whose ``g_level`` and ``FP8FX_ISA`` it uses)
ENTRY = r"""
static void codes_of(const at::Tensor& x, int64_t heads, const std::vector<float>& scale, float mx,
                     int fmt, at::Tensor& out) {
  // x float32 contiguous [B, heads, S, D]: out[b, h] = codes of x[b, h] with scale[h]
  const int64_t rows = x.numel() / std::max<int64_t>(1, x.size(3));
  const int64_t S = x.size(2), D = x.size(3);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale[(r / S) % heads];
      if (fmt == 0) FP8FX_ISA(codes_row<0>(xp + r * D, D, s, mx, op + r * D));
      else FP8FX_ISA(codes_row<1>(xp + r * D, D, s, mx, op + r * D));
    }
  });
}

static std::vector<float> floats(at::ArrayRef<double> v, int64_t n, const char* what) {
  TORCH_CHECK(int64_t(v.size()) == n, "sdpa_fp8: ", what, " needs ", n, " values, got ", v.size());
  std::vector<float> out(v.begin(), v.end());
  return out;
}

at::Tensor sdpa_fp8(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    const std::optional<at::Tensor>& mask_in, bool causal, double sm_scale,
                    at::ArrayRef<double> sq_in, at::ArrayRef<double> sk_in, at::ArrayRef<double> sv_in,
                    at::ArrayRef<double> qk_in, at::ArrayRef<double> pv_in, double sp_in, double so_in,
                    double fp8_max, int64_t fmt) {
  TORCH_CHECK(q_in.device().is_cpu() && q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "sdpa_fp8: 4-D CPU q, k, v expected");
  TORCH_CHECK(fmt == 0 || fmt == 1, "sdpa_fp8: fmt must be 0 (E4M3) or 1 (E5M2)");
  TORCH_CHECK(g_level.load() >= 1, "sdpa_fp8: no vector ISA selected (fp8fx.kernels.gemv sets it)");
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3);
  const int64_t Hk = k_in.size(1), Sk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == Hk && v_in.size(2) == Sk &&
              k_in.size(3) == D && v_in.size(3) == D && Hk > 0 && H % Hk == 0,
              "sdpa_fp8: q [B, H, S, D], k and v [B, H_kv, S_k, D] with H a multiple of H_kv expected, got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  const auto qt = q_in.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf,
              "sdpa_fp8: q must be float32, bfloat16 or float16");
  const std::vector<float> sq = floats(sq_in, H, "sq"), qk = floats(qk_in, H, "qk"), pv = floats(pv_in, H, "pv");
  const std::vector<float> sk = floats(sk_in, Hk, "sk"), sv = floats(sv_in, Hk, "sv");
  const float sm = float(sm_scale), sp = float(sp_in), so = float(so_in), mx = float(fp8_max);
  at::Tensor out = at::empty({B, H, S, D}, q_in.options());
  if (out.numel() == 0) return out;
  if (Sk == 0) return out.zero_();  // softmax over no keys, times no values: zeros, as the definition
  const at::Tensor qf = q_in.to(at::kFloat).contiguous(), kf = k_in.to(at::kFloat).contiguous(),
                   vf = v_in.to(at::kFloat).contiguous();
  at::Tensor qc = at::empty_like(qf), kc = at::empty_like(kf), vc = at::empty_like(vf);
  codes_of(qf, H, sq, mx, int(fmt), qc);
  codes_of(kf, Hk, sk, mx, int(fmt), kc);
  codes_of(vf, Hk, sv, mx, int(fmt), vc);
  at::Tensor mask;
  const float* mp = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0, ms3 = 0;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->scalar_type() == at::kFloat, "sdpa_fp8: the mask must be additive float32");
    mask = mask_in->expand({B, H, S, Sk});
    mp = mask.data_ptr<float>();
    ms0 = mask.stride(0); ms1 = mask.stride(1); ms2 = mask.stride(2); ms3 = mask.stride(3);
  }
  const int64_t r = H / Hk;
  constexpr int64_t NB = 32;
  const int64_t nblk = (S + NB - 1) / NB;
  at::parallel_for(0, B * Hk * nblk, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (Hk * nblk), g = (u / nblk) % Hk, blk = u % nblk;
      const int64_t i0 = blk * NB, nb = std::min(S, i0 + NB) - i0;
      const int64_t keys = causal ? std::min(Sk, i0 + nb) : Sk;  // keys j <= i of the block's rows
      const at::Tensor qb = qc.select(0, b).narrow(0, g * r, r).narrow(1, i0, nb).reshape({r * nb, D});
      at::Tensor sc = at::mm(qb, kc.select(0, b).select(0, g).narrow(0, 0, keys).t());  // [r * nb, keys]
      float* scp = sc.data_ptr<float>();
      for (int64_t row = 0; row < r * nb; ++row) {
        const int64_t h = g * r + row / nb, i = i0 + row % nb;
        const float* mrow = mp ? mp + b * ms0 + h * ms1 + i * ms2 : nullptr;
        FP8FX_ISA(scores_row(scp + row * keys, keys, qk[h], sm, causal ? i + 1 : keys, mrow, ms3));
      }
      at::Tensor pr = at::_softmax(sc, 1, false);
      if (fmt == 0) FP8FX_ISA(probs_codes<0>(pr.data_ptr<float>(), pr.numel(), sp, mx));
      else FP8FX_ISA(probs_codes<1>(pr.data_ptr<float>(), pr.numel(), sp, mx));
      const at::Tensor ob = at::mm(pr, vc.select(0, b).select(0, g).narrow(0, 0, keys));  // [r * nb, D]
      const float* obp = ob.data_ptr<float>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qt, "sdpa_fp8_out", [&] {
        scalar_t* yp = out.data_ptr<scalar_t>();
        for (int64_t row = 0; row < r * nb; ++row) {
          const int64_t h = g * r + row / nb, i = i0 + row % nb;
          scalar_t* y = yp + ((b * H + h) * S + i) * D;
          if (fmt == 0) FP8FX_ISA(out_row<0>(obp + row * D, D, pv[h], so, mx, y));
          else FP8FX_ISA(out_row<1>(obp + row * D, D, pv[h], so, mx, y));
        }
      });
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(fp8fx_cpp, m) {
  m.def("sdpa_fp8(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float sm_scale, float[] sq, "
        "float[] sk, float[] sv, float[] qk, float[] pv, float sp, float so, float fp8_max, int fmt) -> Tensor");
}
TORCH_LIBRARY_IMPL(fp8fx_cpp, CPU, m) { m.impl("sdpa_fp8", &sdpa_fp8); }
"""

SCHEMA = "fp8fx_cpp::sdpa_fp8"


def fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, sm_scale: float, sq, sk, sv,  # noqa: ANN001
         qk, pv, sp: float, so: float, fp8_max: float, fmt: int) -> Tensor:
    return q.new_empty(q.shape)


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even). The product of two float32 numbers is exact in
    double, so ``_f32(a * b)`` of float32 values is their float32 product."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _per_head(scale: Scale, x: Tensor, what: str) -> list[float]:
    """One float32 scale per head of ``x`` (``[..., H, S, D]``), as ``attention_ops.head_scale``
    repeats a per-head list (or the one scale of a per-tensor op); a list of another head count
    raises as it does."""
    if not isinstance(scale, (list, tuple)):
        return [_f32(scale)] * x.shape[-3]
    rep = attention_ops.head_repeats(tuple(x.shape), scale, what)
    return [_f32(s) for s in scale for _ in range(rep)]


def call(op, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,  # noqa: ANN001
         sm_scale: float, scale_q: Scale, scale_k: Scale, scale_v: Scale, scale_p: float, scale_o: float,
         fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """``op`` (``torch.ops.fp8fx_cpp.sdpa_fp8``) on ``fp8fx::sdpa``'s arguments: the mask made
    additive float32 (a boolean mask's dropped keys ``-inf``), the scales as the float32 numbers
    the torch lowering uses (per tensor: ``s_q · s_k`` and ``s_p · s_v`` in double, then rounded,
    as a Python float multiplies a float32 tensor; per head: the float32 products)."""
    h, hk = q.shape[-3], k.shape[-3]
    if attn_mask is not None:
        attn_mask = (torch.where(attn_mask, 0.0, float("-inf")) if attn_mask.dtype == torch.bool
                     else attn_mask.float())
    heads = isinstance(scale_q, (list, tuple))
    sq, sk, sv = _per_head(scale_q, q, "query"), _per_head(scale_k, k, "key"), _per_head(scale_v, v, "value")
    if heads:  # float32 [H, 1, 1] tensors multiplied in float32
        # the key and value scales over the query heads: each KV head's scale for its r query heads
        skq, svq = ([s for s in t for _ in range(h // hk)] for t in (sk, sv))
        qk = [_f32(a * b) for a, b in zip(sq, skq)]
        pv = [_f32(_f32(scale_p) * b) for b in svq]
    else:
        qk = [_f32(float(scale_q) * float(scale_k))] * h
        pv = [_f32(float(scale_p) * float(scale_v))] * h
    fmt = 0 if fp8_dtype == torch.float8_e4m3fn else 1
    return op(q, k, v, attn_mask, bool(is_causal), float(sm_scale), sq, sk, sv, qk, pv, float(scale_p),
              float(scale_o), float(fp8_max), fmt)

"""``sdpa_fp8``: the CPU kernel of ``fp8fx::sdpa`` (prefill and decode).

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

``fp8fx_cpp::sdpa_fp8_kv(q, k8, v8, dk, dv, kv_dtype, ...)`` is the same on FP8 caches: K and V
are ``fp8fx::dequant(k8, dk[h], kv_dtype)`` computed inside (the FP8 bytes widened by integer
ops, times the read's scale in float32, rounded to the read's dtype: float32, bfloat16 or
float16, bit for bit the read; ``fp8fx_cpp::kv_floats`` is that step alone), so a graph that
reads an FP8 KV cache hands the kernel the cache itself.

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

__all__ = ["ROWS", "ENTRY", "SCHEMA", "SCHEMA_KV", "SCHEMA_KV_FLOATS", "KV_DTYPES", "call", "call_kv", "fake",
           "fake_kv", "fake_kv_floats"]

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

static inline __m256 bf16_round8(__m256 x) {
  // float32 -> bfloat16 -> float32, round to nearest even as c10::BFloat16; NaN stays NaN
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
  r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

template <int FMT>
static void kv_row(const uint8_t* __restrict p, int64_t n, float s, int dt, float* __restrict out) {
  // a cache read, fp8fx::dequant: float32(x8) * s in float32, rounded to the read's dtype
  // (dt 0 float32, 1 bfloat16, 2 float16) and widened back to float32
  codes_to_floats<FMT>(p, n, out);
  const __m256 sv = _mm256_set1_ps(s);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(out + k), sv);
    if (dt == 1) x = bf16_round8(x);
    else if (dt == 2) x = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm256_storeu_ps(out + k, x);
  }
  for (; k < n; ++k) {
    const float x = out[k] * s;
    out[k] = dt == 1 ? float(c10::BFloat16(x)) : (dt == 2 ? float(c10::Half(x)) : x);
  }
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

static at::Tensor kv_floats_of(const at::Tensor& x_in, const std::vector<float>& scale, int64_t dt,
                               const std::vector<float>* code_scale = nullptr, float mx = 0.0f, int fmt = 0) {
  // x_in FP8 [B, H_kv, S, D]: float32 of fp8fx::dequant(x_in, scale[h], dtype dt), head by head;
  // with code_scale, the FP8 codes of that read with code_scale[h] instead (one pass per row)
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(xt == at::kFloat8_e4m3fn || xt == at::kFloat8_e5m2,
              "sdpa_fp8_kv: the cache tensors must be float8_e4m3fn or float8_e5m2, got ", xt);
  TORCH_CHECK(x_in.dim() == 4, "sdpa_fp8_kv: 4-D caches [B, H_kv, S, D] expected, got ", x_in.sizes());
  TORCH_CHECK(dt >= 0 && dt <= 2, "sdpa_fp8_kv: kv_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  const int64_t heads = x_in.size(1), S = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK(int64_t(scale.size()) == heads, "sdpa_fp8_kv: ", heads, " cache scales expected, got ",
              scale.size());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(x.data_ptr());
  float* op = out.data_ptr<float>();
  const bool e4m3 = xt == at::kFloat8_e4m3fn;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(code_scale != nullptr ? D : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = (r / S) % heads;
      float* dst = code_scale != nullptr ? row.data() : op + r * D;
      if (e4m3) FP8FX_ISA(kv_row<0>(xp + r * D, D, scale[h], int(dt), dst));
      else FP8FX_ISA(kv_row<1>(xp + r * D, D, scale[h], int(dt), dst));
      if (code_scale == nullptr) continue;
      if (fmt == 0) FP8FX_ISA(codes_row<0>(dst, D, (*code_scale)[h], mx, op + r * D));
      else FP8FX_ISA(codes_row<1>(dst, D, (*code_scale)[h], mx, op + r * D));
    }
  });
  return out;
}

static at::Tensor sdpa_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& mask_in, bool causal, double sm_scale,
                            at::ArrayRef<double> sq_in, at::ArrayRef<double> sk_in, at::ArrayRef<double> sv_in,
                            at::ArrayRef<double> qk_in, at::ArrayRef<double> pv_in, double sp_in, double so_in,
                            double fp8_max, int64_t fmt, const std::vector<float>* dk = nullptr,
                            const std::vector<float>* dv = nullptr, int64_t kv_dtype = 0) {
  // dk/dv given: k_in and v_in are FP8 caches, read as fp8fx::dequant(x8, d[h], kv_dtype)
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
  const at::Tensor qf = q_in.to(at::kFloat).contiguous();
  at::Tensor qc = at::empty_like(qf), kc, vc;
  codes_of(qf, H, sq, mx, int(fmt), qc);
  if (dk != nullptr) {  // the cache read and the re-quantization, one pass per row
    kc = kv_floats_of(k_in, *dk, kv_dtype, &sk, mx, int(fmt));
    vc = kv_floats_of(v_in, *dv, kv_dtype, &sv, mx, int(fmt));
  } else {
    const at::Tensor kf = k_in.to(at::kFloat).contiguous(), vf = v_in.to(at::kFloat).contiguous();
    kc = at::empty_like(kf);
    vc = at::empty_like(vf);
    codes_of(kf, Hk, sk, mx, int(fmt), kc);
    codes_of(vf, Hk, sv, mx, int(fmt), vc);
  }
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

at::Tensor sdpa_fp8(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    const std::optional<at::Tensor>& mask_in, bool causal, double sm_scale,
                    at::ArrayRef<double> sq, at::ArrayRef<double> sk, at::ArrayRef<double> sv,
                    at::ArrayRef<double> qk, at::ArrayRef<double> pv, double sp, double so,
                    double fp8_max, int64_t fmt) {
  return sdpa_impl(q_in, k_in, v_in, mask_in, causal, sm_scale, sq, sk, sv, qk, pv, sp, so, fp8_max, fmt);
}

at::Tensor kv_floats(const at::Tensor& x8, at::ArrayRef<double> scale, int64_t dt) {
  TORCH_CHECK(g_level.load() >= 1, "kv_floats: no vector ISA selected (fp8fx.kernels.gemv sets it)");
  TORCH_CHECK(x8.dim() == 4, "kv_floats: a 4-D cache [B, H_kv, S, D] expected, got ", x8.sizes());
  return kv_floats_of(x8, floats(scale, x8.size(1), "scale"), dt);
}

at::Tensor sdpa_fp8_kv(const at::Tensor& q_in, const at::Tensor& k8, const at::Tensor& v8,
                       at::ArrayRef<double> dk, at::ArrayRef<double> dv, int64_t kv_dtype,
                       const std::optional<at::Tensor>& mask_in, bool causal, double sm_scale,
                       at::ArrayRef<double> sq, at::ArrayRef<double> sk, at::ArrayRef<double> sv,
                       at::ArrayRef<double> qk, at::ArrayRef<double> pv, double sp, double so,
                       double fp8_max, int64_t fmt) {
  // the FP8 cache read inside the kernel: no dequantized copy of the cache in the graph
  TORCH_CHECK(g_level.load() >= 1, "sdpa_fp8_kv: no vector ISA selected (fp8fx.kernels.gemv sets it)");
  TORCH_CHECK(k8.dim() == 4 && v8.dim() == 4, "sdpa_fp8_kv: 4-D caches [B, H_kv, S, D] expected, got ",
              k8.sizes(), " and ", v8.sizes());
  const std::vector<float> dkf = floats(dk, k8.size(1), "dk"), dvf = floats(dv, v8.size(1), "dv");
  return sdpa_impl(q_in, k8, v8, mask_in, causal, sm_scale, sq, sk, sv, qk, pv, sp, so, fp8_max, fmt, &dkf, &dvf,
                   kv_dtype);
}

TORCH_LIBRARY_FRAGMENT(fp8fx_cpp, m) {
  m.def("sdpa_fp8(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float sm_scale, float[] sq, "
        "float[] sk, float[] sv, float[] qk, float[] pv, float sp, float so, float fp8_max, int fmt) -> Tensor");
  m.def("sdpa_fp8_kv(Tensor q, Tensor k8, Tensor v8, float[] dk, float[] dv, int kv_dtype, Tensor? mask, "
        "bool causal, float sm_scale, float[] sq, float[] sk, float[] sv, float[] qk, float[] pv, float sp, "
        "float so, float fp8_max, int fmt) -> Tensor");
  m.def("kv_floats(Tensor x8, float[] scale, int kv_dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(fp8fx_cpp, CPU, m) {
  m.impl("sdpa_fp8", &sdpa_fp8);
  m.impl("sdpa_fp8_kv", &sdpa_fp8_kv);
  m.impl("kv_floats", &kv_floats);
}
"""

SCHEMA = "fp8fx_cpp::sdpa_fp8"
SCHEMA_KV = "fp8fx_cpp::sdpa_fp8_kv"
SCHEMA_KV_FLOATS = "fp8fx_cpp::kv_floats"
#: the dtypes a cache read (``fp8fx::dequant``) may return, as the kernels' ``kv_dtype`` codes
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, sm_scale: float, sq, sk, sv,  # noqa: ANN001
         qk, pv, sp: float, so: float, fp8_max: float, fmt: int) -> Tensor:
    return q.new_empty(q.shape)


def fake_kv(q: Tensor, k8: Tensor, v8: Tensor, dk, dv, kv_dtype: int, mask: Optional[Tensor], causal: bool,  # noqa: ANN001
            sm_scale: float, sq, sk, sv, qk, pv, sp: float, so: float, fp8_max: float, fmt: int) -> Tensor:
    return q.new_empty(q.shape)


def fake_kv_floats(x8: Tensor, scale, kv_dtype: int) -> Tensor:  # noqa: ANN001
    return x8.new_empty(x8.shape, dtype=torch.float32)


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


def _scale_lists(q: Tensor, k: Tensor, v: Tensor, scale_q: Scale, scale_k: Scale, scale_v: Scale,
                 scale_p: float) -> tuple[list[float], ...]:
    """``(sq, sk, sv, qk, pv)``: the float32 numbers the torch lowering multiplies or divides by
    (per tensor: ``s_q · s_k`` and ``s_p · s_v`` in double, then rounded, as a Python float
    multiplies a float32 tensor; per head: the float32 products)."""
    h, hk = q.shape[-3], k.shape[-3]
    sq, sk, sv = _per_head(scale_q, q, "query"), _per_head(scale_k, k, "key"), _per_head(scale_v, v, "value")
    if isinstance(scale_q, (list, tuple)):  # float32 [H, 1, 1] tensors multiplied in float32
        # the key and value scales over the query heads: each KV head's scale for its r query heads
        skq, svq = ([s for s in t for _ in range(h // hk)] for t in (sk, sv))
        qk = [_f32(a * b) for a, b in zip(sq, skq)]
        pv = [_f32(_f32(scale_p) * b) for b in svq]
    else:
        qk = [_f32(float(scale_q) * float(scale_k))] * h
        pv = [_f32(float(scale_p) * float(scale_v))] * h
    return sq, sk, sv, qk, pv


def _additive(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask as the kernel takes it: additive float32 (a boolean mask's dropped keys ``-inf``)."""
    if attn_mask is None:
        return None
    return torch.where(attn_mask, 0.0, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask.float()


def call(op, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,  # noqa: ANN001
         sm_scale: float, scale_q: Scale, scale_k: Scale, scale_v: Scale, scale_p: float, scale_o: float,
         fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """``op`` (``torch.ops.fp8fx_cpp.sdpa_fp8``) on ``fp8fx::sdpa``'s arguments: the mask made
    additive float32, the scales as :func:`_scale_lists` gives them."""
    sq, sk, sv, qk, pv = _scale_lists(q, k, v, scale_q, scale_k, scale_v, scale_p)
    fmt = 0 if fp8_dtype == torch.float8_e4m3fn else 1
    return op(q, k, v, _additive(attn_mask), bool(is_causal), float(sm_scale), sq, sk, sv, qk, pv, float(scale_p),
              float(scale_o), float(fp8_max), fmt)


def call_kv(op, q: Tensor, k8: Tensor, v8: Tensor, k_read: Scale, v_read: Scale, kv_dtype: torch.dtype,  # noqa: ANN001
            attn_mask: Optional[Tensor], is_causal: bool, sm_scale: float, scale_q: Scale, scale_k: Scale,
            scale_v: Scale, scale_p: float, scale_o: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """``op`` (``torch.ops.fp8fx_cpp.sdpa_fp8_kv``): :func:`call` on ``k = fp8fx::dequant(k8,
    k_read, kv_dtype)`` and ``v = fp8fx::dequant(v8, v_read, kv_dtype)``, the cache read done
    inside the kernel (``k_read``/``v_read`` a float, or one per KV head as ``dequant.heads``)."""
    sq, sk, sv, qk, pv = _scale_lists(q, k8, v8, scale_q, scale_k, scale_v, scale_p)
    dk, dv = _per_head(k_read, k8, "KV-cache read"), _per_head(v_read, v8, "KV-cache read")
    fmt = 0 if fp8_dtype == torch.float8_e4m3fn else 1
    return op(q, k8, v8, dk, dv, KV_DTYPES[kv_dtype], _additive(attn_mask), bool(is_causal), float(sm_scale),
              sq, sk, sv, qk, pv, float(scale_p), float(scale_o), float(fp8_max), fmt)

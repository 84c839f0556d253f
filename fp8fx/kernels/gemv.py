"""``gemv_fp8``: the few-row product of float32 activations and an FP8 weight, streaming its bytes.

``gemv_fp8(x, w) -> y``: ``x`` float32 ``[M, K]``, ``w`` a ``float8_e4m3fn`` / ``float8_e5m2``
weight ``[N, K]``; ``y[m, n] = sum_k x[m, k] * float(w[n, k])`` in float32, un-scaled (no weight
or activation scale, no bias). The primitive of the decode path (``M`` up to a few tokens) of
``fp8fx::linear`` (eager kernel and Inductor lowering) and of any op that multiplies by an FP8
weight: the caller quantizes ``x`` (its values are then FP8 values, exact in float32) and
applies its scales to ``y``.

Why a C++ kernel
----------------
At ``M == 1`` the product is bound by the bytes it reads: an FP8 weight is half a bfloat16 one,
so the limit is half of bfloat16's time. Reaching it needs the FP8 -> float32 conversion to run
in registers as the bytes stream by. Inductor's reduction over an integer-op conversion does so
on AVX512, but on an AVX2 CPU its int8/int32 vector conversions are scalar loops through stack
buffers and the reduction ran at 4.5x bfloat16's time (``benchmarks/README.md``). The kernel
here is a short C++ loop compiled once per machine (``torch.utils.cpp_extension.load_inline``,
cached on disk by torch; the same compiler Inductor needs), with one code body instantiated for
AVX512 and for AVX2 (``#pragma GCC target``; nothing else of the file is built for a newer
ISA). Which one runs follows ``torch.backends.cpu.get_cpu_capability()``, so
``ATEN_CPU_CAPABILITY=avx2`` selects the AVX2 body on an AVX512 machine as it does ATen's.

Per 16 weights: one 16-byte load, sign-extend to int16, shift and mask into the float16 bit
pattern (E5M2: ``code << 8``; E4M3: ``(code << 7) & 0xBF80``, the value times ``2**-8``), the
hardware float16 -> float32 conversion (F16C; exact for every code, float16 subnormals
included, whatever the denormal mode), then one FMA per activation row. One activation row
(decode at batch 1) reads each weight row from start to end, 64 weights a step into four sets
of accumulators, and the rows one after another: the weight streams through memory in address
order, which the hardware prefetcher follows (on an AVX512 EPYC that doubled the rate at which
SmolLM2's out-of-cache weights streamed, against the earlier 8-row interleave;
``benchmarks/decode_gemv.py``). More activation rows take tiles of 4 weight rows x 4 activation
rows (AVX512) or 2 x 4 (AVX2), which keep the converted weight in registers while each
activation row is multiplied. Float32 partial sums per lane, added at the end of the row
(float32 accumulation, only the summation order differs from a float32 ``matmul``). E4M3's
factor ``2**8`` multiplies the finished sum (exact: a power of two, and sums of FP8 products are
far from float32's denormal and overflow ranges). E4M3 NaN codes (``0x7F``, ``0xFF``) are found
on the fly (a byte max of ``code & 0x7F`` per row, two instructions per 16 weights) and make
their output column NaN, as ``NaN * q`` does in the float32 product; E5M2's inf and NaN codes
are float16 inf and NaN already. Rows are split over ATen's intra-op threads.

Fallback
--------
Without a working compiler, on a CPU without AVX2, or with ``FP8FX_CPP_KERNELS=0`` in the
environment, ``gemv_fp8`` computes the same product by torch ops (:func:`gemv_fp8_torch`: the
weight converted in cache-sized row blocks by :mod:`fp8fx.kernels.linear`'s integer-op
conversion, a float32 ``mm`` per block). :func:`status` says which path is in use and why.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..errors import QuantizationError
from ..fp8 import FORMATS
from . import attention_cpp

__all__ = ["gemv_fp8", "gemv_fp8_torch", "available", "status", "cpp_op", "cpp_dequant_op", "qgemv_op",
           "QGEMV_MODES", "sdpa_op", "sdpa_kv_op", "codes"]

_ENV_SWITCH = "FP8FX_CPP_KERNELS"  # "0": never build or use the C++ kernel
_ISA_LEVEL = {"AVX512": 2, "AVX2": 1}  # torch's CPU capability -> the kernel body to run
_BLOCK_ELEMS = 1 << 20  # fallback: weight elements converted per block

# One kernel body, instantiated once per ISA inside a ``#pragma GCC target`` region. The ISA
# section above it defines: VF (float vector), LANES, VPC (vectors per 16 weights),
# MR x NR (tile, for more than one activation row), zero(), loadx(p), fma(a, b, c), add(a, b),
# hsum(v), and cvt<FMT>(p, out, nanmax).
_BODY = r"""
// software prefetch distance in bytes ahead of the read position: in the interleaved tiles a
// few-row product does too little work per byte for the hardware prefetcher alone to keep the
// streams in flight (on a Zen 3 EPYC it lifted out-of-cache FP8 weights from about 4.3 to
// 6.5 GB/s at SmolLM2's sizes; 1024 and 4096 bytes were no better); row1's address-order read
// is one stream the hardware prefetcher follows, and gains little from it
constexpr int64_t PF = 2048;
template <int FMT, int MRT, int NRT>
static inline __attribute__((always_inline)) void chunk(
    const float* __restrict x, int64_t xs, const uint8_t* __restrict w, int64_t ws,
    VF (&acc)[MRT][NRT], __m128i (&nanmax)[NRT]) {
  VF wv[NRT][VPC];
  for (int n = 0; n < NRT; ++n) cvt<FMT>(w + n * ws, wv[n], nanmax[n]);
  for (int m = 0; m < MRT; ++m) {
    for (int v = 0; v < VPC; ++v) {
      const VF xv = loadx(x + m * xs + v * LANES);
      for (int n = 0; n < NRT; ++n) acc[m][n] = fma(xv, wv[n][v], acc[m][n]);
    }
  }
}

template <int FMT, int MRT, int NRT>
static void tile(const float* __restrict x, int64_t K, const uint8_t* __restrict w,
                 float* __restrict y, int64_t N, float factor) {
  VF acc[MRT][NRT];
  __m128i nanmax[NRT];
  for (int n = 0; n < NRT; ++n) {
    nanmax[n] = _mm_setzero_si128();
    for (int m = 0; m < MRT; ++m) acc[m][n] = zero();
  }
  const int64_t kfull = K & ~int64_t(15);
  for (int64_t k = 0; k < kfull; k += 16) {
    if ((k & 63) == 0)
      for (int n = 0; n < NRT; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + n * K + k + PF), _MM_HINT_T0);
    chunk<FMT, MRT, NRT>(x + k, K, w + k, K, acc, nanmax);
  }
  if (kfull < K) {  // the last, partial chunk: zero-padded copies
    const int64_t rest = K - kfull;
    alignas(64) uint8_t wtail[NRT][16];
    alignas(64) float xtail[MRT][16];
    for (int n = 0; n < NRT; ++n) {
      std::memset(wtail[n], 0, 16);
      std::memcpy(wtail[n], w + n * K + kfull, rest);
    }
    for (int m = 0; m < MRT; ++m)
      for (int j = 0; j < 16; ++j) xtail[m][j] = j < rest ? x[m * K + kfull + j] : 0.0f;
    chunk<FMT, MRT, NRT>(&xtail[0][0], 16, &wtail[0][0], 16, acc, nanmax);
  }
  for (int n = 0; n < NRT; ++n) {
    const bool nan = FMT == 0 &&
        _mm_movemask_epi8(_mm_cmpeq_epi8(nanmax[n], _mm_set1_epi8(0x7F))) != 0;
    for (int m = 0; m < MRT; ++m)
      y[m * N + n] = nan ? std::numeric_limits<float>::quiet_NaN() : hsum(acc[m][n]) * factor;
  }
}

template <int FMT, int NRT>
static void rows(const float* x, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N,
                 float factor) {
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (M - m0 >= MR ? MR : M - m0) {
      case 1: tile<FMT, 1, NRT>(xm, K, w, ym, N, factor); break;
      case 2: tile<FMT, 2, NRT>(xm, K, w, ym, N, factor); break;
      case 3: tile<FMT, 3, NRT>(xm, K, w, ym, N, factor); break;
      default: tile<FMT, MR, NRT>(xm, K, w, ym, N, factor); break;
    }
  }
}

template <int FMT, int NRT>
static void run_tiles(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                      float* y, float factor) {
  const int64_t blocks = (N + NRT - 1) / NRT;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, NRT * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NRT;
      if (n0 + NRT <= N) {
        rows<FMT, NRT>(x, M, K, w + n0 * K, y + n0, N, factor);
      } else {
        for (int64_t n = n0; n < N; ++n) rows<FMT, 1>(x, M, K, w + n * K, y + n, N, factor);
      }
    }
  });
}

// one activation row: each weight row read start to end (64 codes a step, four accumulator
// sets), rows one after another, so that the weight streams through memory in address order;
// on an AVX512 EPYC qgemv read SmolLM2's out-of-cache FP8 weights at 8.9 GB/s this way where 8
// rows interleaved 16 codes at a time reached 4.6 (benchmarks/decode_gemv.py)
template <int FMT>
static void row1(const float* __restrict x, int64_t K, const uint8_t* __restrict w,
                 float* __restrict y, float factor) {
  VF acc[4][VPC];
  __m128i nanmax = _mm_setzero_si128();
  for (int j = 0; j < 4; ++j)
    for (int v = 0; v < VPC; ++v) acc[j][v] = zero();
  const int64_t kline = K & ~int64_t(63);
  for (int64_t k = 0; k < kline; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + PF), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      VF wv[VPC];
      cvt<FMT>(w + k + 16 * j, wv, nanmax);
      for (int v = 0; v < VPC; ++v)
        acc[j][v] = fma(loadx(x + k + 16 * j + v * LANES), wv[v], acc[j][v]);
    }
  }
  int64_t k = kline;
  for (; k + 16 <= K; k += 16) {
    VF wv[VPC];
    cvt<FMT>(w + k, wv, nanmax);
    for (int v = 0; v < VPC; ++v) acc[0][v] = fma(loadx(x + k + v * LANES), wv[v], acc[0][v]);
  }
  if (k < K) {  // the last, partial chunk: zero-padded copies
    alignas(64) uint8_t wtail[16] = {0};
    alignas(64) float xtail[16] = {0};
    std::memcpy(wtail, w + k, K - k);
    std::memcpy(xtail, x + k, (K - k) * sizeof(float));
    VF wv[VPC];
    cvt<FMT>(wtail, wv, nanmax);
    for (int v = 0; v < VPC; ++v) acc[0][v] = fma(loadx(xtail + v * LANES), wv[v], acc[0][v]);
  }
  VF sum = zero();
  for (int v = 0; v < VPC; ++v)
    sum = add(sum, add(add(acc[0][v], acc[1][v]), add(acc[2][v], acc[3][v])));
  const bool nan = FMT == 0 &&
      _mm_movemask_epi8(_mm_cmpeq_epi8(nanmax, _mm_set1_epi8(0x7F))) != 0;
  *y = nan ? std::numeric_limits<float>::quiet_NaN() : hsum(sum) * factor;
}

template <int FMT>
static void run(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* y,
                float factor) {
  if (M == 1) {
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) row1<FMT>(x, K, w + n * K, y + n, factor);
    });
  } else {
    run_tiles<FMT, NR>(x, M, K, w, N, y, factor);
  }
}

template <int FMT>
static void codes_to_floats(const uint8_t* __restrict p, int64_t n, float* __restrict out) {
  // n FP8 codes -> their float32 values, 16 at a time (cvt yields x8 / 256 for E4M3: exact)
  const VF vf = set1(FMT == 0 ? 256.0f : 1.0f);
  alignas(64) uint8_t wt[16];
  alignas(64) float ot[16];
  for (int64_t k = 0; k < n; k += 16) {
    const bool tail = k + 16 > n;
    const uint8_t* src = p + k;
    if (tail) {
      std::memset(wt, 0, 16);
      std::memcpy(wt, src, n - k);
      src = wt;
    }
    __m128i nanmax = _mm_setzero_si128();
    VF v[VPC];
    cvt<FMT>(src, v, nanmax);
    float* dst = tail ? ot : out + k;
    for (int j = 0; j < VPC; ++j) storeu(dst + j * LANES, mul(v[j], vf));
    if (FMT == 0 && _mm_movemask_epi8(_mm_cmpeq_epi8(nanmax, _mm_set1_epi8(0x7F))) != 0) {
      for (int j = 0; j < 16; ++j)  // E4M3 NaN codes: rare, fixed one by one
        if ((src[j] & 0x7F) == 0x7F) dst[j] = std::numeric_limits<float>::quiet_NaN();
    }
    if (tail) std::memcpy(out + k, ot, (n - k) * sizeof(float));
  }
}

template <int FMT>
static void dequant_rows(const uint8_t* w, int64_t n0, int64_t n1, int64_t K, float* out) {
  for (int64_t n = n0; n < n1; ++n) codes_to_floats<FMT>(w + n * K, K, out + n * K);
}

template <int FMT>
static void dequant_rows_bf16(const uint8_t* w, int64_t n0, int64_t n1, int64_t K, uint16_t* out) {
  // through a float32 buffer that stays in L1; every FP8 value (NaN and inf too) is exact in
  // bfloat16, so its float32 pattern's low 16 bits are zero and the high half is the bfloat16
  constexpr int64_t CH = 512;
  alignas(64) float buf[CH];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k0 = 0; k0 < K; k0 += CH) {
      const int64_t len = std::min<int64_t>(CH, K - k0);
      codes_to_floats<FMT>(w + n * K + k0, len, buf);
      uint16_t* o = out + n * K + k0;
      for (int64_t j = 0; j < len; ++j) {
        uint32_t bits;
        std::memcpy(&bits, buf + j, sizeof bits);
        o[j] = uint16_t(bits >> 16);
      }
    }
  }
}

// the weight's values, written out in float32 (out_bf16 false) or bfloat16 (true)
static void dequant(int fmt, const uint8_t* w, int64_t N, int64_t K, void* out, bool out_bf16) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (out_bf16) {
      auto* o = static_cast<uint16_t*>(out);
      if (fmt == 0) dequant_rows_bf16<0>(w, n0, n1, K, o); else dequant_rows_bf16<1>(w, n0, n1, K, o);
    } else {
      auto* o = static_cast<float*>(out);
      if (fmt == 0) dequant_rows<0>(w, n0, n1, K, o); else dequant_rows<1>(w, n0, n1, K, o);
    }
  });
}

static void gemv(int fmt, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                 float* y, float factor) {
  if (fmt == 0) run<0>(x, M, K, w, N, y, factor); else run<1>(x, M, K, w, N, y, factor);
}
"""

_AVX512 = r"""
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
namespace isa_avx512 {
typedef __m512 VF;
constexpr int LANES = 16, VPC = 1, MR = 4, NR = 4;
static inline VF zero() { return _mm512_setzero_ps(); }
static inline VF loadx(const float* p) { return _mm512_loadu_ps(p); }
static inline VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
static inline VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline VF set1(float f) { return _mm512_set1_ps(f); }
static inline void storeu(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
template <int FMT>
static inline void cvt(const uint8_t* p, VF* out, __m128i& nanmax) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i h = _mm256_cvtepi8_epi16(b);
  if (FMT == 0) {
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(short(0xBF80)));
    nanmax = _mm_max_epu8(nanmax, _mm_and_si128(b, _mm_set1_epi8(0x7F)));
  } else {
    h = _mm256_slli_epi16(h, 8);
  }
  out[0] = _mm512_cvtph_ps(h);
}
%BODY%
}  // namespace isa_avx512
#pragma GCC pop_options
"""

_AVX2 = r"""
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
typedef __m256 VF;
// NR 2: more rows' converted weights (2 vectors each), accumulators and NaN maxima need more
// than AVX2's 16 vector registers
constexpr int LANES = 8, VPC = 2, MR = 4, NR = 2;
static inline VF zero() { return _mm256_setzero_ps(); }
static inline VF loadx(const float* p) { return _mm256_loadu_ps(p); }
static inline VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline VF set1(float f) { return _mm256_set1_ps(f); }
static inline void storeu(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline float hsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
template <int FMT>
static inline void cvt(const uint8_t* p, VF* out, __m128i& nanmax) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i h = _mm256_cvtepi8_epi16(b);
  if (FMT == 0) {
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(short(0xBF80)));
    nanmax = _mm_max_epu8(nanmax, _mm_and_si128(b, _mm_set1_epi8(0x7F)));
  } else {
    h = _mm256_slli_epi16(h, 8);
  }
  out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
%BODY%
}  // namespace isa_avx2
#pragma GCC pop_options
"""

_ENTRY = r"""
static std::atomic<int> g_level{0};

void set_level(int64_t level) { g_level.store(int(level)); }

// one call in the body of the selected ISA (AVX512 at level 2, AVX2 at level 1)
#define FP8FX_ISA(call) do { if (g_level.load() >= 2) { isa_avx512::call; } else { isa_avx2::call; } } while (0)

at::Tensor gemv_fp8(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "gemv_fp8: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "gemv_fp8: x [M, K] and w [N, K] expected, got ", x_in.sizes(), " and ",
              w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "gemv_fp8: x must be float32");
  const auto wt = w_in.scalar_type();
  TORCH_CHECK(wt == at::kFloat8_e4m3fn || wt == at::kFloat8_e5m2,
              "gemv_fp8: w must be float8_e4m3fn or float8_e5m2");
  const int level = g_level.load();
  TORCH_CHECK(level >= 1, "gemv_fp8: no vector ISA selected (fp8fx.kernels.gemv sets it)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const int fmt = wt == at::kFloat8_e4m3fn ? 0 : 1;
  const float factor = fmt == 0 ? 256.0f : 1.0f;
  const auto* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  FP8FX_ISA(gemv(fmt, x.data_ptr<float>(), M, K, wp, N, y.data_ptr<float>(), factor));
  return y;
}

static at::Tensor convert_weight(const at::Tensor& w_in, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.dim() == 2, name, ": a 2-D CPU weight");
  const auto wt = w_in.scalar_type();
  TORCH_CHECK(wt == at::kFloat8_e4m3fn || wt == at::kFloat8_e5m2,
              name, ": w must be float8_e4m3fn or float8_e5m2");
  const int level = g_level.load();
  TORCH_CHECK(level >= 1, name, ": no vector ISA selected (fp8fx.kernels.gemv sets it)");
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  if (N == 0 || K == 0) return out;
  const int fmt = wt == at::kFloat8_e4m3fn ? 0 : 1;
  const auto* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  FP8FX_ISA(dequant(fmt, wp, N, K, out.data_ptr(), dtype == at::kBFloat16));
  return out;
}

at::Tensor fp8_to_float32(const at::Tensor& w) { return convert_weight(w, at::kFloat, "fp8_to_float32"); }

at::Tensor fp8_to_bfloat16(const at::Tensor& w) {
  return convert_weight(w, at::kBFloat16, "fp8_to_bfloat16");
}

// qgemv: the whole few-row FP8 Linear in one call (quantization of x, GEMV, epilogue).
// mode 0: static scale x_scale; 1: one dynamic scale per row; 2: one per tensor; 3: x not
// quantized (weight-only). The float32 operations and their order are those of the torch
// paths (fp8fx.kernels.linear.linear_fast, fp8fx.kernels.schemes.scaled_linear_fast):
// q = fp8(clamp(float(x) / s, -max, max)); amax NaN-propagating, floored at amax_floor;
// y = acc * (s_x * s_w[n]) (static) or (acc * s_w[n]) * s_x[m] (dynamic), + bias, cast.
template <typename T>
static void quant_rows(const T* x, int64_t M, int64_t K, int mode, float static_scale,
                       float fp8_max, float amax_floor, bool e4m3, float* q, float* sx) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto row_amax = [&](const T* xr, int64_t n) {
    float amax = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
      const float a = std::fabs(float(xr[k]));
      if (std::isnan(a)) return nan;
      if (a > amax) amax = a;
    }
    return amax;
  };
  auto to_scale = [&](float amax) {
    return std::isnan(amax) ? nan : std::max(amax, amax_floor) / fp8_max;
  };
  float tensor_scale = static_scale;
  std::vector<float> wide(mode == 3 ? 0 : K);
  if (mode == 2) tensor_scale = to_scale(row_amax(x, M * K));
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    float* qr = q + m * K;
    if (mode == 3) {
      for (int64_t k = 0; k < K; ++k) qr[k] = float(xr[k]);
      sx[m] = 1.0f;
      continue;
    }
    const float s = mode == 1 ? to_scale(row_amax(xr, K)) : tensor_scale;
    sx[m] = s;
    // widened, then codes_row: the cast's codes bit for bit (NaN stays NaN) by vector ops
    for (int64_t k = 0; k < K; ++k) wide[k] = float(xr[k]);
    if (e4m3) FP8FX_ISA(codes_row<0>(wide.data(), K, s, fp8_max, qr));
    else FP8FX_ISA(codes_row<1>(wide.data(), K, s, fp8_max, qr));
  }
}

at::Tensor qgemv(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& w_scale,
                 const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias,
                 double fp8_max, int64_t mode, double amax_floor) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "qgemv: a 2-D CPU x");
  TORCH_CHECK(mode >= 0 && mode <= 3, "qgemv: mode must be 0..3, got ", mode);
  TORCH_CHECK((mode == 0) == x_scale.has_value(), "qgemv: x_scale goes with mode 0 only");
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "qgemv: x must be float32, bfloat16 or float16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w_in.size(0);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == K, "qgemv: w [N, K] expected");
  const at::Tensor ws = w_scale.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(ws.numel() == 1 || ws.numel() == N, "qgemv: w_scale must be one value or [N]");
  const bool e4m3 = w_in.scalar_type() == at::kFloat8_e4m3fn;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kFloat));
  std::vector<float> sx(std::max<int64_t>(M, 1));
  const float s0 = mode == 0 ? x_scale->to(at::kFloat).item<float>() : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "qgemv", [&] {
    quant_rows<scalar_t>(x.data_ptr<scalar_t>(), M, K, int(mode), s0, float(fp8_max),
                         float(amax_floor), e4m3, q.data_ptr<float>(), sx.data());
  });
  const at::Tensor acc = gemv_fp8(q, w_in);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "qgemv: bias must have N values");
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* a = acc.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  const bool per_channel = ws.numel() != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "qgemv_out", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const float swn = wsp[per_channel ? n : 0];
        float v = a[m * N + n];
        if (mode == 0) v *= sx[m] * swn;
        else if (mode == 3) v *= swn;
        else v = (v * swn) * sx[m];
        if (bp) v += bp[n];
        yp[m * N + n] = scalar_t(v);
      }
    }
  });
  return y;
}

// fp8_codes: the FP8 codes of x / scale as float32 values (saturated at fp8_max, rounded to
// nearest even), scale one value or one per row: numerics.quantize_fp32(x, s).float(), the
// activation quantization of a prefill GEMM, vectorized (Inductor's float -> FP8 cast is scalar
// under AVX2)
at::Tensor fp8_codes(const at::Tensor& x_in, const at::Tensor& scale, double fp8_max, int64_t fmt) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "fp8_codes: a 2-D CPU x");
  TORCH_CHECK(fmt == 0 || fmt == 1, "fp8_codes: fmt must be 0 (E4M3) or 1 (E5M2)");
  const int level = g_level.load();
  TORCH_CHECK(level >= 1, "fp8_codes: no vector ISA selected (fp8fx.kernels.gemv sets it)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous().reshape({-1});
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(s.numel() == 1 || s.numel() == M, "fp8_codes: scale must be one value or one per row");
  at::Tensor out = at::empty({M, K}, x.options());
  if (M == 0 || K == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool per_row = s.numel() != 1;
  const float mx = float(fp8_max);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float sm = sp[per_row ? m : 0];
      if (fmt == 0) FP8FX_ISA(codes_row<0>(xp + m * K, K, sm, mx, op + m * K));
      else FP8FX_ISA(codes_row<1>(xp + m * K, K, sm, mx, op + m * K));
    }
  });
  return out;
}

TORCH_LIBRARY(fp8fx_cpp, m) {
  m.def("fp8_codes(Tensor x, Tensor scale, float fp8_max, int fmt) -> Tensor");
  m.def("qgemv(Tensor x, Tensor w, Tensor w_scale, Tensor? x_scale, Tensor? bias, float fp8_max, "
        "int mode, float amax_floor) -> Tensor");
  m.def("gemv_fp8(Tensor x, Tensor w) -> Tensor");
  m.def("fp8_to_float32(Tensor w) -> Tensor");
  m.def("fp8_to_bfloat16(Tensor w) -> Tensor");
  m.def("set_level(int level) -> ()");
}
TORCH_LIBRARY_IMPL(fp8fx_cpp, CPU, m) {
  m.impl("gemv_fp8", &gemv_fp8);
  m.impl("qgemv", &qgemv);
  m.impl("fp8_to_float32", &fp8_to_float32);
  m.impl("fp8_to_bfloat16", &fp8_to_bfloat16);
  m.impl("fp8_codes", &fp8_codes);
}
TORCH_LIBRARY_IMPL(fp8fx_cpp, CatchAll, m) { m.impl("set_level", &set_level); }
"""

_HEADER = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
"""


def _source() -> str:
    body = _BODY + attention_cpp.ROWS
    return (_HEADER + _AVX512.replace("%BODY%", body) + _AVX2.replace("%BODY%", body)
            + _ENTRY + attention_cpp.ENTRY)


_NAME = "fp8fx_gemv_" + hashlib.sha256(_source().encode()).hexdigest()[:12]


def _isa_level() -> tuple[int, str]:
    """(kernel body to run: 2 AVX512, 1 AVX2, 0 none, why) from torch's CPU capability."""
    cap = torch.backends.cpu.get_cpu_capability()
    level = _ISA_LEVEL.get(cap, 0)
    return level, f"CPU capability {cap}"


_LOADED: list = []  # _build()'s result, once: a plain global, so that dynamo tracing a function
# that asks for an op reads it (a functools.cache wrapper would be traced through)


def _load() -> tuple[Optional[object], str]:
    """(the ``torch.ops.fp8fx_cpp`` namespace or None, a sentence saying which path and why)."""
    if not _LOADED:
        _LOADED.append(_build())
    return _LOADED[0]


def _build() -> tuple[Optional[object], str]:
    """(the ``torch.ops.fp8fx_cpp`` namespace or None, a sentence saying which path and why).

    Built on the first call in a process (the build itself is cached on disk by torch)."""
    if os.environ.get(_ENV_SWITCH, "1") == "0":
        return None, f"torch fallback ({_ENV_SWITCH}=0)"
    level, why = _isa_level()
    if level == 0:
        return None, f"torch fallback ({why}: the C++ kernel needs AVX2 or AVX512)"
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline(name=_NAME, cpp_sources=[_source()], functions=None,
                    extra_cflags=["-O3"], is_python_module=False, verbose=False)
        ns = torch.ops.fp8fx_cpp
        ns.set_level(level)
        torch.library.register_fake("fp8fx_cpp::gemv_fp8")(_gemv_fake)
        torch.library.register_fake("fp8fx_cpp::fp8_to_float32")(_dequant_fake)
        torch.library.register_fake("fp8fx_cpp::fp8_to_bfloat16")(_dequant_bf16_fake)
        torch.library.register_fake("fp8fx_cpp::qgemv")(_qgemv_fake)
        torch.library.register_fake(attention_cpp.SCHEMA)(attention_cpp.fake)
        torch.library.register_fake(attention_cpp.SCHEMA_KV)(attention_cpp.fake_kv)
        torch.library.register_fake(attention_cpp.SCHEMA_KV_FLOATS)(attention_cpp.fake_kv_floats)
        torch.library.register_fake("fp8fx_cpp::fp8_codes")(_codes_fake)
    except Exception as exc:  # no compiler, a failed build: the torch ops do the same math
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
        warnings.warn(f"fp8fx: the C++ FP8 GEMV kernel could not be built ({reason}); using "
                      f"torch ops instead (slower at decode). Set {_ENV_SWITCH}=0 to skip the "
                      "build", RuntimeWarning, stacklevel=3)
        return None, f"torch fallback (build failed: {reason})"
    return ns, f"C++ kernel, {'AVX512' if level == 2 else 'AVX2'} body ({why})"


def _gemv_fake(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _qgemv_fake(x: Tensor, w: Tensor, w_scale: Tensor, x_scale: Optional[Tensor], bias: Optional[Tensor],
                fp8_max: float, mode: int, amax_floor: float) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


#: ``qgemv``'s ``mode`` per activation scheme (``fp8fx.kernels.schemes.ACTIVATIONS``)
QGEMV_MODES = {"static": 0, "token": 1, "tensor": 2, "none": 3}


def qgemv_op():
    """``torch.ops.fp8fx_cpp.qgemv`` or None where :func:`available` is False.

    ``qgemv(x [M, K] float32/bfloat16/float16, w [N, K] FP8, w_scale () or [N], x_scale, bias,
    fp8_max, mode, amax_floor) -> y [M, N]`` in ``x``'s dtype: a few-row FP8 Linear in one
    call, the activation's quantization (``mode`` from :data:`QGEMV_MODES`; ``x_scale`` the
    static scale for mode 0, else None; dynamic scales ``max(amax, amax_floor) / fp8_max``),
    the GEMV and the epilogue, with the float32 operations of the torch paths in their order
    (the C++ source's comment). One call instead of a quantization kernel, the GEMV and an
    epilogue kernel: at decode, per-call overhead is a large part of a small Linear's time."""
    ns = _load()[0]
    return None if ns is None else ns.qgemv


def _dequant_fake(w: Tensor) -> Tensor:
    return w.new_empty(w.shape, dtype=torch.float32)


def _dequant_bf16_fake(w: Tensor) -> Tensor:
    return w.new_empty(w.shape, dtype=torch.bfloat16)


def cpp_dequant_op(dtype: torch.dtype = torch.float32):
    """``torch.ops.fp8fx_cpp.fp8_to_float32`` or, for ``dtype`` bfloat16, ``fp8_to_bfloat16``
    (``(Tensor w) -> Tensor``: a 2-D FP8 weight's values in that dtype, exact in both, NaN codes
    NaN; the same conversion as the GEMV, written out), or None where :func:`available` is
    False. The bfloat16 one writes the operand of a bfloat16 GEMM directly, at half the bytes
    of float32 and without a cast kernel after it."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise QuantizationError(f"cpp_dequant_op: dtype must be float32 or bfloat16, got {dtype}")
    ns = _load()[0]
    if ns is None:
        return None
    return ns.fp8_to_float32 if dtype == torch.float32 else ns.fp8_to_bfloat16


def _codes_fake(x: Tensor, scale: Tensor, fp8_max: float, fmt: int) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def codes(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> Optional[Tensor]:
    """``numerics.quantize_fp32(x, scale, fp8_dtype, fp8_max).float()`` for a 2-D CPU ``x`` and a
    scale of one value or one per row (``[M, 1]``), bit for bit, by the C++ op
    ``fp8fx_cpp::fp8_codes`` (vectorized integer-op rounding); None where it is not built or
    does not apply (then the caller runs the torch ops)."""
    ns = _load()[0]
    if ns is None or x.device.type != "cpu" or x.dim() != 2 or fp8_dtype not in FORMATS:
        return None
    if not 0 < float(fp8_max) <= FORMATS[fp8_dtype].max:  # the rounding needs the clamp inside the grid
        return None
    if not isinstance(scale, Tensor) or scale.numel() not in (1, x.shape[0]) or scale.dim() > 2:
        return None
    return ns.fp8_codes(x, scale, float(fp8_max), 0 if fp8_dtype == torch.float8_e4m3fn else 1)


def sdpa_op():
    """``torch.ops.fp8fx_cpp.sdpa_fp8`` (:mod:`fp8fx.kernels.attention_cpp`), or None where
    :func:`available` is False."""
    ns = _load()[0]
    return None if ns is None else ns.sdpa_fp8


def sdpa_kv_op():
    """``torch.ops.fp8fx_cpp.sdpa_fp8_kv`` (``sdpa_fp8`` reading FP8 K/V caches itself), or None
    where :func:`available` is False."""
    ns = _load()[0]
    return None if ns is None else ns.sdpa_fp8_kv


def available() -> bool:
    """Whether the C++ kernel is built and in use (builds it on the first call)."""
    return _load()[0] is not None


def status() -> str:
    """Which path :func:`gemv_fp8` takes here, and why."""
    return _load()[1]


def cpp_op():
    """``torch.ops.fp8fx_cpp.gemv_fp8`` (schema ``gemv_fp8(Tensor x, Tensor w) -> Tensor``,
    CPU kernel in C++, fake kernel for tracing), or None where :func:`available` is False."""
    ns = _load()[0]
    return None if ns is None else ns.gemv_fp8


def _check(x: Tensor, w: Tensor) -> None:
    if w.dtype not in FORMATS:
        raise QuantizationError(f"gemv_fp8 got a {w.dtype} weight; it needs float8_e4m3fn or "
                                "float8_e5m2 (the FP8 weight itself, not a dequantized copy)")
    if x.dtype != torch.float32 or x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise QuantizationError(
            f"gemv_fp8 needs float32 x [M, K] and an FP8 weight [N, K]; got x {x.dtype} "
            f"{tuple(x.shape)} and w {tuple(w.shape)}: quantize x and pass it as float32 "
            "rows with the weight's in-features")


def gemv_fp8_torch(x: Tensor, w: Tensor) -> Tensor:
    """:func:`gemv_fp8` by torch ops: the weight converted in row blocks (integer ops, exact),
    a float32 ``mm`` per block, NaN codes' columns set to NaN."""
    from .linear import _TO_HALF, _convert_blocks, _nan_code_rows, has_nan_codes

    _check(x, w)
    n, k = w.shape
    y = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    if n == 0 or x.shape[0] == 0:
        return y
    if k == 0:
        return y.zero_()
    w = w.contiguous()
    for r0, r1, w32 in _convert_blocks(w, max(1, _BLOCK_ELEMS // k)):
        y[:, r0:r1] = torch.mm(x, w32.t())
    factor = _TO_HALF[w.dtype][2]
    if factor != 1.0:
        y.mul_(factor)
    if has_nan_codes(w):
        y.masked_fill_(_nan_code_rows(w), float("nan"))
    return y


def gemv_fp8(x: Tensor, w: Tensor) -> Tensor:
    """``x @ float(w)ᵀ`` in float32 (module docstring): ``x`` float32 ``[M, K]``, ``w`` FP8
    ``[N, K]``, result float32 ``[M, N]``, no scales applied. The C++ kernel where it is
    built (:func:`status`), else :func:`gemv_fp8_torch`; the two agree up to summation order."""
    _check(x, w)
    op = cpp_op() if x.device.type == "cpu" else None
    if op is None:
        return gemv_fp8_torch(x, w)
    return op(x, w)

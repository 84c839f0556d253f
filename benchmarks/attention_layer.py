"""One layer's FP8 attention on the CPU at a long prompt: where ``sdpa_cpu``'s time goes.

Side by side, one thread timed by its own CPU time, each compiled with Inductor (static shapes):

* ``fp32_sdpa``: ``F.scaled_dot_product_attention`` in float32, eager (the fused kernel);
* ``sdpa_cpu``: fp8fx's CPU lowering of ``fp8fx::sdpa`` (:mod:`fp8fx.backends.cpu_attention`),
  at a prompt the C++ kernel ``fp8fx_cpp::sdpa_fp8`` (:mod:`fp8fx.kernels.attention_cpp`);
* ``sdpa_cpu_torch``: the same lowering without the C++ kernel (its torch ops, the path taken
  where the extension cannot be built);
* ``p_round_cast``: the FP8 rounding of a probabilities-sized tensor, ``[B, H, S, S]``, as the
  ops write it (saturate, cast to float8 and back);
* ``p_round_grid``: the same rounding by integer ops on the float32 bits (round-to-nearest-even
  on the mantissa; ``round(x * 2**(m - emin)) / 2**(m - emin)`` below the smallest normal), with
  its bits compared against the cast's on every FP8 value, every midpoint, one float32 ulp
  either side of both and random values at nine scales (E4M3 and E5M2);
* ``softmax``: the softmax of that tensor.

Prints JSON rows and a table with each time's ratio to ``fp32_sdpa``.

    python benchmarks/attention_layer.py                   # SmolLM2's shape: 9 query / 3 KV heads, S 2040
    python benchmarks/attention_layer.py --seq 512 --isa avx2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuclass import cpu_class, emulate_isa  # noqa: E402

from fp8fx.fp8 import FORMATS  # noqa: E402

def fp8_grid(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x`` (already within ``±max``) rounded to the FP8 grid by float32/int32 ops."""
    fmt = FORMATS[fp8_dtype]
    m, emin = fmt.mantissa_bits, fmt.min_normal_exponent
    drop = 23 - m
    bits = x.view(torch.int32)
    odd = (bits >> drop) & 1
    normal = ((bits + ((1 << (drop - 1)) - 1) + odd) & ~((1 << drop) - 1)).view(torch.float32)
    q = 2.0 ** (m - emin)
    sub = torch.round(x * q) * (1.0 / q)
    return torch.where(x.abs() < 2.0 ** emin, sub, torch.where(torch.isnan(x), x, normal))


def grid_mismatches(fp8_dtype: torch.dtype) -> tuple[int, int]:
    """(values checked, values whose bits differ from the cast's)."""
    mx = FORMATS[fp8_dtype].max
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(1_000_000, generator=gen) * s for s in (1e-4, 1e-3, 0.01, 0.1, 1, 10, 100, 1e3, 3e4)]
    every = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    every = every[torch.isfinite(every)].unique()
    mids = (every[1:] + every[:-1]) / 2
    for t in (every, mids):
        parts += [t, torch.nextafter(t, torch.full_like(t, 1e9)), torch.nextafter(t, torch.full_like(t, -1e9))]
    parts.append(torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45]))
    x = torch.cat(parts).clamp(-mx, mx)
    want, got = x.to(fp8_dtype).float(), fp8_grid(x, fp8_dtype)
    same = (want.view(torch.int32) == got.view(torch.int32)) | (want.isnan() & got.isnan())
    return x.numel(), int((~same).sum())


def _ms(fn, *args, repeats: int) -> float:  # noqa: ANN001
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn(*args)
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def _without_cpp(gemv, fn):  # noqa: ANN001, ANN202
    """``fn`` traced and run with the C++ attention kernel unavailable."""
    def run(*args):  # noqa: ANN002, ANN202
        saved = gemv.sdpa_op
        gemv.sdpa_op = lambda: None
        try:
            return fn(*args)
        finally:
            gemv.sdpa_op = saved
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=2040)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--isa", choices=("native", "avx2"), default="native", help="avx2: emulate an AVX2-only CPU")
    args = p.parse_args(argv)
    emulate_isa(args.isa)
    torch.set_num_threads(1)
    from fp8fx.backends.cpu_attention import sdpa_cpu
    from fp8fx.kernels import gemv

    e4m3 = torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(0)
    s, h, hk, d = args.seq, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(1, n, s, d, generator=gen) for n in (h, hk, hk))
    probs = torch.rand(1, h, s, s, generator=gen)
    scales = (0.01, 0.01, 0.01, 1 / 448, 0.01, 448.0, e4m3)

    def fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x.mul(1 / scale).clamp(-448.0, 448.0)

    candidates = {
        "fp32_sdpa": (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
                      (q, k, v)),
        "sdpa_cpu": (torch.compile(lambda a, b, c: sdpa_cpu(a, b, c, None, 0.0, True, None, True, *scales)),
                     (q, k, v)),
        "sdpa_cpu_torch": (_without_cpp(gemv, torch.compile(
            lambda a, b, c: sdpa_cpu(a, b, c, None, 0.0, True, None, True, *scales))), (q, k, v)),
        "p_round_cast": (torch.compile(lambda x: fp8(x, 1 / 448).to(e4m3).float()), (probs,)),
        "p_round_grid": (torch.compile(lambda x: fp8_grid(fp8(x, 1 / 448), e4m3)), (probs,)),
        "softmax": (torch.compile(lambda x: torch.softmax(x, -1)), (probs,)),
    }
    rows, base = [], None
    for name, (fn, inputs) in candidates.items():
        ms = _ms(fn, *inputs, repeats=args.repeats)
        base = ms if base is None else base
        rows.append({"candidate": name, "ms": round(ms, 2), "vs_fp32_sdpa": round(ms / base, 2)})
        print(json.dumps(rows[-1]), flush=True)
    checks = {FORMATS[dt].name: grid_mismatches(dt) for dt in (torch.float8_e4m3fn, torch.float8_e5m2)}
    info = {"seq": s, "heads": h, "kv_heads": hk, "head_dim": d, "cpu_class": cpu_class(), "torch": torch.__version__,
            "grid_check": {k: {"values": n, "mismatches": bad} for k, (n, bad) in checks.items()}}
    print(json.dumps(info))
    print(f"\nB 1, H {h} / {hk} KV, S {s}, D {d}, causal, one thread; CPU: {info['cpu_class']}")
    print("| candidate | ms | x fp32_sdpa |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['candidate']} | {r['ms']:.1f} | {r['vs_fp32_sdpa']:.2f} |")
    for k, c in info["grid_check"].items():
        print(f"grid rounding vs cast, {k}: {c['mismatches']} of {c['values']} values differ")
    return 0 if all(c["mismatches"] == 0 for c in info["grid_check"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

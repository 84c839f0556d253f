"""One decode token's Linears, weights out of cache: FP8 against fp32 and bf16 ``F.linear``.

    python benchmarks/decode_gemv.py                    # SmolLM2-135M's 210 Linears, one thread
    python benchmarks/decode_gemv.py --isa avx2         # with an AVX2-only CPU emulated
    python benchmarks/decode_gemv.py --llama8b --layers 4

At one token a Linear reads its whole weight once, and a model's weights do not fit in cache,
so what decides decode speed is how fast each product streams its weight from memory. A
per-shape benchmark that repeats one weight (``linear.py``) keeps a 0.3-2 MB weight in cache
and misses that. Here every candidate runs, in one pass, the products of all the model's
Linears (``--layers`` layers of the model's shapes, each weight its own tensor, so the pass
reads ``weight_MB`` from memory) on one activation row, and the pass is timed:

* ``fp32``, ``bf16`` - ``F.linear`` of the float32 / bfloat16 weights (the baselines);
* ``fp8fx_static`` - ``torch.ops.fp8fx.linear`` (per-tensor weight and static activation
  scales), its eager kernel;
* ``fp8fx_dynamic`` - ``torch.ops.fp8fx.scaled_linear`` with FP8_DYNAMIC's scales
  (per-channel weights, dynamic per-token activations), its eager kernel;
* ``qgemv`` - ``torch.ops.fp8fx_cpp.qgemv`` (static scales), the one call a compiled
  graph makes per Linear at decode; only where the C++ kernel is built.

Candidates run round-robin (``--rounds`` passes each, interleaved, so a change of the machine's
load hits them all); each figure is the median pass. Ratios are to the faster of ``fp32`` and
``bf16`` (``x best hp``) and to ``bf16``; ``GB/s`` is the stored weight bytes over the time.
One JSON object per candidate, a machine object, then a table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuclass import cpu_class, emulate_isa  # noqa: E402

# (out, in) of one decoder layer's Linears: q, k, v, o, gate, up, down
SHAPES = {
    "smollm2": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "llama8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                (4096, 14336)],
}
LAYERS = {"smollm2": 30, "llama8b": 32}
BASELINES = ("fp32", "bf16")


def _weights(model: str, layers: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=g) * k ** -0.5 for _ in range(layers) for n, k in SHAPES[model]]


def _candidates(ws: list[torch.Tensor]) -> dict[str, tuple[int, object]]:
    """name -> (stored weight bytes, one pass over every Linear)."""
    import fp8fx.ops  # noqa: F401  (registers the fp8fx ops)
    from fp8fx.kernels import gemv

    e4m3, fp8_max = torch.float8_e4m3fn, 448.0
    xs = {k: torch.randn(1, k, generator=torch.Generator().manual_seed(k)) for k in {w.shape[1] for w in ws}}
    xb = {k: x.bfloat16() for k, x in xs.items()}
    w32 = ws
    w16 = [w.bfloat16() for w in ws]
    x_scale = torch.tensor(0.02)
    tensor_scale = [w.abs().amax() / fp8_max for w in ws]
    static = [(w / s).to(e4m3) for w, s in zip(ws, tensor_scale)]
    channel_scale = [w.abs().amax(1) / fp8_max for w in ws]
    channel = [(w / s[:, None]).to(e4m3) for w, s in zip(ws, channel_scale)]
    lin, scaled = torch.ops.fp8fx.linear, torch.ops.fp8fx.scaled_linear

    def fp32() -> None:
        for w in w32:
            F.linear(xs[w.shape[1]], w)

    def bf16() -> None:
        for w in w16:
            F.linear(xb[w.shape[1]], w)

    def fp8fx_static() -> None:
        for w, s in zip(static, tensor_scale):
            lin(xb[w.shape[1]], w, s, x_scale, None, fp8_max)

    def fp8fx_dynamic() -> None:
        for w, s in zip(channel, channel_scale):
            scaled(xb[w.shape[1]], w, s, None, None, fp8_max, "token", 0, 0, 0)

    n = sum(w.numel() for w in ws)
    out = {"fp32": (4 * n, fp32), "bf16": (2 * n, bf16), "fp8fx_static": (n, fp8fx_static),
           "fp8fx_dynamic": (n, fp8fx_dynamic)}
    op = gemv.qgemv_op()
    if op is not None:
        mode = gemv.QGEMV_MODES["static"]

        def qgemv() -> None:
            for w, s in zip(static, tensor_scale):
                op(xb[w.shape[1]], w, s, x_scale, None, fp8_max, mode, 1e-12)

        out["qgemv"] = (n, qgemv)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    layers = args.layers or LAYERS[args.model]
    cands = _candidates(_weights(args.model, layers))
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _, fn in cands.values():  # warm-up: builds, first-call costs
        fn()
    for _ in range(args.rounds):
        for name, (_, fn) in cands.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(BASELINES, key=med.__getitem__)
    rows = []
    for name, (nbytes, _) in cands.items():
        rows.append({"candidate": name, "model": args.model, "layers": layers,
                     "linears": layers * len(SHAPES[args.model]), "weight_MB": nbytes / 1e6,
                     "ms": med[name] * 1e3, "ms_range": [min(times[name]) * 1e3, max(times[name]) * 1e3],
                     "GB_per_s": nbytes / med[name] / 1e9, "x_best_hp": med[name] / med[best],
                     "best_hp": best, "x_bf16": med[name] / med["bf16"]})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'candidate':14} {'weight MB':>9} {'ms':>8} {'(range)':>15} {'GB/s':>6} {'x best hp':>9} {'x bf16':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["ms_range"]
        lines.append(f"{r['candidate']:14} {r['weight_MB']:9.1f} {r['ms']:8.2f} {f'{lo:.2f}-{hi:.2f}':>15} "
                     f"{r['GB_per_s']:6.2f} {r['x_best_hp']:9.2f} {r['x_bf16']:7.2f}")
    lines.append(f"fastest high-precision baseline: {rows[0]['best_hp']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama8b", dest="model", action="store_const", const="llama8b", default="smollm2",
                   help="Llama-3-8B's Linear shapes instead of SmolLM2-135M's")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the model's)")
    p.add_argument("--rounds", type=int, default=15, help="timed passes per candidate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: emulate an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)")
    p.add_argument("--json", help="also write the rows (JSON lines) to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.layers < 0 or args.threads < 1:
        p.error("--rounds and --threads must be at least 1, --layers at least 0")
    emulate_isa(args.isa)
    rows = run(args)
    info = {"machine": {"torch": torch.__version__, "threads": args.threads, "cpu_class": cpu_class(),
                        "command": " ".join(sys.argv),
                        "clock": "thread CPU time" if args.threads == 1 else "wall"}}
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(info))
    print(table(rows))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in [*rows, info]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

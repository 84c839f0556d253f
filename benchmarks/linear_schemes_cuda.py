"""FP8_DYNAMIC and FP8_BLOCK Linears against bfloat16, compiled by Inductor (one JSON row a case).

    python benchmarks/linear_schemes_cuda.py --device cuda --json-out OUT.jsonl
    python benchmarks/linear_schemes_cuda.py --device cpu --shapes tiny --m 1,8   # a smoke run

For each weight shape ``[N, K]`` and each ``M``: ``bf16`` (``F.linear``, eager), ``bf16_compiled``
and, per scheme, ``torch.compile`` (one compile per shape, ``M`` marked dynamic) of ``torch.ops.fp8fx.scaled_linear`` after
``fp8fx.backends.inductor.register_lowering()`` (so Inductor decomposes the op: row-wise
``_scaled_mm`` for FP8_DYNAMIC, block-wise ``_scaled_mm`` for FP8_BLOCK on sm90 where the shape
allows, else the dequantize path). Each row holds the median milliseconds per call (CUDA
events around ``--repeats`` calls, after ``--warmup``), the ratio to ``bf16`` eager, which GEMM
the compiled code called (``scaled_mm`` or ``mm``), and the SQNR of the output against the op's
float32 definition (``scaled_linear_reference``). A last line ``{"kind": "summary", ...}`` gives
the wall time. Benchmarks measure, tests assert: nothing here is a pass/fail check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {
    # Llama-3-8B: q/o projection, gate/up, down
    "llama": [(4096, 4096), (14336, 4096), (4096, 14336)],
    "tiny": [(256, 512)],
}
SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK")


def _quantized(weight: torch.Tensor, scheme: str):
    """``(q, scale, activations, group, block_n, block_k)`` of ``weight`` in ``scheme`` (maxabs / 448)."""
    from fp8fx.numerics import expand_block_scale, quantize_fp32
    from fp8fx.schemes import Scheme

    ls = Scheme.preset(scheme, "scheme").linear
    bn, bk = ls.op_block
    w = weight.float()
    n, k = w.shape
    if bn:
        nb, kb = -(-n // bn), -(-k // bk)
        padded = torch.nn.functional.pad(w.abs(), (0, kb * bk - k, 0, nb * bn - n))
        s = padded.reshape(nb, bn, kb, bk).amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
        q = quantize_fp32(w, expand_block_scale(s, (n, k), (bn, bk)), torch.float8_e4m3fn, 448.0)
    else:
        s = w.abs().amax(dim=1).clamp_min(1e-12) / 448.0
        q = quantize_fp32(w, s.reshape(-1, 1), torch.float8_e4m3fn, 448.0)
    return q, s, ls.activations.op_name, ls.op_group, bn, bk


def _time_ms(fn, x, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gemm_called(fn, x) -> str:
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(fn, x)
    code = "\n".join(codes)
    if "torch.ops.fp8fx.scaled_linear" in code:
        return "eager_op"
    return "scaled_mm" if "_scaled_mm" in code else "mm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="llama", choices=sorted(SHAPES))
    p.add_argument("--m", default="1,16,256,2048")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False); use --device cpu for a smoke run",
              file=sys.stderr)
        return 2
    from fp8fx import numerics
    from fp8fx.backends.inductor import register_lowering
    from fp8fx.kernels.schemes import scaled_linear_reference

    register_lowering()
    t_start = time.perf_counter()
    out = open(args.json_out, "w", encoding="utf-8") if args.json_out else None  # noqa: SIM115
    dev = args.device
    schemes = [s for s in args.schemes.split(",") if s]
    ms = [int(v) for v in args.m.split(",") if v]

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    for n, k in SHAPES[args.shapes]:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        w_dev = w.to(dev)

        def bf16(t, w_dev=w_dev):
            return torch.nn.functional.linear(t, w_dev)

        # one compile per weight shape and candidate (M is marked dynamic), plus dynamo's own M == 1 graph
        compiled = {"bf16_compiled": (torch.compile(bf16), None)}
        for s in schemes:
            q, sc, acts, group, bn, bk = _quantized(w, s)
            qd, scd = q.to(dev), sc.to(dev)

            def op(t, qd=qd, scd=scd, acts=acts, group=group, bn=bn, bk=bk):
                return torch.ops.fp8fx.scaled_linear(t, qd, scd, None, None, 448.0, acts, group, bn, bk)

            compiled[f"{s.lower()}_compiled"] = (torch.compile(op), (q, sc, acts, group, bn, bk))
        for m in ms:
            x = (torch.randn(m, k, generator=gen)).to(torch.bfloat16)
            x_dev = x.to(dev)
            torch._dynamo.maybe_mark_dynamic(x_dev, 0)  # M dynamic; weights and scheme ints stay static
            base = {"kind": "row", "shape": [n, k], "m": m, "device": dev}
            t_bf16 = _time_ms(bf16, x_dev, dev, args.warmup, args.repeats)
            emit({**base, "candidate": "bf16", "ms": t_bf16, "vs_bf16": 1.0})
            for name, (fn, qargs) in compiled.items():
                try:
                    row = {**base, "candidate": name}
                    if qargs is not None:
                        row["gemm"] = _gemm_called(fn, x_dev)
                    t = _time_ms(fn, x_dev, dev, args.warmup, args.repeats)
                    row.update(ms=t, vs_bf16=t / t_bf16)
                    if qargs is not None:
                        q, sc, acts, group, bn, bk = qargs
                        want = scaled_linear_reference(x, q, sc, None, None, 448.0, acts, group, bn, bk)
                        row["sqnr_db"] = round(float(numerics.sqnr_db(want.float(), fn(x_dev).float().cpu())), 2)
                    emit(row)
                except Exception as exc:  # noqa: BLE001 (a benchmark row records the failure and goes on)
                    emit({**base, "candidate": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
    emit({"kind": "summary", "wall_s": round(time.perf_counter() - t_start, 1), "torch": torch.__version__,
          "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None})
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FP8 attention matmuls on CUDA: the lowered ``fp8fx::matmul`` against its emulation and bf16.

    python benchmarks/attention_cuda.py --json-out OUT.jsonl            # on an sm90 GPU
    python benchmarks/attention_cuda.py --device cpu --cases tiny       # a smoke run (no FP8 GEMM)

For each case (Llama-3-8B attention: 32 heads of 128; Q·Kᵀ and P·V, prefill and decode, one
case with a key length that is not a multiple of 16) and each candidate:

* ``bf16``: ``torch.matmul`` of the bfloat16 operands (eager);
* ``emulated_compiled``: ``torch.compile`` of ``torch.ops.fp8fx.matmul`` (what runs without the
  CUDA lowering: FP8-rounded operands, a float32 batched GEMM);
* ``lowered_compiled`` / ``lowered_eager``: ``fp8fx.backends.cuda_attention.scaled_matmul_grouped``
  (``torch._scaled_grouped_mm``; sm90 only), compiled and eager.

Each row holds the median milliseconds (CUDA events around one call, ``--repeats`` times after
``--warmup``), the ratio to ``bf16``, and the SQNR of the output against the op's definition
(``fp8fx.matmul``'s reference kernel, eager). A last ``{"kind": "summary"}`` line gives the wall
time. Benchmarks measure, tests assert: nothing here is a pass/fail check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

E4M3 = torch.float8_e4m3fn
# name -> (a shape, b shape): [B, H, M, K] @ [B, H, K, N]
CASES = {
    "llama8b": {
        "qk_prefill_1x1024": ((1, 32, 1024, 128), (1, 32, 128, 1024)),
        "pv_prefill_1x1024": ((1, 32, 1024, 1024), (1, 32, 1024, 128)),
        "qk_decode_8x1031": ((8, 32, 1, 128), (8, 32, 128, 1031)),
        "pv_decode_8x1031": ((8, 32, 1, 1031), (8, 32, 1031, 128)),
    },
    "tiny": {"qk_tiny": ((1, 2, 8, 16), (1, 2, 16, 8))},
}


def _time_ms(fn, args: tuple, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", default="llama8b", choices=sorted(CASES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False); use --device cpu for a smoke run",
              file=sys.stderr)
        return 2
    from fp8fx import numerics
    from fp8fx.backends import cuda_attention

    dev = args.device
    grouped_ok = dev == "cuda" and torch.cuda.get_device_capability(0)[0] == 9
    t_start = time.perf_counter()
    out = open(args.json_out, "w", encoding="utf-8") if args.json_out else None  # noqa: SIM115

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    for name, (sa_shape, sb_shape) in CASES[args.cases].items():
        a = torch.randn(*sa_shape, generator=gen).to(torch.bfloat16).to(dev)
        b = torch.randn(*sb_shape, generator=gen).to(torch.bfloat16).to(dev)
        s_a, s_b = a.float().abs().max().item() / 448, b.float().abs().max().item() / 448

        def emulated(x, y, s_a=s_a, s_b=s_b):
            return torch.ops.fp8fx.matmul(x, y, s_a, s_b, 448.0, E4M3)

        def lowered(x, y, s_a=s_a, s_b=s_b):
            return cuda_attention.scaled_matmul_grouped(x, y, s_a, s_b, 448.0, E4M3, torch.bfloat16)

        want = emulated(a, b).float()
        candidates = {"bf16": torch.matmul, "emulated_compiled": torch.compile(emulated)}
        if grouped_ok:
            candidates.update(lowered_compiled=torch.compile(lowered), lowered_eager=lowered)
        base = {"kind": "row", "case": name, "a": list(sa_shape), "b": list(sb_shape), "device": dev}
        t_bf16 = None
        for cand, fn in candidates.items():
            try:
                t = _time_ms(fn, (a, b), dev, args.warmup, args.repeats)
                t_bf16 = t if cand == "bf16" else t_bf16
                row = {**base, "candidate": cand, "ms": t, "vs_bf16": t / t_bf16 if t_bf16 else None}
                if cand != "bf16":
                    row["sqnr_db"] = round(float(numerics.sqnr_db(want, fn(a, b).float())), 2)
                emit(row)
            except Exception as exc:  # noqa: BLE001 (a benchmark row records the failure and goes on)
                emit({**base, "candidate": cand, "error": f"{type(exc).__name__}: {exc}"[:400]})
        if not grouped_ok:
            emit({**base, "candidate": "lowered", "skipped": "needs an sm90 CUDA device (_scaled_grouped_mm)"})
    emit({"kind": "summary", "wall_s": round(time.perf_counter() - t_start, 1), "torch": torch.__version__,
          "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None})
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

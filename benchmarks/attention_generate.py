"""Greedy ``generate`` of an attention-quantized SmolLM2 against bf16 and fp32, side by side (CPU).

    python benchmarks/attention_generate.py --threads 1 --clock thread      # prompt 256, 128 new tokens
    python benchmarks/attention_generate.py --prompt 2040 --tokens 8       # the KV-memory run's shape
    python benchmarks/attention_generate.py --variants bf16_eager,fp8fx_attn_compiled --rounds 5

Variants (each built once from the same bf16 model, then timed in turn, round after round):

* ``bf16_eager``, ``fp32_eager`` — the model in that dtype; ``bf16_compiled`` — its forward under
  ``torch.compile(dynamic=True)`` (Inductor); ``fp32_compiled`` only when asked (``--variants``).
* ``fp8fx_attn_eager`` — ``fp8fx.convert`` with every kind quantized (Linears, SDPA, KV cache;
  ``lm_head`` excluded): the converted model runs fp8fx's graph eagerly, op by op, with the
  attention ops' reference kernels.
* ``fp8fx_attn_compiled`` — the model's forward (bf16, or fp32 by ``--fp8-dtype``) under ``torch.compile(backend="fp8fx",
  dynamic=True)`` with the same QUANTIZE config and an FP8 KV cache (``fp8fx.fp8_kv_cache``): the
  attention ops lowered by :mod:`fp8fx.backends.cpu_attention`; ``fp8fx_attn_compiled_before``
  is the same with that lowering switched off while it compiles (``fp8fx::sdpa`` traced from its
  reference kernel by AOTAutograd, as before the lowering existed).
* ``--linears bf16`` keeps the Linears of both fp8fx variants in bf16 (attention and KV cache
  only), to isolate the attention's cost.

One calibration (MEASURE, every kind) serves the fp8fx variants. The first ``generate`` of each
variant (compiles included; two for the fp8fx backend, whose first call swaps the FP8 Linears in
and whose second prefill compiles again on them) is reported as ``first_s`` and not timed. Each round times one
``generate`` (prompt + ``--tokens`` new tokens, ``min_new_tokens`` forces the length) of every
variant; ``--clock thread`` counts the calling thread's CPU time (with ``--threads 1``), which
other processes on a shared machine do not inflate. The table gives per variant the median
time, its range over rounds, and the median (and range) of the per-round ratio to the fastest
high-precision variant of that round. ``tokens_equal`` is the share of generated tokens equal
to ``bf16_eager``'s, ``tokens_equal_fp8fx_eager`` to ``fp8fx_attn_eager``'s. JSON rows go to stdout (lines starting with ``{``), then the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fp8fx  # noqa: E402
from cpuclass import cpu_class, emulate_isa  # noqa: E402
from fp8fx import data  # noqa: E402

VARIANTS = ("bf16_eager", "fp32_eager", "bf16_compiled", "fp8fx_attn_eager", "fp8fx_attn_compiled")
# also: fp8fx_attn_compiled_before (in place of fp8fx_attn_compiled: one fp8fx-compiled variant per run)
HP = ("bf16_eager", "fp32_eager", "bf16_compiled", "fp32_compiled")
_CLOCK = {"wall": time.perf_counter, "thread": time.thread_time}


def _calibrate(base, windows, prefix: str, linears: str) -> fp8fx.FP8Config:
    """MEASURE every kind on ``windows``; the QUANTIZE config (``lm_head`` excluded, and the
    Linears too with ``linears == "bf16"``)."""
    block = {"names": ["lm_head"], **({"types": ["Linear"]} if linears == "bf16" else {})}
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=prefix, blocklist={"names": ["lm_head"]})
    model = copy.deepcopy(base)
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for w in windows:
            model(input_ids=w)
    fp8fx.finalize_calibration(model)
    return cfg.replace(mode="QUANTIZE", blocklist=block)


def _build(name: str, base, qcfg: fp8fx.FP8Config, example) -> Callable[[], Any]:
    """The variant's model; returns ``cache()``: the ``past_key_values`` each generate starts
    from (None: the model's own)."""
    if name in HP:
        model = copy.deepcopy(base).to(torch.float32 if name.startswith("fp32") else torch.bfloat16)
        if name.endswith("_compiled"):
            model.forward = torch.compile(model.forward, dynamic=True)
        return model, lambda: None
    model = copy.deepcopy(base)
    if name == "fp8fx_attn_eager":
        fp8fx.convert(model, qcfg, example_kwargs={"input_ids": example})
        return model, lambda: None
    if name in ("fp8fx_attn_compiled", "fp8fx_attn_compiled_before"):
        from transformers import DynamicCache

        model.forward = torch.compile(model.forward, backend="fp8fx", dynamic=True, options={"config": qcfg})
        return model, lambda: fp8fx.fp8_kv_cache(DynamicCache(config=model.config), model, qcfg)
    raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS + ('fp32_compiled',))}")


def _lowering(name: str):
    """``fp8fx_attn_compiled_before``: the CPU attention lowering off while this variant compiles."""
    if name != "fp8fx_attn_compiled_before":
        return contextlib.nullcontext()
    from fp8fx.backends import cpu_attention

    return mock.patch.object(cpu_attention, "lower_cpu_attention", lambda gm: 0)


def _generate(model, cache: Callable[[], Any], prompt: torch.Tensor, n: int) -> torch.Tensor:
    kv = cache()
    extra = {} if kv is None else {"past_key_values": kv}
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, tok = data.load_model(data.default_model_dir(), torch.bfloat16)
    text = data.read_text(data.default_text_paths()[0])
    windows = data.token_windows(tok, text, window=args.calib_window, max_tokens=args.calib_window * 2)
    prompt = torch.cat(data.token_windows(tok, text * 8, 4096, args.prompt), dim=1)[:, : args.prompt]
    clock = _CLOCK[args.clock]
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fp8_base = base if args.fp8_torch_dtype == torch.bfloat16 else copy.deepcopy(base).to(args.fp8_torch_dtype)
        qcfg = _calibrate(fp8_base, windows, str(Path(tmp) / "measure"), args.linears)
        for name in args.variants:
            t0 = time.perf_counter()
            model, cache = _build(name, fp8_base if name.startswith("fp8fx") else base, qcfg, windows[0][:, :16])
            with _lowering(name):
                for _ in range(2 if name.startswith("fp8fx_attn_compiled") else 1):
                    out = _generate(model, cache, prompt, args.tokens)  # compiles, if any
            models[name] = (model, cache, out[0, args.prompt:])
            print(json.dumps({"variant": name, "first_s": time.perf_counter() - t0}), flush=True)
        want = models.get("bf16_eager", next(iter(models.values())))[2]
        want8 = models["fp8fx_attn_eager"][2] if "fp8fx_attn_eager" in models else None
        for rnd in range(args.rounds):
            done = []
            for name in args.variants:
                model, cache, toks = models[name]
                t0 = clock()
                _generate(model, cache, prompt, args.tokens)
                done.append({"variant": name, "round": rnd, "generate_s": clock() - t0,
                             "tokens_equal": float((toks == want).float().mean()),
                             **({} if want8 is None else
                                {"tokens_equal_fp8fx_eager": float((toks == want8).float().mean())})})
            best = min((r for r in done if r["variant"] in HP), key=lambda r: r["generate_s"], default=None)
            for r in done:
                if best is not None:
                    r["vs_best_hp"], r["best_hp"] = r["generate_s"] / best["generate_s"], best["variant"]
                print(json.dumps(r), flush=True)
            rows += done
    info = {"prompt": args.prompt, "new_tokens": args.tokens, "threads": args.threads, "clock": args.clock,
            "rounds": args.rounds, "linears": args.linears, "fp8_model_dtype": args.fp8_dtype, "cpu_class": cpu_class(),
            "torch": torch.__version__}
    return rows, info


def table(rows: list[dict], info: dict) -> str:
    lines = [f"SmolLM2-135M, prompt {info['prompt']}, {info['new_tokens']} new tokens, {info['threads']} thread(s), "
             f"{info['clock']} clock, {info['rounds']} rounds; FP8 model from {info['fp8_model_dtype']}; "
             f"CPU: {info['cpu_class']}",
             "| variant | generate s (median) | range | tokens/s | vs fastest hp (median) | range | tokens equal (bf16 eager / fp8fx eager) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        t = [r["generate_s"] for r in rs]
        ratio = [r["vs_best_hp"] for r in rs if "vs_best_hp" in r]
        med = statistics.median(t)
        rr = f"{statistics.median(ratio):.2f}x" if ratio else "-"
        rng = f"{min(ratio):.2f}-{max(ratio):.2f}" if ratio else "-"
        lines.append(f"| {name} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {info['new_tokens'] / med:.1f} | {rr} | "
                     f"{rng} | {rs[0]['tokens_equal']:.3f} / {rs[0].get('tokens_equal_fp8fx_eager', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=tuple(_CLOCK), default="wall")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--linears", choices=("fp8", "bf16"), default="fp8",
                   help="fp8 (default): every kind quantized; bf16: attention and KV cache only")
    p.add_argument("--calib-window", type=int, default=256, help="calibration: two windows of this many tokens")
    p.add_argument("--isa", choices=("native", "avx2"), default="native", help="avx2: emulate an AVX2-only CPU")
    p.add_argument("--fp8-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the model the fp8fx variants are made from (their activations' and non-quantized "
                        "ops' dtype); auto: bf16 on CPUs with bf16 GEMM instructions, else fp32 (as benchmarks/model.py)")
    p.add_argument("--json", help="also write the JSON rows to this file")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if sum(v.startswith("fp8fx_attn_compiled") for v in args.variants) > 1:
        # dynamo serves one model's fp8fx graph to another instance of the same class (and the
        # backend refuses it); a reset between them would drop the other compiled variants
        p.error("one fp8fx_attn_compiled* variant per run: run the other in a second process")
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures the calling thread only: use it with --threads 1")
    emulate_isa(args.isa)
    from fp8fx.kernels.linear import cpu_has_bf16

    args.fp8_dtype = args.fp8_dtype if args.fp8_dtype != "auto" else ("bf16" if cpu_has_bf16() else "fp32")
    args.fp8_torch_dtype = torch.bfloat16 if args.fp8_dtype == "bf16" else torch.float32
    rows, info = run(args)
    if args.json:
        from fp8fx.fileio import atomic_write_text

        atomic_write_text(args.json, "".join(json.dumps({**r, **info}) + "\n" for r in rows))
    print(table(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

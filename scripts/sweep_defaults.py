#!/usr/bin/env python3
"""Score the cpu/cuda default candidates on text that neither calibrates nor evaluates.

The rows are those of docs/accuracy.md (scale_method, input backoff, weight backoff). The job:

1. load SmolLM2-135M-Instruct in bf16 (``fp8fx.data.default_model_dir``);
2. split ``lee_background.cor`` with ``fp8fx.data.calibration_and_validation_windows``: the
   first 8192 tokens calibrate (exactly what ``fp8fx quantize`` calibrates on), the last
   ``VALIDATION_TOKENS`` (5120) are the validation text, which calibration never sees;
3. measure ONCE with the default job's MEASURE config (W8A8 Linears, ``lm_head`` and the
   attention kinds blocklisted, target cpu) and write the measurement files;
4. for each row, convert a fresh bf16 model from those files with a QUANTIZE config naming the
   row's scale_method and backoffs, and score perplexity on the validation text (the score the
   pick is made from) and on ``lee.cor`` (the evaluation figure, reported, never used to pick).

Prints a table, then the JSON (also written to ``--json PATH`` when given). Minutes on 2 CPU
cores (two ~5k-token perplexities per row)::

    python3 scripts/sweep_defaults.py --json sweep.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fp8fx
from fp8fx import cli, data, evaluate

#: (scale_method, input backoff, weight backoff) — the rows of docs/accuracy.md
ROWS: list[tuple[str, float, float]] = [
    ("maxabs_arbitrary", 0.5, 1.0),
    ("maxabs_arbitrary", 1.0, 0.5),
    ("maxabs_arbitrary", 1.0, 1.0),
    ("maxabs_arbitrary", 0.5, 0.5),
    ("maxabs_arbitrary", 0.75, 1.0),
    ("maxabs_arbitrary", 0.25, 0.5),
    ("act_maxabs_pow2_weights_pcs_maxabs_pow2", 1.0, 1.0),
    ("maxabs_pow2", 0.25, 0.5),
    ("maxabs_hw", 0.25, 0.5),
    ("maxabs_pow2_opt_weight", 1.0, 1.0),
    ("act_maxabs_pow2_weights_pcs_maxabs_pow2", 0.25, 0.5),
    ("maxabs_pow2", 1.0, 1.0),
]

BLOCKLIST = {"names": ["lm_head"], "types": list(cli.ATTENTION_KINDS)}
TARGET = "cpu"
HP_DTYPE = "bf16"


def _log(message: str) -> None:
    print(f"sweep: {message}", file=sys.stderr, flush=True)


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _default_row() -> tuple[str, float, float]:
    cfg = fp8fx.FP8Config(target=TARGET)
    input_backoff, weight_backoff = cfg.backoffs
    return str(cfg.resolved_scale_method.value), float(input_backoff), float(weight_backoff)


def _pct(ppl: float, base: float) -> float:
    return (ppl - base) / base * 100.0


def sweep(window: int, calib_tokens: int, validation_tokens: int) -> dict[str, Any]:
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir = data.default_model_dir()
    calib_path, eval_path = data.default_text_paths()
    model, tokenizer = data.load_model(model_dir, HP_DTYPE)
    calib_windows, val_windows = data.calibration_and_validation_windows(
        tokenizer, data.read_text(calib_path), window, calib_tokens, validation_tokens
    )
    n_calib_text = len(data.token_ids(tokenizer, data.read_text(calib_path)))
    val_start, val_stop = data.validation_span(n_calib_text, calib_tokens, validation_tokens)
    eval_windows = data.token_windows(tokenizer, data.read_text(eval_path), window)
    _log(f"{sum(w.numel() for w in calib_windows)} calibration tokens [0, {calib_tokens}), "
         f"{sum(w.numel() for w in val_windows)} validation tokens [{val_start}, {val_stop}) of "
         f"{calib_path.name} ({n_calib_text} tokens); {sum(w.numel() for w in eval_windows)} "
         f"evaluation tokens of {eval_path.name}")

    _log("bf16 perplexities ...")
    base_val = evaluate.perplexity(model, val_windows, progress=False)
    base_eval = evaluate.perplexity(model, eval_windows, progress=False)
    _log(f"bf16: validation {base_val:.3f}, lee.cor {base_eval:.3f}")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fp8fx-sweep-") as tmp:
        prefix = str(Path(tmp) / "measure")
        measure_cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=prefix, blocklist=BLOCKLIST,
                                      target=TARGET, hp_dtype=HP_DTYPE)
        _log("measuring once ...")
        model = fp8fx.prepare(model, measure_cfg)
        with torch.no_grad():
            for ids in calib_windows:
                model(ids)
        fp8fx.finalize_calibration(model)
        del model
        gc.collect()

        for i, (method, in_backoff, w_backoff) in enumerate(ROWS, 1):
            t0 = time.perf_counter()
            fresh, _ = data.load_model(model_dir, HP_DTYPE)
            cfg = fp8fx.FP8Config(mode="QUANTIZE", dump_stats_path=prefix, blocklist=BLOCKLIST,
                                  target=TARGET, hp_dtype=HP_DTYPE, scale_method=method,
                                  input_backoff=in_backoff, weight_backoff=w_backoff)
            with torch.no_grad():
                qmodel = fp8fx.convert(fresh, cfg)
                qmodel(val_windows[0])  # captured and rewritten on the first call
            ppl_val = evaluate.perplexity(qmodel, val_windows, progress=False)
            ppl_eval = evaluate.perplexity(qmodel, eval_windows, progress=False)
            nodes = (fp8fx.report(qmodel) or {}).get("nodes_quantized", {})
            row = {
                "scale_method": method,
                "input_backoff": in_backoff,
                "weight_backoff": w_backoff,
                "ppl_validation": ppl_val,
                "validation_delta_pct": _pct(ppl_val, base_val),
                "ppl_lee": ppl_eval,
                "lee_delta_pct": _pct(ppl_eval, base_eval),
                "nodes_quantized": {str(k): int(v) for k, v in nodes.items()},
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            _log(f"[{i}/{len(ROWS)}] {method} {in_backoff}/{w_backoff}: validation "
                 f"{ppl_val:.3f} ({row['validation_delta_pct']:+.2f}%), lee.cor {ppl_eval:.3f} "
                 f"({row['lee_delta_pct']:+.2f}%), {row['seconds']} s")
            del fresh, qmodel
            gc.collect()

    default = _default_row()
    best = min(rows, key=lambda r: r["ppl_validation"])
    for r in rows:
        r["is_default"] = (r["scale_method"], r["input_backoff"], r["weight_backoff"]) == default
        r["rank_validation"] = 1 + sorted(x["ppl_validation"] for x in rows).index(r["ppl_validation"])
        r["rank_lee"] = 1 + sorted(x["ppl_lee"] for x in rows).index(r["ppl_lee"])
    return {
        "model": str(model_dir),
        "calibration": {"file": str(calib_path), "tokens": [0, calib_tokens]},
        "validation": {"file": str(calib_path), "tokens": [val_start, val_stop],
                       "text_tokens": n_calib_text},
        "evaluation": {"file": str(eval_path),
                       "tokens": sum(int(w.numel()) for w in eval_windows)},
        "window": window,
        "bf16_ppl_validation": base_val,
        "bf16_ppl_lee": base_eval,
        "current_default": {"scale_method": default[0], "input_backoff": default[1],
                            "weight_backoff": default[2]},
        "best_on_validation": {k: best[k] for k in ("scale_method", "input_backoff",
                                                    "weight_backoff", "ppl_validation")},
        "rows": rows,
        "machine": {
            "cpu": _cpu_model_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"bf16 perplexity: validation {result['bf16_ppl_validation']:.3f} "
        f"(lee_background.cor tokens {result['validation']['tokens']}), "
        f"lee.cor {result['bf16_ppl_lee']:.3f}",
        "| scale_method | input backoff | weight backoff | validation ppl | vs bf16 "
        "| lee.cor ppl | vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: r["ppl_validation"]):
        mark = " (current default)" if r["is_default"] else ""
        lines.append(
            f"| {r['scale_method']} | {r['input_backoff']} | {r['weight_backoff']} "
            f"| {r['ppl_validation']:.3f} | {r['validation_delta_pct']:+.2f}%{mark} "
            f"| {r['ppl_lee']:.3f} | {r['lee_delta_pct']:+.2f}% |"
        )
    best = result["best_on_validation"]
    lines.append(f"best on validation: {best['scale_method']} {best['input_backoff']} / "
                 f"{best['weight_backoff']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--window", type=int, default=cli.DEFAULT_WINDOW)
    parser.add_argument("--calib-tokens", type=int, default=data.DEFAULT_CALIB_TOKENS)
    parser.add_argument("--validation-tokens", type=int, default=data.VALIDATION_TOKENS)
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is needed to load the model anyway
        pass
    result = sweep(args.window, args.calib_tokens, args.validation_tokens)
    assert all(math.isfinite(r["ppl_validation"]) for r in result["rows"])
    print(format_table(result))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

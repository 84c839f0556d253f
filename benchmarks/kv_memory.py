"""KV-cache memory of a long generation: bf16 cache vs fp8fx's FP8 cache, side by side.

Loads the main job's model (SmolLM2-135M, offline), calibrates it briefly (MEASURE, every kind),
converts it (FP8 Linears, attention and KV cache), then runs ``generate`` from the same prompt
with the bf16 model and with the FP8 model and sums the bytes of every cache tensor. Prints JSON
and a table.

    python benchmarks/kv_memory.py                      # 2048 tokens in the cache
    python benchmarks/kv_memory.py --tokens 512 --cache static --kv-dtype E5M2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import fp8fx
from fp8fx import data


def cache_bytes(cache) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run(model, prompt: torch.Tensor, new_tokens: int, cache: str) -> tuple[int, float, torch.Tensor]:  # noqa: ANN001
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             cache_implementation=cache, return_dict_in_generate=True)
    return cache_bytes(out.past_key_values), time.perf_counter() - t0, out.sequences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens held by the cache at the end")
    ap.add_argument("--new-tokens", type=int, default=8, help="decode steps (the rest is the prompt)")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--kv-dtype", choices=["E4M3", "E5M2"], default="E4M3")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    args = ap.parse_args()

    model, tok = data.load_model(data.default_model_dir(), torch.bfloat16)
    reference, _ = data.load_model(data.default_model_dir(), torch.bfloat16)
    calib_path, _ = data.default_text_paths()
    windows = data.token_windows(tok, data.read_text(calib_path), 512, args.calib_tokens)
    prompt_len = args.tokens - args.new_tokens
    ids = torch.cat(data.token_windows(tok, data.read_text(calib_path) * 8, 4096, prompt_len), dim=1)[:, :prompt_len]

    with tempfile.TemporaryDirectory() as d:
        cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=f"{d}/m", blocklist={"names": ["lm_head"]},
                              kv_cache_dtype=args.kv_dtype)
        fp8fx.prepare(model, cfg)
        with torch.no_grad():
            for w in windows:
                model(w)
        fp8fx.finalize_calibration(model)
        fp8fx.convert(model)

    bf16_bytes, bf16_s, _ = run(reference, ids, args.new_tokens, args.cache)
    fp8_bytes, fp8_s, _ = run(model, ids, args.new_tokens, args.cache)
    result = {
        "model": "SmolLM2-135M-Instruct", "cache": args.cache, "kv_dtype": args.kv_dtype,
        "cache_tokens": args.tokens, "bf16_cache_bytes": bf16_bytes, "fp8_cache_bytes": fp8_bytes,
        "ratio": fp8_bytes / bf16_bytes, "bf16_generate_s": round(bf16_s, 2), "fp8_generate_s": round(fp8_s, 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    print(f"\n| cache ({args.cache}, {args.tokens} tokens) | bytes | ratio |")
    print("|---|---:|---:|")
    print(f"| bf16 | {bf16_bytes / 2**20:.1f} MiB | 1.000 |")
    print(f"| fp8fx {args.kv_dtype} | {fp8_bytes / 2**20:.1f} MiB | {fp8_bytes / bf16_bytes:.3f} |")


if __name__ == "__main__":
    main()

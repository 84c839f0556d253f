"""Sequential (block-by-block) calibration against whole-model calibration: peak memory and time.

    python benchmarks/sequential.py --size-gb 3            # generates a 3 GB bf16 Llama-shaped model
    python benchmarks/sequential.py --checkpoint DIR       # or calibrates an existing folder

Each calibration runs in a process of its own, so each peak RSS (``VmHWM``) is that process's:

* ``sequential``: the model is built on the meta device (``fp8fx.sequential.load_offloaded``:
  embeddings, final norm and lm_head read, the blocks left on disk), then
  ``fp8fx.prepare(model, cfg, sequential=True, calibration_data=...)`` reads one block at a time
  from the safetensors files and ``finalize_calibration`` writes the files;
* ``whole``: ``from_pretrained`` in bf16, ``prepare``, one call per batch, ``finalize_calibration``.

Both calibrate on the same batches (``--windows`` windows of ``--window`` tokens of the Lee
corpus when gensim's text and the SmolLM2 tokenizer are installed, else seeded random ids),
without a KV cache; the parent tokenizes them once, so the children's RSS holds no tokenizer. The script prints a table and one JSON line: peak RSS of each process
against the bf16 model bytes, time of each calibration (load excluded) and their ratio, and
whether the two measurement sets are equal (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _batches(folder: Path, windows: int, window: int):
    import torch

    try:
        from transformers import AutoTokenizer

        from fp8fx import data

        tok = AutoTokenizer.from_pretrained(folder)
        text = data.read_text(data.default_text_paths()[0])
        return data.token_windows(tok, text, window, windows * window)[:windows], "lee_background.cor"
    except Exception:  # noqa: BLE001 - no tokenizer or corpus installed: random ids, said in the output
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 1000, (1, window), generator=g) for _ in range(windows)], "random ids"


def child(mode: str, folder: Path, out: Path, batch_file: Path) -> dict:
    import torch

    import fp8fx

    rss_import = _status_kb("VmRSS") * 1024
    saved = torch.load(batch_file, weights_only=True)  # tokenized by the parent: no tokenizer in this RSS
    batches, source = saved["batches"], saved["data"]
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(out / "measure"), blocklist={"names": ["lm_head"]})
    t0 = time.perf_counter()
    if mode == "sequential":
        from fp8fx.sequential import load_offloaded

        model = load_offloaded(folder, dtype=torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter()
    rss_loaded = _status_kb("VmRSS") * 1024
    with torch.no_grad():
        if mode == "sequential":
            fp8fx.prepare(model, cfg, sequential=True, calibration_data=batches)
        else:
            fp8fx.prepare(model, cfg)
            for ids in batches:
                model(ids, use_cache=False)
    files = fp8fx.finalize_calibration(model)
    done = time.perf_counter()
    return {"mode": mode, "load_s": loaded - t0, "calibrate_s": done - loaded, "rss_after_import": rss_import,
            "rss_after_load": rss_loaded, "peak_rss": _status_kb("VmHWM") * 1024, "files": [str(f) for f in files],
            "tokens": sum(int(b.numel()) for b in batches), "data": source, "threads": torch.get_num_threads()}


def _nodes(files: list[str]) -> dict:
    path = next(f for f in files if f.endswith("maxabs.json"))
    obj = json.loads(Path(path).read_text())
    obj.pop("WriteId", None)
    return obj


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=3.0, help="bf16 size of the generated model (default 3)")
    p.add_argument("--checkpoint", type=Path, default=None, help="calibrate this folder instead of generating one")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary folder)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--child", choices=("sequential", "whole"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.checkpoint, a.out, a.batches)))
        return 0

    with tempfile.TemporaryDirectory(prefix="fp8fx-seqbench-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        folder = a.checkpoint
        if folder is None:
            from synthetic import llama_config, make_llama_checkpoint

            folder = tmp / "model"
            t = time.perf_counter()
            info = make_llama_checkpoint(folder, llama_config(size_gb=a.size_gb))
            print(f"generated {folder}: {info['bytes'] / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        model_bytes = int(index["metadata"]["total_size"])
        import torch

        batches, data_source = _batches(folder, a.windows, a.window)
        torch.save({"batches": batches, "data": data_source}, tmp / "batches.pt")
        results = {}
        for mode in ("sequential", "whole"):  # one at a time: two torch processes on 2 cores slow each other
            cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", str(folder), "--out", str(tmp / mode),
                   "--batches", str(tmp / "batches.pt")]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if run.returncode != 0:
                print(run.stderr[-4000:], file=sys.stderr)
                return run.returncode
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        seq, whole = results["sequential"], results["whole"]
        config = json.loads((folder / "config.json").read_text())
        summary = {
            "model_bytes": model_bytes, "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "tokens": seq["tokens"], "data": seq["data"], "threads": seq["threads"],
            "sequential": {k: v for k, v in seq.items() if k != "files"},
            "whole": {k: v for k, v in whole.items() if k != "files"},
            "peak_rss_over_model": {"sequential": seq["peak_rss"] / model_bytes, "whole": whole["peak_rss"] / model_bytes},
            "time_ratio_sequential_over_whole": seq["calibrate_s"] / whole["calibrate_s"],
            "measurements_equal": _nodes(seq["files"]) == _nodes(whole["files"]),
        }
    rows = [("", "sequential", "whole"),
            ("peak RSS", _mb(seq["peak_rss"]), _mb(whole["peak_rss"])),
            ("peak RSS / model bytes", f"{summary['peak_rss_over_model']['sequential']:.1%}",
             f"{summary['peak_rss_over_model']['whole']:.1%}"),
            ("RSS after import", _mb(seq["rss_after_import"]), _mb(whole["rss_after_import"])),
            ("RSS after load", _mb(seq["rss_after_load"]), _mb(whole["rss_after_load"])),
            ("load", f"{seq['load_s']:.1f} s", f"{whole['load_s']:.1f} s"),
            ("calibrate + finalize", f"{seq['calibrate_s']:.1f} s", f"{whole['calibrate_s']:.1f} s")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"model: {model_bytes / 1e9:.2f} GB bf16, {summary['layers']} layers x hidden {summary['hidden']}; "
          f"{summary['tokens']} tokens ({summary['data']})")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(f"time sequential / whole: {summary['time_ratio_sequential_over_whole']:.2f}; "
          f"measurement files equal: {summary['measurements_equal']}")
    print(json.dumps(summary))
    return 0 if summary["measurements_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

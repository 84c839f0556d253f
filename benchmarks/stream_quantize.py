"""Streaming checkpoint quantization: peak memory against the largest shard, and throughput.

    python benchmarks/stream_quantize.py                          # generates a ~3 GB bf16 Llama, 1 GiB shards
    python benchmarks/stream_quantize.py --size-gb 3 --shard-mb 1024 --workers 1,2 --scheme FP8_DYNAMIC
    python benchmarks/stream_quantize.py --dir CKPT               # an existing safetensors checkpoint

Each run of :func:`fp8fx.quantize_checkpoint` happens in a fresh subprocess (so that its peak
memory is its own), which reports the peak resident set (``VmHWM``) of itself and of every worker
process, its RSS after the imports (what any process running fp8fx holds before reading a
tensor) and ``getrusage(RUSAGE_CHILDREN)`` (the largest worker, as the kernel counts it). The
ratios are those peaks over the largest input shard (the target: at most 1.5x); throughput is
input tensor bytes per second of the whole call (reading, quantizing, writing, fsync and
validation; the model's transformers module is imported before the clock starts; the input was
just written, so it is read from the page cache). Prints one JSON
object per run, a summary object, then a markdown table. Nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import fp8fx
from fp8fx.export.streaming import quantize_checkpoint
import transformers, safetensors  # everything the run imports, before any tensor is read
from transformers.models.llama import modeling_llama  # imported by the skeleton: not timed
after_import = rss("VmRSS")
t0 = time.perf_counter()
r = quantize_checkpoint({src!r}, {dst!r}, scheme={scheme!r}, format={fmt!r}, workers={workers})
wall = time.perf_counter() - t0
print(json.dumps({{"seconds": r.seconds, "wall_s": wall, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
                  "shards_in": r.shards_in, "files_out": r.files_out, "quantized": len(r.quantized),
                  "problems": len(r.report.problems), "self_pid": os.getpid(), "self_peak": rss("VmHWM"),
                  "after_import": after_import,
                  "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "workers_peak": {{str(k): v for k, v in r.peak_rss.items()}}}}))
"""


def _largest_shard(path: Path) -> int:
    return max(f.stat().st_size for f in path.glob("*.safetensors"))


def run_once(src: Path, dst: Path, scheme: str, fmt: str, workers: int) -> dict[str, Any]:
    code = CHILD.format(root=str(ROOT), src=str(src), dst=str(dst), scheme=scheme, fmt=fmt, workers=workers)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"the quantize subprocess failed (exit {p.returncode})")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    pid = str(d["self_pid"])
    workers_peak = {k: v for k, v in d["workers_peak"].items() if k != pid}
    procs = [d["self_peak"], *workers_peak.values()]
    largest = _largest_shard(src)
    row = {"workers": workers, "scheme": scheme, "format": fmt, "largest_shard_bytes": largest,
           "bytes_in": d["bytes_in"], "bytes_out": d["bytes_out"], "shards_in": d["shards_in"],
           "files_out": d["files_out"], "seconds": round(d["seconds"], 2), "subprocess_s": round(elapsed, 2),
           "gb_per_s": round(d["bytes_in"] / 1e9 / d["seconds"], 3),
           "main_peak_rss": d["self_peak"], "main_rss_after_import": d["after_import"],
           "worker_peak_rss": sorted(workers_peak.values()), "children_maxrss": d["children_maxrss"],
           "max_process_peak_rss": max(procs), "sum_peak_rss": sum(procs)}
    row["max_process_over_shard"] = round(row["max_process_peak_rss"] / largest, 3)
    row["sum_over_shard"] = round(row["sum_peak_rss"] / largest, 3)
    row["max_process_minus_import_over_shard"] = round((row["max_process_peak_rss"] - d["after_import"]) / largest, 3)
    row["problems"] = d["problems"]
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    gib = 2**30
    lines = ["| workers | largest shard GiB | peak RSS max/process GiB | sum GiB | max / shard | sum / shard "
             "| RSS after imports GiB | GB/s of input | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['largest_shard_bytes'] / gib:.2f} | {r['max_process_peak_rss'] / gib:.2f} "
                     f"| {r['sum_peak_rss'] / gib:.2f} | {r['max_process_over_shard']} | {r['sum_over_shard']} "
                     f"| {r['main_rss_after_import'] / gib:.2f} | {r['gb_per_s']} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="an existing checkpoint (default: generate one)")
    p.add_argument("--size-gb", type=float, default=3.0, help="size of the generated bf16 checkpoint")
    p.add_argument("--shard-mb", type=int, default=1024, help="shard size of the generated checkpoint (MiB)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--scheme", default="FP8_DYNAMIC")
    p.add_argument("--format", default="compressed-tensors")
    p.add_argument("--work", default=None, help="folder for the generated and quantized checkpoints "
                   "(default: a temporary one, removed)")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fp8fx-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        gen_s = None
        if a.dir is None:
            from synthetic import llama_config, make_llama_checkpoint

            src = work / "hp"
            if not (src / "config.json").is_file():
                t0 = time.perf_counter()
                make_llama_checkpoint(src, llama_config(size_gb=a.size_gb), shard_bytes=a.shard_mb << 20)
                gen_s = round(time.perf_counter() - t0, 1)
        else:
            src = Path(a.dir)
        rows = []
        for w in (int(x) for x in a.workers.split(",")):
            dst = work / f"fp8-w{w}"
            row = run_once(src, dst, a.scheme, a.format, w)
            print(json.dumps(row))
            rows.append(row)
            shutil.rmtree(dst, ignore_errors=True)
        import torch

        summary = {"summary": True, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "checkpoint": "generated" if a.dir is None else "given", "generate_s": gen_s,
                   "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                   "target_max_over_shard": 1.5,
                   "bench_children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
        print(json.dumps(summary))
        print(_table(rows))
        if a.json_out:
            Path(a.json_out).write_text("\n".join(json.dumps(r) for r in [*rows, summary]) + "\n")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

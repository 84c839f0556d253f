"""``fp8fx quantize-checkpoint``: quantize a safetensors checkpoint shard by shard into an FP8 checkpoint.

::

    fp8fx quantize-checkpoint IN_DIR OUT_DIR --scheme FP8_DYNAMIC|FP8_BLOCK [--format vllm] [--workers 2]
    fp8fx quantize-checkpoint IN_DIR OUT_DIR --scheme FP8 --measurements stats/measure   # static

The model is never built: :func:`fp8fx.export.streaming.quantize_checkpoint` does the work
(docs/streaming.md). Prints what was written; ``--report-json`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import Fp8fxError

COMMANDS = ("quantize-checkpoint",)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "quantize-checkpoint",
        help="quantize a safetensors checkpoint shard by shard into an FP8 checkpoint",
        description=("Read IN_DIR (config.json and safetensors shards) one tensor at a time, quantize the "
                     "Linear weights that fp8fx.quantize would quantize, and write an FP8 checkpoint to "
                     "OUT_DIR atomically (validated before it is moved in place). The model is never built "
                     "in memory."),
    )
    p.add_argument("in_dir", metavar="IN_DIR", help="high-precision checkpoint folder (safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder of the FP8 checkpoint (replaced atomically)")
    p.add_argument("--scheme", metavar="NAME", type=str.upper, default="FP8_DYNAMIC",
                   help="FP8_DYNAMIC (default), FP8_BLOCK, FP8_WEIGHT_ONLY, or FP8 (static; needs --measurements)")
    p.add_argument("--format", metavar="F", default="compressed-tensors",
                   help="checkpoint format: compressed-tensors (default), vllm or modelopt (any of "
                        "fp8fx.export.FORMATS)")
    p.add_argument("--config", metavar="JSON", default=None,
                   help="FP8Config JSON for the allowlist/blocklist and other keys (default: every Linear but lm_head)")
    p.add_argument("--measurements", metavar="PREFIX", default=None,
                   help="INC measurement files (dump_stats_path prefix, or a .json/.npz) of a calibration of "
                        "this model: the input scales of a static scheme")
    p.add_argument("--workers", metavar="N", type=int, default=1, help="worker processes, one input shard each "
                   "at a time (default: 1, in this process)")
    p.add_argument("--max-shard-size", metavar="SIZE", default=None,
                   help="split output files above SIZE (e.g. 2GB); default: one file per input shard")
    p.add_argument("--report-json", metavar="PATH", default=None, help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def result_dict(r) -> dict:  # noqa: ANN001 (a StreamResult; imported lazily)
    gb = r.bytes_in / 1e9
    return {"out_dir": str(r.path), "format": r.report.format.NAME, "summary": r.report.summary(),
            "quantized": len(r.quantized), "hp_linears": r.hp_linears, "shards_in": r.shards_in,
            "files_out": r.files_out, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "seconds": round(r.seconds, 3), "gb_per_s": round(gb / r.seconds, 4) if r.seconds > 0 else None,
            "workers": r.workers, "peak_rss": {str(k): v for k, v in r.peak_rss.items()}}


def run(args: argparse.Namespace) -> int:
    from .export.streaming import quantize_checkpoint

    r = quantize_checkpoint(args.in_dir, args.out_dir, scheme=args.scheme, format=args.format, cfg=args.config,
                            measurements=args.measurements, workers=args.workers,
                            max_shard_size=args.max_shard_size, progress=not args.no_progress)
    d = result_dict(r)
    print(f"{d['out_dir']}: {d['summary']}")
    print(f"{d['shards_in']} input shard(s) -> {d['files_out']} file(s); {d['bytes_in'] / 1e9:.3f} GB -> "
          f"{d['bytes_out'] / 1e9:.3f} GB in {d['seconds']:.1f} s ({d['gb_per_s']} GB/s of input), "
          f"{d['workers']} worker(s)")
    if args.report_json:
        from .fileio import atomic_write_json

        target = Path(args.report_json)
        try:
            atomic_write_json(target, d, indent=2)
        except OSError as exc:
            raise Fp8fxError(f"cannot write --report-json {target}: {exc.strerror or exc}") from exc
    return 0

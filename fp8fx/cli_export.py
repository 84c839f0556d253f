"""``fp8fx export``: a checkpoint for any target from one calibration's measurement files.

::

    fp8fx export --measurements PREFIX --model DIR --target cuda|cpu|gaudi2|gaudi3 \\
                 --format compressed-tensors|vllm|modelopt|inc --out OUT [--config JSON] [--dtype fp32] \\
                 [--max-shard-size 5GB]

:func:`fp8fx.export.targets.export_from_measurements` does the work (docs/export.md, "One
calibration, every target"). Prints the format, the target, how many Linears are quantized and
the files written.
"""

from __future__ import annotations

import argparse

COMMANDS = ("export",)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from .export.targets import EXPORT_FORMATS
    from .numerics import TARGETS

    p = sub.add_parser(
        "export", help="write a checkpoint for a target from measurement files, without calibrating again",
        description=("Load the high-precision model DIR, derive the scales for --target from the measurement "
                     "files PREFIX (a calibration's dump_stats_path) and write a --format checkpoint to OUT "
                     "atomically. Format inc copies the model with INC's quant_config.json and the "
                     "measurement files (INC derives the scales when it loads)."))
    p.add_argument("--measurements", metavar="PREFIX", required=True,
                   help="the calibration's dump_stats_path (folder plus file-name prefix)")
    p.add_argument("--model", metavar="DIR", required=True, help="high-precision Hugging Face model folder")
    p.add_argument("--target", choices=sorted(TARGETS), default="cuda", help="device the scales are for "
                   "(default: cuda)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors",
                   help="checkpoint format (default: compressed-tensors)")
    p.add_argument("--out", metavar="OUT", required=True, help="checkpoint folder (replaced atomically)")
    p.add_argument("--config", metavar="JSON", default=None,
                   help="FP8Config JSON: allowlist/blocklist, scale_method, scheme, backoffs (mode, dump_stats_path "
                        "and target are set by this command); default: every Linear but lm_head")
    p.add_argument("--dtype", default=None, help="dtype the model is loaded in: fp32, bf16, fp16 (default: the "
                   "config's hp_dtype, else fp32)")
    p.add_argument("--max-shard-size", metavar="SIZE", default=None,
                   help="split weight files above SIZE (default 5GB); not with --format inc, which copies the shards")


def run(args: argparse.Namespace) -> int:
    from .export.targets import export

    r = export(args.model, args.measurements, args.out, target=args.target, format=args.format, cfg=args.config,
               dtype=args.dtype, max_shard_size=args.max_shard_size)
    files = r.files()
    how = " (INC quantizes them when it loads)" if r.format == "inc" else ""
    print(f"{r.path}: format {r.format}, target {r.target}, {len(r.quantized)} quantized Linear(s){how}")
    print(f"{len(files)} file(s): {' '.join(files)}")
    return 0

"""``fp8fx measurements``: merge per-rank measurement files, or regroup them to another world size.

::

    fp8fx measurements merge PREFIX --world N [--out OUT_PREFIX] [--observer OBS]
    fp8fx measurements regroup PREFIX --world N --to M [--out OUT_PREFIX] [--observer OBS]
                               [--groups "0,2--1,3"] [--arrays error|max|concat]

``PREFIX`` is the calibration's ``dump_stats_path``; the inputs are
``PREFIX_hooks_{observer}_{r}_{N}.json/.npz``. ``merge`` writes one shared set
``OUT_PREFIX_hooks_{observer}.*`` (elementwise max of every rank); ``regroup`` writes
``OUT_PREFIX_hooks_{observer}_{i}_{M}.*`` for i < M. The rules are in :mod:`fp8fx.formats.ranks`
and docs/distributed.md. Each written set is printed, one line each.
"""

from __future__ import annotations

import argparse
import sys

from .cli import _positive_int
from .formats import ranks

COMMANDS = ("measurements",)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("measurements", help="merge per-rank measurement files, or regroup them to another world size",
                       description="Combine the per-rank INC measurement files (PREFIX_hooks_<observer>_<rank>_<N>) "
                                   "of a multi-process calibration.")
    actions = p.add_subparsers(dest="measurements_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("prefix", metavar="PREFIX", help="the calibration's dump_stats_path (directory plus prefix)")
    common.add_argument("--world", metavar="N", type=_positive_int, required=True, help="world size of the input files")
    common.add_argument("--out", metavar="OUT_PREFIX", default=None, help="prefix of the written files "
                        "(default: PREFIX)")
    common.add_argument("--observer", choices=ranks.OBSERVERS, default=None,
                        help="observer in the file names (default: the one whose files exist)")
    actions.add_parser("merge", parents=[common], help="elementwise max of every rank into one shared set",
                       description="Merge the N ranks' files by elementwise max into OUT_PREFIX_hooks_<observer>.* "
                                   "(right for ranks that held the same model).")
    r = actions.add_parser("regroup", parents=[common], help="per-rank files for another world size",
                           description="Write per-rank files for world size M: M < N combines groups of ranks "
                                       "(consecutive by default), M > N gives new rank j the files of old rank "
                                       "j // (M/N).")
    r.add_argument("--to", metavar="M", type=_positive_int, required=True, help="world size of the written files")
    r.add_argument("--groups", metavar="G", default=None,
                   help="old ranks of each new rank, e.g. '0,8--1,9--...' (default: consecutive blocks)")
    r.add_argument("--arrays", choices=ranks.ARRAY_RULES, default="error",
                   help="arrays of several values (per channel / per head): error (default), max "
                        "(elementwise, or copy when expanding), concat (concatenate, or split when expanding)")


def _note_histograms(observer: str) -> None:
    if observer in ("percentile", "mse"):
        print(f"fp8fx: note: observer {observer!r}: each rank's file holds a value computed from that rank's "
              "histogram; their max bounds but is not the value of all the data (data-parallel calibration with a "
              "process group reduces the histograms exactly)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    observer = ranks.rank_observer(args.prefix, args.world, args.observer)
    _note_histograms(observer)
    if args.measurements_command == "merge":
        paths = ranks.merge_ranks(args.prefix, args.world, out=args.out, observer=observer)
        print(f"merged {args.world} ranks: {paths[0]} {paths[1]} {paths[2]}")
        return 0
    groups = None if args.groups is None else ranks.parse_groups(args.groups, args.world)
    written = ranks.regroup_ranks(args.prefix, args.world, args.to, out=args.out, observer=observer,
                                  groups=groups, arrays=args.arrays)
    plan = groups or (ranks.rank_groups(args.world, args.to) if args.to < args.world else
                      [[j // (args.to // args.world)] for j in range(args.to)])
    for i, paths in enumerate(written):
        print(f"rank {i} of {args.to} from rank(s) {','.join(map(str, plan[i]))} of {args.world}: "
              f"{paths[0]} {paths[1]} {paths[2]}")
    return 0

"""Per-rank INC measurement files: find every rank's set, merge them into one, regroup them to
another world size (the ``fp8fx measurements`` command, docs/distributed.md).

A calibration on N ranks that each wrote their own files (``calibration_parallel 'tensor'``, or
INC) leaves ``{prefix}_hooks_{observer}_{r}_{N}.json/.npz`` for r = 0 .. N-1.

* :func:`merge_ranks` — one shared set (``{prefix}_hooks_{observer}.json/.npz``, the names a
  single process reads) holding the elementwise max of all ranks. Right when the ranks held the
  same model (data parallel without a process group): every array, per channel or per head
  too, describes the same tensor on every rank. Shapes must match.
* :func:`regroup_ranks` — per-rank sets for world size M. M < N (N divisible by M): new rank i
  combines old ranks ``i*g .. i*g + g-1`` (g = N/M, consecutive ranks, vllm-hpu-extension's
  grouping; ``groups`` gives another partition, e.g. ``[[0, 8], [1, 9], ...]`` for a TP16 run
  over two nodes reduced to TP8). M > N (M divisible by N): new rank j takes old rank
  ``j // k`` (k = M/N), the inverse grouping.

Arrays of one value (per tensor: every activation of the default observers) are combined by max
(down) or copied (up): a shard's max-abs bounds a sub-shard's, and the max over a group bounds
the union. Arrays of several values (weights per output channel, per-head KV statistics) are
ambiguous once weights are sharded: a column-parallel Linear's output channels (and the heads of
attention) are split across ranks, a row-parallel Linear's are not, and the files do not say
which. ``arrays`` decides, for every such array alike:

``"error"`` (default)  refuse, naming the first such node, key and files;
``"max"``              elementwise max by index (down) / copy (up): vllm-hpu-extension's rule;
                       right for axes that are not sharded;
``"concat"``           the ranks' arrays are consecutive shards: concatenated in group order
                       (down) / split into equal parts (up); right for sharded axes.

Neither fp8fx's nor INC's QUANTIZE reads ``params.weight`` (weight scales are recomputed from the
weights), so for per-channel weight records either choice only changes what the file records;
per-head activation statistics are read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MeasurementError
from .inc import (Measurements, NodeMeasurement, measurement_file_paths, merge_measurements, read_measurements,
                  write_measurements)

__all__ = ["OBSERVERS", "ARRAY_RULES", "per_rank_files", "rank_observer", "read_ranks", "merge_ranks", "rank_groups", "parse_groups",
           "regroup", "regroup_ranks"]

#: observer names that appear in measurement file names (the ``observer`` config key's values)
OBSERVERS = ("maxabs", "maxabs_per_channel", "percentile", "mse", "shape", "save")
ARRAY_RULES = ("error", "max", "concat")


# ----------------------------------------------------------------------------------- finding
def _exists(prefix: str | os.PathLike[str], observer: str, rank: int | None, world: int | None) -> bool:
    return any(p.is_file() for p in measurement_file_paths(prefix, observer, rank, world))


def _world(world: int, what: str = "--world") -> int:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {world!r}")
    return world


def per_rank_files(prefix: Path, observer: str) -> dict[int, list[int]]:
    """world size -> ranks of the per-rank files ``{prefix}_hooks_{observer}_{rank}_{world}`` on
    disk (names whose rank is not below their world size are not INC's, and not counted)."""
    directory = prefix.parent if str(prefix.parent) else Path(".")
    pattern = re.compile(re.escape(f"{prefix.name}_hooks_{observer}") + r"_(\d+)_(\d+)\.(?:json|npz)")
    out: dict[int, set[int]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return {}
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) < int(m.group(2)):
            out.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return {w: sorted(r) for w, r in sorted(out.items())}


def rank_observer(prefix: str | os.PathLike[str], world: int, observer: str | None = None) -> str:
    """The observer of the per-rank files ``{prefix}_hooks_{observer}_{r}_{world}``: ``observer``
    when given, else the one observer whose rank-0 file exists (several: an error)."""
    _world(world)
    if observer is not None:
        if observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {observer!r}; valid: {', '.join(OBSERVERS)}")
        return observer
    found = [o for o in OBSERVERS if any(_exists(prefix, o, r, world) for r in range(world))]
    if len(found) == 1:
        return found[0]
    if found:
        raise MeasurementError(f"per-rank files of several observers exist for prefix '{prefix}' and world size "
                               f"{world}: {', '.join(found)}; pass --observer (observer=) to pick one")
    other = {o: f for o in OBSERVERS if (f := per_rank_files(Path(prefix), o))}
    seen = "; ".join(f"observer {o}: " + ", ".join(f"world {w} ranks {r}" for w, r in f.items())
                     for o, f in other.items()) or "none"
    shared = [o for o in OBSERVERS if _exists(prefix, o, None, None)]
    note = (f" The shared set {measurement_file_paths(prefix, shared[0])[1].name} exists (one set for every rank, "
            "nothing to merge)." if shared else "")
    raise MeasurementError(f"no per-rank measurement file '{Path(prefix).name}_hooks_<observer>_<rank>_{world}"
                           f".json/.npz' in {Path(prefix).parent or '.'}; per-rank files found there: {seen}."
                           f"{note} Check the prefix (dump_stats_path) and --world")


def read_ranks(prefix: str | os.PathLike[str], world: int, observer: str | None = None) -> list[Measurements]:
    """Every rank's measurements, rank 0 first; a missing rank names its file and the ranks found."""
    observer = rank_observer(prefix, world, observer)
    missing = [r for r in range(world) if not _exists(prefix, observer, r, world)]
    if missing:
        json_path, npz_path = measurement_file_paths(prefix, observer, missing[0], world)
        found = per_rank_files(Path(prefix), observer)
        others = "; ".join(f"world {w}: ranks {r}" for w, r in found.items() if w != world)
        raise MeasurementError(
            f"rank {missing[0]} of {world} has no measurement file: neither {npz_path} nor {json_path.name} exists "
            f"(ranks missing: {missing}; ranks found for world {world}: {found.get(world, [])}"
            f"{'; other world sizes: ' + others if others else ''}). Every rank must have finished "
            "finalize_calibration; check --world and the prefix")
    return [read_measurements(prefix, observer=observer, rank=r, world_size=world) for r in range(world)]


# ------------------------------------------------------------------------------------- merge
def merge_ranks(prefix: str | os.PathLike[str], world: int, *, out: str | os.PathLike[str] | None = None,
                observer: str | None = None) -> list[Path]:
    """Merge every rank's files by elementwise max into one shared set at ``out`` (default
    ``prefix``): ``{out}_hooks_{observer}.json/.npz/_mod_list.json``. Returns the paths."""
    merged = merge_measurements(read_ranks(prefix, world, observer))
    return write_measurements(merged, prefix if out is None else out)


# ----------------------------------------------------------------------------------- regroup
def rank_groups(world: int, to: int) -> list[list[int]]:
    """Old ranks of each new rank when shrinking ``world`` to ``to`` (consecutive blocks)."""
    _world(world), _world(to, "--to")
    if to >= world or world % to:
        raise ConfigError(f"cannot group {world} ranks into {to}: --to must divide --world and be smaller "
                          f"(for --to larger than --world, regroup expands each rank)")
    g = world // to
    return [list(range(i * g, (i + 1) * g)) for i in range(to)]


def parse_groups(text: str, world: int) -> list[list[int]]:
    """``"0,8--1,9--..."`` (vllm-hpu-extension's syntax: ranks by commas, groups by ``--``) as
    lists; every rank of ``world`` exactly once, groups of equal size."""
    try:
        groups = [[int(r) for r in g.split(",") if r.strip()] for g in text.replace(" ", "").strip("-").split("--")]
    except ValueError:
        raise ConfigError(f"--groups {text!r}: give rank numbers separated by commas and groups separated by "
                          "'--', e.g. '0,2--1,3'") from None
    flat = [r for g in groups for r in g]
    if sorted(flat) != list(range(world)) or len({len(g) for g in groups}) != 1 or not all(groups):
        raise ConfigError(f"--groups {text!r}: every rank 0..{world - 1} must appear exactly once, in groups of "
                          f"equal size (got {groups})")
    return groups


def _label(part: Measurements, i: int) -> str:
    return part.source or f"part {i}"


def _combine_arrays(arrays: list[np.ndarray | None], where: str, labels: list[str], rule: str) -> np.ndarray | None:
    if all(a is None for a in arrays):
        return None
    if any(a is None for a in arrays):
        i = next(i for i, a in enumerate(arrays) if a is None)
        raise MeasurementError(f"{where}: measured in {labels[0 if i else 1]} but not in {labels[i]}; the ranks "
                               "were measured with different configs")
    shapes = {a.shape for a in arrays}
    if rule == "concat" and arrays[0].size > 1:
        return np.concatenate(arrays, axis=0)
    if len(shapes) > 1:
        i = next(i for i, a in enumerate(arrays) if a.shape != arrays[0].shape)
        raise MeasurementError(f"{where}: shape {arrays[0].shape} in {labels[0]} but {arrays[i].shape} in "
                               f"{labels[i]}; these files cannot be combined (different observers or sharding)")
    if arrays[0].size > 1 and rule == "error":
        raise _ambiguous(where, arrays[0].shape, labels)
    return np.maximum.reduce(arrays)


def _ambiguous(where: str, shape: tuple, labels: list[str]) -> MeasurementError:
    return MeasurementError(
        f"{where} holds {shape[0]} values (per channel or per head) in {', '.join(labels[:4])}"
        f"{' ...' if len(labels) > 4 else ''}: when weights are sharded this axis may be split across the ranks "
        "(column-parallel Linear, attention heads) or not (row-parallel Linear), and the files do not say which. "
        "Pass --arrays max (elementwise max / copy, vllm-hpu-extension's rule, for an axis that is not sharded) or "
        "--arrays concat (concatenate / split, for a sharded axis); weight records are not read by QUANTIZE")


def _combine_nodes(parts: list[dict[str, NodeMeasurement]], labels: list[str], rule: str,
                   key: str = "") -> dict[str, NodeMeasurement]:
    names = list(parts[0])
    for i, p in enumerate(parts[1:], 1):
        missing, extra = [n for n in names if n not in p], [n for n in p if n not in parts[0]]
        if missing or extra:
            node = (missing or extra)[0]
            raise MeasurementError(f"node '{node}' is in {labels[0] if missing else labels[i]} but not in "
                                   f"{labels[i] if missing else labels[0]} ({len(missing) + len(extra)} nodes differ); "
                                   "combine files measured with the same model and config")
    out: dict[str, NodeMeasurement] = {}
    for name in names:
        nodes = [p[name] for p in parts]
        at = f"node '{name}'{key}"
        for i, n in enumerate(nodes[1:], 1):
            same = (len(n.inputs) == len(nodes[0].inputs) and (n.outputs is None) == (nodes[0].outputs is None)
                    and len(n.outputs or []) == len(nodes[0].outputs or []) and set(n.params) == set(nodes[0].params))
            if not same:
                raise MeasurementError(f"{at}: different entries in {labels[0]} and {labels[i]} (inputs, outputs or "
                                       "params); combine files measured with the same config")
        ins = [_combine_arrays([n.inputs[j] for n in nodes], f"{at} key 'inputs[{j}]'", labels, rule)
               for j in range(len(nodes[0].inputs))]
        outs = None if nodes[0].outputs is None else [
            _combine_arrays([n.outputs[j] for n in nodes], f"{at} key 'outputs[{j}]'", labels, rule)
            for j in range(len(nodes[0].outputs))]
        params = {k: _combine_arrays([n.params[k] for n in nodes], f"{at} key 'params.{k}'", labels, rule)
                  for k in nodes[0].params}
        out[name] = NodeMeasurement(inputs=ins, outputs=outs, params=params)
    return out


def _combine(parts: list[Measurements], rule: str) -> Measurements:
    labels = [_label(p, i) for i, p in enumerate(parts)]
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if (p.observer, p.observer_params) != (first.observer, first.observer_params) or \
                (p.maxabs is None) != (first.maxabs is None):
            raise MeasurementError(f"{labels[i]} and {labels[0]} were measured with different observers or observer "
                                   "parameters; combine files of one calibration")
    nodes = _combine_nodes([p.nodes for p in parts], labels, rule)
    maxabs = None if first.maxabs is None else _combine_nodes([p.maxabs for p in parts], labels, rule, " (MaxAbs)")
    samples = {p.num_samples for p in parts}
    return Measurements(nodes=nodes, observer=first.observer, num_samples=samples.pop() if len(samples) == 1 else None,
                        maxabs=maxabs, observer_params=first.observer_params,
                        source="combined(" + ", ".join(labels) + ")")


def _split_array(a: np.ndarray | None, k: int, j: int, where: str, label: str, rule: str) -> np.ndarray | None:
    if a is None or a.size == 1 or rule == "max":
        return None if a is None else a.copy()
    if rule == "error":
        raise _ambiguous(where, a.shape, [label])
    if a.shape[0] % k:
        raise MeasurementError(f"{where} in {label}: {a.shape[0]} values cannot be split into {k} equal parts "
                               "(--arrays concat); use --arrays max or another --to")
    n = a.shape[0] // k
    return a[j * n:(j + 1) * n].copy()


def _split_nodes(nodes: dict[str, NodeMeasurement], k: int, j: int, label: str, rule: str,
                 key: str = "") -> dict[str, NodeMeasurement]:
    out = {}
    for name, n in nodes.items():
        at = f"node '{name}'{key}"
        out[name] = NodeMeasurement(
            inputs=[_split_array(x, k, j, f"{at} key 'inputs[{i}]'", label, rule) for i, x in enumerate(n.inputs)],
            outputs=None if n.outputs is None else [_split_array(x, k, j, f"{at} key 'outputs[{i}]'", label, rule)
                                                    for i, x in enumerate(n.outputs)],
            params={p: _split_array(v, k, j, f"{at} key 'params.{p}'", label, rule) for p, v in n.params.items()})
    return out


def regroup(parts: Sequence[Measurements], to: int, *, groups: Sequence[Sequence[int]] | None = None,
            arrays: str = "error") -> list[Measurements]:
    """The measurements of ``to`` ranks from those of ``len(parts)`` ranks (module docstring)."""
    world = len(parts)
    _world(world, "the number of ranks"), _world(to, "--to")
    if arrays not in ARRAY_RULES:
        raise ConfigError(f"--arrays {arrays!r}: valid choices are {', '.join(ARRAY_RULES)}")
    if to == world:
        raise ConfigError(f"--to {to} equals --world {world}: nothing to regroup")
    if to < world:
        groups = rank_groups(world, to) if groups is None else [list(g) for g in groups]
        if len(groups) != to:
            raise ConfigError(f"--groups gives {len(groups)} groups, --to asks for {to}")
        return [_combine([parts[r] for r in g], arrays) for g in groups]
    if groups is not None:
        raise ConfigError("--groups applies when --to is smaller than --world (grouping ranks); expanding gives new "
                          "rank j the files of old rank j // (to / world)")
    if to % world:
        raise ConfigError(f"cannot expand {world} ranks to {to}: --to must be a multiple of --world (or divide it)")
    k = to // world
    out = []
    for j in range(to):
        src = parts[j // k]
        label = _label(src, j // k)
        out.append(Measurements(
            nodes=_split_nodes(src.nodes, k, j % k, label, arrays), observer=src.observer,
            num_samples=src.num_samples, observer_params=src.observer_params, source=f"split({label}, {j % k}/{k})",
            maxabs=None if src.maxabs is None else _split_nodes(src.maxabs, k, j % k, label, arrays, " (MaxAbs)")))
    return out


def regroup_ranks(prefix: str | os.PathLike[str], world: int, to: int, *, out: str | os.PathLike[str] | None = None,
                  observer: str | None = None, groups: Sequence[Sequence[int]] | None = None,
                  arrays: str = "error") -> list[list[Path]]:
    """Read the ``world`` ranks' files of ``prefix``, write ``to`` per-rank sets at ``out``
    (default ``prefix``) as ``{out}_hooks_{observer}_{i}_{to}``; returns each set's paths. Every
    set is computed (and checked) before the first is written."""
    new = regroup(read_ranks(prefix, world, observer), to, groups=groups, arrays=arrays)
    target = prefix if out is None else out
    return [write_measurements(m, target, rank=i, world_size=to) for i, m in enumerate(new)]

"""Multi-process calibration: data-parallel reduction over ``torch.distributed``, and which
measurement files a rank writes and reads.

Two ways to calibrate on several processes (the ``calibration_parallel`` config key):

* **data** — every rank holds the same model (replicas) and calibrates its share of the data.
  ``finalize_calibration`` reduces the observers of all ranks in place of each rank's own:
  ``amax`` by MAX, histogram counts by SUM, ``calls`` and ``nonfinite_calls`` by SUM, so the
  measurements are exactly those of one process that saw all the data (a non-finite value on
  any rank fails every rank; "never called" is judged on the sum). Weights are not reduced:
  they are checked to be the same on every rank. Rank 0 writes one set of files, without a
  rank suffix (the names a single process uses); the other ranks wait for it and return the
  same paths.
* **tensor** — the ranks hold different shards of the model (INC's tensor-parallel layout):
  every rank writes its own ``{prefix}_hooks_{observer}_{rank}_{world}`` files from its own
  observers, with no collective call; ``fp8fx measurements merge/regroup`` (:mod:`fp8fx.formats.ranks`)
  combine them afterwards.
* **auto** (default) — ``tensor`` when the config names per-rank files (``world_size`` /
  ``local_rank``) or when no process group with more than one rank is initialized (today's
  behaviour: per-rank files when ``WORLD_SIZE`` > 1). Otherwise the ranks compare what they
  measured: the same nodes, observer shapes and weights on every rank mean replicas, so
  ``data``; anything else (sharded weights) means ``tensor``. A different node set under
  auto also warns, since it may be a data-parallel run whose ranks took different paths.

The check before any reduction: every rank gathers (``all_gather_object``) the sorted node
names, each observer's shape and counts, and a digest of each weight (row and column max of
``|W|``). Under ``data`` a difference raises :class:`~fp8fx.errors.MeasurementError` on every
rank, naming the first differing node and rank, instead of a deadlock (different numbers of
collectives) or a silent mis-reduction (different layouts). Then two ``all_reduce`` calls on
flattened tensors (all ``amax`` values as one float32 MAX, all histograms as one int64 SUM) do
the reduction. ``finalize_calibration`` is therefore a collective call: every rank of the
group must make it (and ``convert`` of a prepared model that was never finalized, which
collects the statistics the same way). Collectives run on the device the backend needs (CUDA
for NCCL, the CPU otherwise); with NCCL, set each rank's CUDA device first.

The reduced values live in the observers only while the measurements are collected
(:meth:`CalibrationPlan.reduced`); afterwards every rank gets back its own statistics, so more
calibration and a second ``finalize_calibration`` reduce again correctly (nothing is counted
twice).

Reading (:func:`files_worker`, used by :func:`fp8fx.state.worker`): ``data`` reads the shared
files on every rank; ``tensor`` the rank's own; ``auto`` the rank's own when they exist, else
the shared set when it exists (what a data-parallel calibration wrote), so a QUANTIZE run under
``torchrun`` finds either kind. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import CalibrationParallel, FP8Config
from .errors import ConfigError, Fp8fxError, MeasurementError
from .formats.inc import Measurements, measurement_file_paths, mod_list_path, write_measurements

if TYPE_CHECKING:
    from .state import Fp8fxState

__all__ = ["CalibrationPlan", "calibration_plan", "files_worker", "process_group"]

_DATA, _TENSOR, _AUTO = CalibrationParallel.DATA, CalibrationParallel.TENSOR, CalibrationParallel.AUTO


# ------------------------------------------------------------------------------ process group
def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the initialized default ``torch.distributed`` group, else None."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def _collective_device() -> torch.device:
    """Where the default group's collectives take tensors: CUDA for NCCL, else the CPU."""
    backend = torch.distributed.get_backend()
    if backend == torch.distributed.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------- file names
def files_worker(cfg: FP8Config, per_rank: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    """The ``(rank, world_size)`` suffix of the measurement files this process reads.

    ``per_rank`` is the rank's own suffix (from the config or LOCAL_RANK/WORLD_SIZE). ``data``
    reads the shared set (no suffix); ``tensor`` the rank's own; ``auto`` the rank's own unless
    only the shared set exists.
    """
    mode = cfg.calibration_parallel
    if mode is _DATA:
        return None, None
    if mode is _TENSOR or per_rank == (None, None) or cfg.world_size is not None:
        return per_rank
    prefix, observer = cfg.dump_stats_path, cfg.observer.value
    if any(p.exists() for p in measurement_file_paths(prefix, observer, *per_rank)):
        return per_rank
    if any(p.exists() for p in measurement_file_paths(prefix, observer)):
        return None, None
    return per_rank


# ------------------------------------------------------------------------- what each rank saw
def _weight_digest(model: nn.Module, match: Any, per_channel: bool) -> str:
    """A digest of a weight that differs between shards: its shape and the max of ``|W|`` along
    every row and every column (exact, so replicas give the same digest). A weight offloaded to
    the meta device after sequential calibration is digested from the statistics taken while it
    was loaded (:func:`fp8fx.sequential.offloaded_weight_stats`)."""
    w = model.get_parameter(match.weight)
    h = hashlib.sha256(repr(tuple(w.shape)).encode())
    if w.is_meta:
        from .sequential import offloaded_weight_stats

        try:
            h.update(np.ascontiguousarray(offloaded_weight_stats(model, match, per_channel)).tobytes())
        except Fp8fxError:  # not measured: collecting the measurements fails on every rank anyway
            return "meta " + repr(tuple(w.shape))
        return h.hexdigest()[:16]
    a = w.detach().abs()
    a = a.reshape(-1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, -1)
    for v in (a.amax(dim=1), a.amax(dim=0)):
        h.update(v.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _subs(state: Fp8fxState) -> Iterator[tuple[str, str, Any]]:
    """``(node, "inputs[i]"/"outputs[i]", observer)`` of every observer, in a fixed order."""
    for name in sorted(state.observers):
        node = state.observers[name]
        for role, group in (("inputs", node.inputs), ("outputs", node.outputs)):
            for i, o in enumerate(group):
                yield name, f"{role}[{i}]", o


def _local_info(model: nn.Module, state: Fp8fxState, weights: bool) -> dict[str, Any]:
    nodes: dict[str, list[tuple]] = {}
    for name, where, o in _subs(state):
        shape = tuple(o.amax.shape) if o.calls > o.nonfinite_calls else None
        nodes.setdefault(name, []).append((where, shape, hasattr(o, "hist"), int(o.calls), int(o.nonfinite_calls)))
    digests: dict[str, str] = {}
    per_channel = state.config.observer.value == "maxabs_per_channel"
    if weights:
        for name in sorted(state.observers):
            d = state.decisions.get(name)
            if d is not None and d.match.weight is not None:
                digests[name] = _weight_digest(model, d.match, per_channel)
    return {"nodes": nodes, "weights": digests}


def _first_difference(infos: list[dict[str, Any]]) -> tuple[str, str] | None:
    """``(kind, message)`` of the first way a rank differs from rank 0, or None when none does.
    kind: "nodes" (node sets), "layout" (observer shapes), "weights"."""
    ref = infos[0]
    for r, info in enumerate(infos[1:], 1):
        a, b = set(ref["nodes"]), set(info["nodes"])
        if a != b:
            only0, onlyr = sorted(a - b), sorted(b - a)
            first = (f"node '{only0[0]}' is measured on rank 0 but not on rank {r}" if only0 and
                     (not onlyr or only0[0] < onlyr[0]) else
                     f"node '{onlyr[0]}' is measured on rank {r} but not on rank 0")
            return "nodes", (f"the ranks measured different sets of nodes: {first} ({len(a)} nodes on rank 0, "
                             f"{len(b)} on rank {r}; {len(only0) + len(onlyr)} differ)")
    for name in sorted(ref["nodes"]):
        rows = [info["nodes"][name] for info in infos]
        for r, row in enumerate(rows[1:], 1):
            if [(w, h) for w, _, h, _, _ in row] != [(w, h) for w, _, h, _, _ in rows[0]]:
                return "layout", (f"node '{name}' has observers {[w for w, *_ in rows[0]]} on rank 0 but "
                                  f"{[w for w, *_ in row]} on rank {r}")
        for j, (where, *_rest) in enumerate(rows[0]):
            seen = [(r, row[j][1]) for r, row in enumerate(rows) if row[j][1] is not None]
            for r, shape in seen[1:]:
                if shape != seen[0][1]:
                    return "layout", (f"node '{name}' {where} has shape {seen[0][1]} on rank {seen[0][0]} but "
                                      f"{shape} on rank {r}")
    for name in sorted(ref["weights"]):
        for r, info in enumerate(infos[1:], 1):
            if info["weights"].get(name) != ref["weights"][name]:
                return "weights", f"the weight of node '{name}' differs between rank 0 and rank {r}"
    return None


# ------------------------------------------------------------------------------------ the plan
@dataclass
class CalibrationPlan:
    """How this rank finishes a calibration: ``mode`` "single" (one process), "data" (reduce,
    rank 0 writes the shared set) or "tensor" (each rank writes its own files); ``rank`` and
    ``world_size`` name the files it writes (None, None: the shared set); ``reason`` says why."""

    mode: str
    rank: int | None
    world_size: int | None
    reason: str
    group_rank: int = 0
    infos: list[dict[str, Any]] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------------- reduction
    @contextlib.contextmanager
    def reduced(self, state: Fp8fxState) -> Iterator[None]:
        """Within the block the observers hold the statistics of all ranks (mode "data"); every
        rank's own come back afterwards. A failure on any rank inside the block fails all."""
        if self.mode != "data":
            yield
            return
        saved = [(o, o.amax, getattr(o, "hist", None), o.calls, o.nonfinite_calls) for _, _, o in _subs(state)]
        error: BaseException | None = None
        try:
            self._reduce(state)
            yield
        except Exception as exc:  # noqa: BLE001 - told to every rank below, then raised again
            error = exc
        finally:
            for o, amax, hist, calls, nonfinite in saved:
                o.amax, o.calls, o.nonfinite_calls = amax, calls, nonfinite
                if hist is not None:
                    o.hist = hist
        self._agree(error, "collecting the measurements")

    def _reduce(self, state: Fp8fxState) -> None:
        dist = torch.distributed
        device = _collective_device()
        subs = list(_subs(state))
        shapes, totals = [], []
        for j, (name, where, o) in enumerate(subs):
            index = [w for w, *_ in self.infos[0]["nodes"][name]].index(where)
            rows = [info["nodes"][name][index] for info in self.infos]
            shape = next((row[1] for row in rows if row[1] is not None), None)
            shapes.append(shape)
            totals.append((sum(row[3] for row in rows), sum(row[4] for row in rows)))
        if any(nonfinite for _, nonfinite in totals):  # every rank fails in _collect: no values needed
            for (_, _, o), (calls, nonfinite) in zip(subs, totals):
                o.calls, o.nonfinite_calls = calls, nonfinite
            return
        live = [(o, s) for (_, _, o), s in zip(subs, shapes) if s is not None]
        own = [o.calls > 0 for o, _ in live]
        amax = [o.amax.reshape(-1).float().to(device) if mine else torch.zeros(_numel(s), device=device)
                for (o, s), mine in zip(live, own)]
        hists = [(o, s, mine) for (o, s), mine in zip(live, own) if hasattr(o, "hist")]
        flat = torch.cat(amax) if amax else torch.zeros(0, device=device)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        counts = None
        if hists:
            from .observers import NUM_BINS

            counts = torch.cat([o.hist.reshape(-1).to(device, torch.int64) if mine else
                                torch.zeros(_numel(s) * NUM_BINS, dtype=torch.int64, device=device)
                                for o, s, mine in hists])
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        at = 0
        for o, s in live:
            n = _numel(s)
            o.amax = flat[at:at + n].reshape(s).to(o.amax.device)
            at += n
        if counts is not None:
            at = 0
            for o, s, _ in hists:
                n = _numel(s) * NUM_BINS
                shape = (_numel(s), NUM_BINS) if o.per_head else (NUM_BINS,)
                o.hist = counts[at:at + n].reshape(shape).to(o.hist.device)
                at += n
        for (_, _, o), (calls, nonfinite) in zip(subs, totals):
            o.calls, o.nonfinite_calls = calls, nonfinite

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether every other one succeeded; raises on all when one failed."""
        statuses: list[Any] = [None] * len(self.infos)
        torch.distributed.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            r, message = failed[0]
            raise MeasurementError(f"data-parallel calibration: rank {r} failed while {what}, so every rank "
                                   f"stops: {message}")

    # ---------------------------------------------------------------------------- writing
    def write(self, m: Measurements, prefix: str) -> list[Path]:
        """Write ``m``: this rank's files ("single", "tensor"), or rank 0's shared set ("data",
        the other ranks return the same paths once rank 0 has written them)."""
        if self.mode != "data":
            return write_measurements(m, prefix, rank=self.rank, world_size=self.world_size)
        paths = [*measurement_file_paths(prefix, m.observer), mod_list_path(prefix, m.observer)]
        status: list[Any] = [None]
        error: BaseException | None = None
        if self.group_rank == 0:
            try:
                paths = write_measurements(m, prefix)
            except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised
                error = exc
                status = [f"{type(exc).__name__}: {exc}"]
        torch.distributed.broadcast_object_list(status, src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise MeasurementError(f"data-parallel calibration: rank 0 could not write the measurement "
                                   f"files at {prefix!r}: {status[0]}")
        return [Path(p) for p in paths]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def calibration_plan(model: nn.Module, state: Fp8fxState,
                     per_rank: tuple[int | None, int | None] | None = None) -> CalibrationPlan:
    """Decide how this rank finishes its calibration (module docstring); with a process group of
    more than one rank and mode data or auto this is a collective call.

    ``per_rank`` is the rank's own file suffix (default: :func:`fp8fx.state.rank_world`).
    """
    cfg = state.config
    if per_rank is None:
        from .state import rank_world

        per_rank = rank_world(cfg)
    mode = cfg.calibration_parallel
    group = process_group()
    many = group is not None and group[1] > 1
    if mode is _TENSOR or (mode is _AUTO and cfg.world_size is not None):
        why = "calibration_parallel 'tensor'" if mode is _TENSOR else "the config sets world_size"
        return _tensor_plan(per_rank, why, group)
    if not many:
        if mode is _DATA and per_rank[1] is not None and per_rank[1] > 1:
            raise ConfigError(
                f"calibration_parallel 'data': this process is rank {per_rank[0]} of {per_rank[1]} (WORLD_SIZE) but "
                "no torch.distributed process group is initialized, so the ranks cannot reduce their statistics; "
                "call torch.distributed.init_process_group() before fp8fx.finalize_calibration, or use "
                "calibration_parallel 'tensor' and merge the per-rank files with `fp8fx measurements merge`")
        if mode is _DATA:
            return CalibrationPlan("single", None, None, "calibration_parallel 'data' in a single process")
        return CalibrationPlan("tensor" if per_rank != (None, None) else "single", *per_rank,
                               "no torch.distributed process group with more than one rank")
    rank, world = group
    infos: list[Any] = [None] * world
    torch.distributed.all_gather_object(infos, _local_info(model, state, weights=True))
    diff = _first_difference(infos)
    if diff is None:
        return CalibrationPlan("data", None, None, f"calibration_parallel '{mode.value}': {world} ranks measured "
                               "the same nodes with the same weights", group_rank=rank, infos=infos)
    kind, message = diff
    if mode is _DATA:
        hint = ("the ranks do not hold the same model (sharded weights: tensor parallel); use "
                "calibration_parallel 'tensor'" if kind == "weights" else
                "a rank whose control flow differed (another branch, different shapes or flags that changed the "
                "graph, a module skipped) measured something else; make every rank run the same graphs, or use "
                "calibration_parallel 'tensor' and merge the per-rank files with `fp8fx measurements merge`")
        raise MeasurementError(f"calibration_parallel 'data' (rank {rank} of {world}): {message}; nothing was "
                               f"reduced or written. {hint}")
    if kind == "nodes":
        warnings.warn(f"calibration_parallel 'auto': {message}, so each rank writes its own per-rank files "
                      "(tensor parallel). Set calibration_parallel to 'data' to make this an error, or to "
                      "'tensor' to silence this warning", UserWarning, stacklevel=3)
    return _tensor_plan(per_rank, f"calibration_parallel 'auto': {message}", group)


def _tensor_plan(per_rank: tuple[int | None, int | None], why: str,
                 group: tuple[int, int] | None) -> CalibrationPlan:
    if per_rank == (None, None) and group is not None and group[1] > 1:
        raise ConfigError(
            f"{why}, so each of the {group[1]} ranks writes its own measurement files, but this process has no "
            "per-rank file name (no WORLD_SIZE/LOCAL_RANK in the environment, no world_size/local_rank in the "
            "config) and the ranks would overwrite each other's files. Run under torchrun, set local_rank and "
            "world_size in the FP8Config, or use calibration_parallel 'data' for replicas of one model")
    return CalibrationPlan("tensor" if per_rank != (None, None) else "single", *per_rank, why)

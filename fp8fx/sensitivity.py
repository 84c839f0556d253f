"""What quantizing each node costs, and a blocklist that buys accuracy back where it is cheapest.

``sensitivity(model, calibration)`` measures every node the config quantizes, one at a time;
``auto_blocklist(model, calibration, validation, target_pct)`` keeps the most sensitive ones in
high precision (hp) until the FP8 model's perplexity on the validation text is within
``target_pct`` percent of the hp model's.

Design
------
* **One calibration.** MEASURE runs once, on a copy of the model (a QUANTIZE config is used as it
  is: its files already exist). Every later conversion reads those files, so a node scores with
  exactly the scales it gets in the final model, and a blocklist changes nothing else.
* **The table: "only this node in FP8".** Each row is measured with that node quantized and
  everything else in hp, on the first ``windows`` calibration windows (the text the scales came
  from; the validation text stays for the search, the evaluation text is never read here):

  - ``kl``: mean per predicted token of KL(hp || only-this-node-FP8) of the next-token
    distributions, in nats. It is never negative and it does not depend on whether the noise
    happens to move the loss up or down on these tokens, so the ranking uses it;
  - ``nll_delta`` / ``ppl_delta_pct``: the change of the mean next-token NLL (and perplexity)
    on the same tokens; small nodes' deltas are noise of either sign;
  - ``sqnr_db`` (Linears): the node's own output against hp, both computed from the hp model's
    input to it (``numerics.sqnr_db``'s formula, summed over every call);
  - ``flops`` (Linears): ``2 * rows * in_features * out_features`` counted on those windows, and
    ``flop_share``, the node's part of the FLOPs of every Linear the config quantizes.

  "Only this node" (rather than "all but this node") is measured because the quantity is then a
  clean, positive change against hp, not a small difference of two noisy FP8 losses; summed over
  nodes it approximates the full FP8 model's KL to first order.
* **How a node is put in FP8.** A Linear that convert swaps for an :class:`~fp8fx.Fp8Linear`
  is measured by swapping that very module (taken from one fully converted copy) into an hp
  copy, running, and swapping back: no recapture, one forward per window per node. Any other
  node (attention matmul/softmax/SDPA, KV cache, MoE experts) is rewritten inside a graph, so it
  is measured by converting a fresh hp copy whose allowlist names only that node: one capture
  per node (seconds each), so attention rows cost more.
* **The search** (:func:`auto_blocklist`) ranks nodes by ``kl`` and keeps the top ``k`` in hp
  (``^name$`` regexes added to the config's blocklist). Each candidate ``k`` is verified on the
  validation text by converting a fresh copy and measuring perplexity; nothing is predicted
  without being verified. ``k = 0`` (all in FP8) is tried first; while no ``k`` has passed, the
  next one is the smallest whose remaining ``kl`` sum, scaled from the last failure's measured
  delta, predicts the target with a 10% margin (at least one more node, and at least twice the
  last step after a miss); once a ``k`` passes, bisection between the largest failing and the
  smallest passing ``k`` looks for fewer kept nodes. At most ``max_evals`` FP8 perplexities are
  measured; the result is the smallest verified ``k`` that meets the target, or, if none did,
  the best one measured, with ``target_met`` False.
* **FLOP share.** :meth:`AutoBlocklist.fp8_flop_share` is the part of the FLOPs of the Linears
  the config quantizes that stays in FP8 with the blocklist; ``fp8_flop_share_all_linears``
  divides by every Linear of the model instead (a blocklisted ``lm_head`` included). Attention
  ops are counted as nodes (in FP8 / kept), not FLOPs.
* **The plot** (:func:`plot_sensitivity`) needs matplotlib, imported only when a plot is asked
  for; without it a clear error names the package.

Nothing here changes the model it is given; it works on deep copies (an hp model of a few
hundred MB is copied once per verification and once for scoring).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FP8Config, Mode
from .errors import ConfigError, Fp8fxError
from .modules import Fp8Linear

__all__ = ["NodeSensitivity", "SensitivityTable", "AutoBlocklist", "sensitivity", "auto_blocklist",
           "exact_name", "plot_sensitivity", "MATPLOTLIB_INSTALL"]

MATPLOTLIB_INSTALL = "python3 -m pip install matplotlib==3.11.2"
ATTENTION_KINDS = ("matmul", "softmax", "sdpa", "kv_cache")
_DEFAULT_BLOCKLIST = {"names": ["lm_head"]}


def exact_name(name: str) -> str:
    """The blocklist/allowlist regex that matches exactly the node ``name`` (``re.search``)."""
    return f"^{re.escape(name)}$"


def _db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` (the formula of ``numerics.sqnr_db``, over summed powers)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _bar(items: Sequence[Any], progress: bool, desc: str, unit: str) -> Iterable[Any]:
    from .evaluate import progress_enabled

    if not progress_enabled(progress):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class NodeSensitivity:
    """What quantizing one node (and nothing else) costs."""

    name: str
    kind: str
    module_type: str
    kl: float                  # mean KL(hp || only this node FP8) per predicted token, nats
    nll_delta: float           # mean NLL change per predicted token, nats
    sqnr_db: float | None      # the node's output vs hp from the same input (Linears)
    flops: int | None          # FLOPs on the scored windows (Linears)
    flop_share: float | None   # part of the quantized Linears' FLOPs
    method: str                # "swap" (module swapped in) or "convert" (graph rewrite)

    @property
    def ppl_delta_pct(self) -> float:
        return math.expm1(self.nll_delta) * 100.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ppl_delta_pct"] = self.ppl_delta_pct
        if d["sqnr_db"] is not None and not math.isfinite(d["sqnr_db"]):
            d["sqnr_db"] = None if math.isnan(d["sqnr_db"]) else str(d["sqnr_db"])
        return d


@dataclass
class SensitivityTable:
    """Rows in graph order; :meth:`ranked` sorts them most sensitive first."""

    rows: list[NodeSensitivity]
    windows: int
    tokens: int                  # predicted tokens scored per node
    hp_nll: float                # mean NLL of the hp model on those tokens
    linear_flops: int            # FLOPs of every Linear of the model on those windows
    config: FP8Config = field(repr=False)  # the QUANTIZE config the rows were converted with

    def ranked(self) -> list[NodeSensitivity]:
        """Most sensitive first: by ``kl``, then by lower ``sqnr_db``."""
        def key(r: NodeSensitivity) -> tuple[float, float]:
            return (-r.kl, r.sqnr_db if r.sqnr_db is not None else math.inf)
        return sorted(self.rows, key=key)

    def row(self, name: str) -> NodeSensitivity:
        for r in self.rows:
            if r.name == name:
                return r
        raise Fp8fxError(f"no node {name!r} in the sensitivity table; its nodes are "
                         f"{', '.join(r.name for r in self.rows[:10])}{' ...' if len(self.rows) > 10 else ''}")

    @property
    def quantized_linear_flops(self) -> int:
        return sum(r.flops or 0 for r in self.rows if r.kind == "linear")

    def to_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "tokens": self.tokens, "hp_nll": self.hp_nll,
                "linear_flops": self.linear_flops,
                "quantized_linear_flops": self.quantized_linear_flops,
                "rows": [r.to_dict() for r in self.ranked()]}

    def __str__(self) -> str:
        head = ("#", "node", "kind", "FLOPs %", "SQNR dB", "KL mnats", "ppl delta %")
        body = []
        for i, r in enumerate(self.ranked(), 1):
            body.append((str(i), r.name, r.kind,
                         "" if r.flop_share is None else f"{100 * r.flop_share:.2f}",
                         "" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
                         f"{1000 * r.kl:.3f}", f"{r.ppl_delta_pct:+.3f}"))
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = [f"sensitivity: each node alone in FP8, {self.tokens} predicted tokens "
                 f"({self.windows} calibration window(s)); most sensitive first"]
        for row in [head, *body]:
            cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
            cells += [c.rjust(w) for c, w in zip(row[3:], widths[3:])]
            lines.append("  ".join(cells).rstrip())
        total_kl = sum(r.kl for r in self.rows)
        lines.append(f"sum of KL over nodes: {1000 * total_kl:.3f} mnats per token; hp NLL "
                     f"{self.hp_nll:.4f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- shared steps
def _check_model(model: nn.Module, what: str) -> None:
    from .state import state_of

    if not isinstance(model, nn.Module):
        raise Fp8fxError(f"fp8fx.{what}: model must be a torch.nn.Module, got {type(model).__name__}")
    if state_of(model) is not None:
        raise Fp8fxError(f"fp8fx.{what}: {type(model).__name__} was already prepared or converted "
                         "by fp8fx; pass the high-precision model (it is copied, never changed)")


def _windows(items: Sequence[torch.Tensor], what: str, option: str) -> list[torch.Tensor]:
    out = list(items) if items is not None else []
    if not out:
        raise Fp8fxError(f"fp8fx.{what}: {option} is empty; give at least one [batch, seq>=2] "
                         "tensor of token ids")
    for i, ids in enumerate(out):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise Fp8fxError(f"fp8fx.{what}: {option}[{i}] is {shape}; expected a [batch, seq>=2] "
                             "tensor of token ids")
    return out


def _base_config(cfg: FP8Config | dict | str | None) -> FP8Config:
    from .state import resolve_config

    if cfg is None:
        return FP8Config(mode="MEASURE", blocklist=_DEFAULT_BLOCKLIST)
    return resolve_config(cfg, "sensitivity")


def _quantize_config(model: nn.Module, calibration: list[torch.Tensor], cfg: FP8Config,
                     workdir: Path, progress: bool) -> FP8Config:
    """The QUANTIZE config every conversion uses: ``cfg`` itself when QUANTIZE (its files must
    exist), else measured once on a copy into ``workdir``."""
    import fp8fx

    if cfg.mode is Mode.QUANTIZE:  # convert reads (and checks) its files
        return cfg
    if cfg.mode not in (Mode.MEASURE, Mode.AUTO):
        raise ConfigError(f"fp8fx.sensitivity: mode {cfg.mode.value!r} is not supported; use MEASURE "
                          "(calibrates once) or QUANTIZE (reads existing measurement files)")
    prefix = str(workdir / "measure")
    measured = fp8fx.prepare(copy.deepcopy(model), cfg.replace(mode="MEASURE", dump_stats_path=prefix))
    with torch.no_grad():
        for ids in _bar(calibration, progress, "calibrate", "win"):
            measured(ids)
    fp8fx.finalize_calibration(measured)
    del measured
    return cfg.replace(mode="QUANTIZE", dump_stats_path=prefix)


def _converted(model: nn.Module, qcfg: FP8Config, example: torch.Tensor) -> nn.Module:
    """A fresh hp copy converted with ``qcfg`` (its graph captured on ``example``)."""
    import fp8fx

    fresh = fp8fx.convert(copy.deepcopy(model), qcfg)
    with torch.no_grad():
        fresh(example)
    return fresh


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[predicted tokens, vocab]`` (float32)."""
    from .evaluate import _logits

    logits = _logits(model(ids))[:, :-1, :].float()
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


@dataclass
class _Reference:
    """The hp model's next-token distributions on the scored windows."""

    windows: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    nll: float       # mean NLL per predicted token
    tokens: int


def _targets(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, 1:].reshape(-1, 1)


def _reference(model: nn.Module, windows: list[torch.Tensor]) -> _Reference:
    lps, total, count = [], 0.0, 0
    with torch.no_grad():
        for ids in windows:
            lp = _log_probs(model, ids)
            lps.append(lp)
            total -= float(lp.gather(1, _targets(ids)).double().sum())
            count += lp.shape[0]
    return _Reference(windows, lps, total / count, count)


def _score(model: nn.Module, ref: _Reference) -> tuple[float, float]:
    """(mean KL(hp || model), mean NLL change) per predicted token on the reference windows."""
    kl_sum, nll_sum = 0.0, 0.0
    with torch.no_grad():
        for ids, lp_hp in zip(ref.windows, ref.log_probs):
            lp = _log_probs(model, ids)
            kl_sum += float((lp_hp.exp() * (lp_hp - lp)).sum(dtype=torch.float64))
            nll_sum -= float(lp.gather(1, _targets(ids)).double().sum())
    mean_nll = nll_sum / ref.tokens
    if not (math.isfinite(kl_sum) and math.isfinite(mean_nll)):
        raise Fp8fxError("the model produced inf/NaN logits while scoring a node's sensitivity")
    return max(kl_sum / ref.tokens, 0.0), mean_nll - ref.nll


def _linear_pass(work: nn.Module, fp8: dict[str, nn.Module], windows: list[torch.Tensor]
                 ) -> tuple[_Reference, dict[str, int], dict[str, float]]:
    """One hp pass: the reference distributions, every Linear's FLOPs (by module path) and the
    SQNR of each swappable node's FP8 module fed the hp input."""
    flops: dict[str, int] = {}
    power: dict[str, list[float]] = {name: [0.0, 0.0] for name in fp8}
    handles = []

    def hook(name: str, module: nn.Linear) -> Callable[..., None]:
        def record(_mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            rows = x.numel() // module.in_features
            flops[name] = flops.get(name, 0) + 2 * rows * module.in_features * module.out_features
            if name in fp8 and isinstance(output, torch.Tensor):
                ref = output.detach().double()
                approx = fp8[name](x).detach().double()
                power[name][0] += float(ref.square().sum())
                power[name][1] += float((ref - approx).square().sum())
        return record

    for name, module in work.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        ref = _reference(work, windows)
    finally:
        for h in handles:
            h.remove()
    return ref, flops, {name: _db(*p) for name, p in power.items()}


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


# --------------------------------------------------------------------------- sensitivity
def sensitivity(model: nn.Module, calibration: Sequence[torch.Tensor],
                cfg: FP8Config | dict | str | None = None, *, windows: int = 2,
                measurements_dir: str | Path | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None) -> SensitivityTable:
    """Measure every node ``cfg`` quantizes, each alone in FP8 (see the module docstring).

    ``calibration`` is a list of ``[batch, seq]`` token-id tensors: all of them calibrate (a
    MEASURE config; default: W8A8 with ``lm_head`` blocklisted), the first ``windows`` are
    scored. A QUANTIZE config reuses its measurement files. Measurements go to
    ``measurements_dir`` when given (kept), else to a temporary folder removed on return.
    ``model`` is not changed. ``log`` receives a line per tenth of the nodes measured.
    """
    _check_model(model, "sensitivity")
    calibration = _windows(calibration, "sensitivity", "calibration")
    if not isinstance(windows, int) or windows < 1:
        raise Fp8fxError(f"fp8fx.sensitivity: windows must be a positive integer, got {windows!r}")
    base = _base_config(cfg)
    if measurements_dir is not None:
        Path(measurements_dir).mkdir(parents=True, exist_ok=True)
        return _sensitivity(model, calibration, base, windows, Path(measurements_dir), progress, log)
    with tempfile.TemporaryDirectory(prefix="fp8fx-sens-") as tmp:
        return _sensitivity(model, calibration, base, windows, Path(tmp), progress, log)


def _sensitivity(model: nn.Module, calibration: list[torch.Tensor], base: FP8Config, windows: int,
                 workdir: Path, progress: bool, log: Callable[[str], None] | None) -> SensitivityTable:
    import fp8fx

    qcfg = _quantize_config(model, calibration, base, workdir, progress)
    scored = calibration[:windows]
    full = _converted(model, qcfg, scored[0])
    decisions = [d for d in fp8fx.explain(full).rows if d.quantize]
    if not decisions:
        raise Fp8fxError("fp8fx.sensitivity: the config quantizes no node of "
                         f"{type(model).__name__}; check its allowlist/blocklist (fp8fx.explain)")
    fp8_modules = {d.match.name: full.get_submodule(d.match.name) for d in decisions
                   if d.match.kind.value == "linear" and d.match.module_path == d.match.name
                   and isinstance(full.get_submodule(d.match.name), Fp8Linear)}
    work = copy.deepcopy(model)
    ref, flops, sqnr = _linear_pass(work, fp8_modules, scored)
    quantized_flops = sum(flops.get(d.match.name, 0) for d in decisions if d.match.kind.value == "linear")

    rows: list[NodeSensitivity] = []
    every = max(1, len(decisions) // 10)
    for i, d in enumerate(_bar(decisions, progress, "sensitivity", "node"), 1):
        name = d.match.name
        if name in fp8_modules:
            parent_path, leaf = _split(name)
            parent = work.get_submodule(parent_path)
            original = getattr(parent, leaf)
            setattr(parent, leaf, fp8_modules[name])
            try:
                kl, dnll = _score(work, ref)
            finally:
                setattr(parent, leaf, original)
            method = "swap"
        else:
            alone = qcfg.replace(allowlist={"names": [exact_name(name)], "types": []})
            single = _converted(model, alone, scored[0])
            kl, dnll = _score(single, ref)
            del single
            method = "convert"
        f = flops.get(name) if d.match.kind.value == "linear" else None
        rows.append(NodeSensitivity(
            name=name, kind=d.match.kind.value, module_type=d.match.module_type, kl=kl, nll_delta=dnll,
            sqnr_db=sqnr.get(name), flops=f,
            flop_share=(f / quantized_flops) if f is not None and quantized_flops else None, method=method))
        if log is not None and (i % every == 0 or i == len(decisions)):
            log(f"sensitivity: {i} of {len(decisions)} nodes measured")
    del full, work
    return SensitivityTable(rows=rows, windows=len(scored), tokens=ref.tokens, hp_nll=ref.nll,
                            linear_flops=sum(flops.values()), config=qcfg)


# --------------------------------------------------------------------------- auto blocklist
@dataclass
class AutoBlocklist:
    """The search's result: which nodes stay in hp, and what it measured."""

    target_pct: float
    target_met: bool
    kept: list[str]                 # nodes kept in hp, most sensitive first
    ppl_hp: float                   # on the validation text
    ppl_fp8: float                  # with ``kept`` in hp
    ppl_all_fp8: float              # with every node in FP8
    evaluations: list[dict[str, Any]]   # {"kept": k, "ppl": ..., "delta_pct": ...} in order
    table: SensitivityTable = field(repr=False)

    @property
    def delta_pct(self) -> float:
        return (self.ppl_fp8 - self.ppl_hp) / self.ppl_hp * 100.0

    @property
    def blocklist_names(self) -> list[str]:
        return [exact_name(n) for n in self.kept]

    def apply(self, cfg: FP8Config) -> FP8Config:
        """``cfg`` with the kept nodes added to its blocklist (its other settings unchanged)."""
        block = cfg.blocklist
        names = [*block.names, *(n for n in self.blocklist_names if n not in block.names)]
        return cfg.replace(blocklist={"names": names, "types": list(block.types)})

    def _linear_flops(self) -> tuple[int, int]:
        rows = [r for r in self.table.rows if r.kind == "linear" and r.flops is not None]
        kept = set(self.kept)
        return sum(r.flops for r in rows if r.name not in kept), sum(r.flops for r in rows)

    @property
    def fp8_flop_share(self) -> float:
        """Part of the FLOPs of the Linears the config quantizes that stays in FP8."""
        fp8, total = self._linear_flops()
        return fp8 / total if total else 0.0

    @property
    def fp8_flop_share_all_linears(self) -> float:
        """Part of the FLOPs of every Linear of the model (blocklisted ones too) in FP8."""
        fp8, _ = self._linear_flops()
        return fp8 / self.table.linear_flops if self.table.linear_flops else 0.0

    def attention_counts(self) -> dict[str, int]:
        att = [r.name for r in self.table.rows if r.kind in ATTENTION_KINDS]
        kept = sum(1 for n in att if n in set(self.kept))
        return {"fp8": len(att) - kept, "kept": kept}

    def to_dict(self) -> dict[str, Any]:
        return {"target_pct": self.target_pct, "target_met": self.target_met, "kept": list(self.kept),
                "kept_kinds": {r.name: r.kind for r in self.table.rows if r.name in set(self.kept)},
                "ppl_hp_validation": self.ppl_hp, "ppl_fp8_validation": self.ppl_fp8,
                "delta_pct_validation": self.delta_pct, "ppl_all_fp8_validation": self.ppl_all_fp8,
                "fp8_flop_share": self.fp8_flop_share,
                "fp8_flop_share_all_linears": self.fp8_flop_share_all_linears,
                "attention": self.attention_counts(), "evaluations": list(self.evaluations),
                "nodes": len(self.table.rows)}

    def __str__(self) -> str:
        att = self.attention_counts()
        lines = [
            f"auto-blocklist (target {self.target_pct:g}% on the validation text): "
            + ("met" if self.target_met else "NOT met within the evaluation budget"),
            f"  validation perplexity: hp {self.ppl_hp:.3f}, all FP8 {self.ppl_all_fp8:.3f} "
            f"({(self.ppl_all_fp8 - self.ppl_hp) / self.ppl_hp * 100:+.2f}%), with the blocklist "
            f"{self.ppl_fp8:.3f} ({self.delta_pct:+.2f}%)",
            f"  kept in high precision: {len(self.kept)} of {len(self.table.rows)} nodes"
            + (": " + ", ".join(self.kept) if self.kept else ""),
            f"  Linear FLOPs in FP8: {100 * self.fp8_flop_share:.1f}% of the quantizable Linears, "
            f"{100 * self.fp8_flop_share_all_linears:.1f}% of all Linears",
        ]
        if att["fp8"] or att["kept"]:
            lines.append(f"  attention ops: {att['fp8']} in FP8, {att['kept']} kept in high precision")
        lines.append("  evaluated: " + ", ".join(f"{e['kept']} kept {e['delta_pct']:+.2f}%"
                                                for e in self.evaluations))
        return "\n".join(lines)


def _next_k(scores: list[float], lo: int, d_lo: float, target: float, step: int) -> int:
    """Smallest ``k > lo`` whose remaining score, scaled from the delta measured at ``lo``,
    predicts ``0.9 * target``; at least ``lo + step``."""
    n = len(scores)
    remaining_lo = sum(scores[lo:])
    k = n
    if remaining_lo > 0 and d_lo > 0:
        want = 0.9 * target / d_lo * remaining_lo
        rest = remaining_lo
        for j in range(lo, n):
            if rest <= want:
                k = j
                break
            rest -= scores[j]
    return min(n, max(k, lo + step))


def search_kept(scores: Sequence[float], delta: Callable[[int], float], target: float,
                max_evals: int) -> dict[int, float]:
    """The search over ``k`` (nodes kept in hp, the ``k`` highest ``scores``): ``delta(k)`` measures
    the perplexity change in percent. Returns every measured ``{k: delta}``, in order; at most
    ``max_evals`` calls, none once a ``k`` passed and no smaller ``k`` is left to try."""
    scores = [max(float(s), 0.0) for s in scores]
    deltas = {0: delta(0)}
    lo, hi, step = 0, None, 1
    while deltas[0] > target and len(deltas) < max_evals:
        if hi is None:
            k = _next_k(scores, lo, deltas[lo], target, step)
        elif hi - lo > 1:
            k = (lo + hi) // 2
        else:
            break
        if k in deltas:
            break
        deltas[k] = delta(k)
        if deltas[k] <= target:
            hi = k
        else:
            step = max(1, 2 * (k - lo))
            lo = k
    return deltas


def auto_blocklist(model: nn.Module, calibration: Sequence[torch.Tensor], validation: Sequence[torch.Tensor],
                   target_pct: float, cfg: FP8Config | dict | str | None = None, *,
                   table: SensitivityTable | None = None, windows: int = 2, max_evals: int = 8,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> AutoBlocklist:
    """Keep the most sensitive nodes in hp until FP8 perplexity on ``validation`` is within
    ``target_pct`` percent of hp's (see the module docstring for the search).

    ``validation`` must be text neither calibration nor the final evaluation uses. ``table``
    reuses a :func:`sensitivity` result (its measurement files must still exist: pass
    ``measurements_dir`` to it); else one is measured. At most ``max_evals`` FP8 perplexities.
    """
    _check_model(model, "auto_blocklist")
    calibration = _windows(calibration, "auto_blocklist", "calibration")
    validation = _windows(validation, "auto_blocklist", "validation")
    if isinstance(target_pct, bool) or not isinstance(target_pct, (int, float)) or not target_pct >= 0 \
            or not math.isfinite(target_pct):
        raise Fp8fxError(f"fp8fx.auto_blocklist: target_pct must be a finite number >= 0 (percent), "
                         f"got {target_pct!r}")
    if not isinstance(max_evals, int) or max_evals < 1:
        raise Fp8fxError(f"fp8fx.auto_blocklist: max_evals must be a positive integer, got {max_evals!r}")
    if table is not None:
        return _search(model, validation, float(target_pct), table, max_evals, progress, log)
    with tempfile.TemporaryDirectory(prefix="fp8fx-auto-") as tmp:
        found = sensitivity(model, calibration, cfg, windows=windows, measurements_dir=tmp, progress=progress,
                            log=log)
        return _search(model, validation, float(target_pct), found, max_evals, progress, log)


def _search(model: nn.Module, validation: list[torch.Tensor], target: float, table: SensitivityTable,
            max_evals: int, progress: bool, log: Callable[[str], None] | None) -> AutoBlocklist:
    import gc

    from .evaluate import perplexity

    qcfg = table.config  # its measurement files must still exist: convert says so if not
    say = log or (lambda _msg: None)
    order = [r.name for r in table.ranked()]
    scores = [r.kl for r in table.ranked()]
    ppl_hp = perplexity(model, validation, progress=progress, desc="hp validation")
    say(f"auto-blocklist: hp validation perplexity {ppl_hp:.3f}; target +{target:g}%")
    measured: dict[int, float] = {}

    def delta(k: int) -> float:
        if k >= len(order):  # every node kept: the hp model itself, nothing to convert
            ppl = ppl_hp
        else:
            m = _converted(model, _blocked(qcfg, order[:k]), validation[0])
            try:
                ppl = perplexity(m, validation, progress=progress, desc=f"{k} kept")
            finally:
                del m
                gc.collect()
        measured[k] = ppl
        d = (ppl - ppl_hp) / ppl_hp * 100.0
        say(f"auto-blocklist: [{len(measured)}/{max_evals}] {k} of {len(order)} nodes kept in hp: validation "
            f"{ppl:.3f} ({d:+.2f}%) {'meets' if d <= target else 'misses'} the target")
        return d

    deltas = search_kept(scores, delta, target, max_evals)
    passing = [k for k, d in deltas.items() if d <= target]
    best = min(passing) if passing else min(deltas, key=lambda k: deltas[k])
    return AutoBlocklist(target_pct=target, target_met=bool(passing), kept=order[:best], ppl_hp=ppl_hp,
                         ppl_fp8=measured[best], ppl_all_fp8=measured[0],
                         evaluations=[{"kept": k, "ppl": measured[k],
                                       "delta_pct": (measured[k] - ppl_hp) / ppl_hp * 100.0}
                                      for k in measured], table=table)


def _blocked(qcfg: FP8Config, names: Sequence[str]) -> FP8Config:
    block = qcfg.blocklist
    return qcfg.replace(blocklist={"names": [*block.names, *(exact_name(n) for n in names)],
                                   "types": list(block.types)})


# --------------------------------------------------------------------------- plot
def plot_sensitivity(table: SensitivityTable, path: str | Path,
                     kept: Iterable[str] = ()) -> Path:
    """Write a PNG: nodes in graph order on the x axis; KL (log scale) and SQNR panels. Nodes in
    ``kept`` (an auto-blocklist) are marked. Needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise Fp8fxError(f"the sensitivity plot needs the package 'matplotlib', which is not installed: "
                         f"{MATPLOTLIB_INSTALL}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    rows = table.rows
    kept_set = set(kept)
    x = list(range(len(rows)))
    kinds = sorted({_leaf_kind(r) for r in rows})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, (ax_kl, ax_sqnr) = plt.subplots(2, 1, sharex=True, figsize=(max(8.0, 0.07 * len(rows) + 4), 7))
    for kind in kinds:
        idx = [i for i, r in enumerate(rows) if _leaf_kind(r) == kind]
        ax_kl.scatter(idx, [max(rows[i].kl, 1e-9) for i in idx], s=14, color=colours[kind], label=kind)
        with_sqnr = [i for i in idx if rows[i].sqnr_db is not None and math.isfinite(rows[i].sqnr_db)]
        ax_sqnr.scatter(with_sqnr, [rows[i].sqnr_db for i in with_sqnr], s=14, color=colours[kind])
    marked = [i for i, r in enumerate(rows) if r.name in kept_set]
    if marked:
        ax_kl.scatter(marked, [max(rows[i].kl, 1e-9) for i in marked], s=70, facecolors="none",
                      edgecolors="black", label="kept in high precision")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(hp || node in FP8), nats/token")
    ax_kl.set_title(f"FP8 sensitivity per node ({table.tokens} tokens; each node alone in FP8)")
    ax_kl.legend(fontsize=7, ncol=4)
    ax_sqnr.set_ylabel("output SQNR, dB")
    ax_sqnr.set_xlabel("node, in graph order")
    step = max(1, len(rows) // 40)
    ax_sqnr.set_xticks(x[::step])
    ax_sqnr.set_xticklabels([rows[i].name for i in x[::step]], rotation=90, fontsize=6)
    fig.tight_layout()
    target = Path(path).expanduser()
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except OSError as exc:
        raise Fp8fxError(f"cannot write the sensitivity plot {target}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
    return target


def _leaf_kind(row: NodeSensitivity) -> str:
    """The plot's colour group: a Linear's own attribute name (q_proj, down_proj ...), else its kind."""
    if row.kind == "linear":
        return row.name.rpartition(".")[2] or row.name
    return row.kind


# --------------------------------------------------------------------------- the command
def cli_phase(args: Any, model: nn.Module, cfg: FP8Config, tokenizer: Any, calib_path: Path,
              eval_path: Path, clock: Any, progress: bool) -> tuple[FP8Config, dict[str, Any] | None]:
    """``fp8fx quantize --sensitivity / --auto-blocklist PCT``: runs on the hp ``model`` before
    the job calibrates it; returns the job's config (with the kept nodes blocklisted) and the
    report's ``"sensitivity"`` entry (None when neither option is given).

    Calibration is the job's own (the first ``--calib-tokens`` of ``--calib``); the validation
    text is the last ``--validation-tokens`` of the same file (``fp8fx.data``), which
    calibration never sees; ``--eval`` must be another file and is never read here.
    """
    import os
    import sys

    from . import data

    want_table = bool(getattr(args, "sensitivity", False))
    target = getattr(args, "auto_blocklist", None)
    if not want_table and target is None:
        return cfg, None
    plot_path = None
    if want_table:
        plot_path = Path(args.sensitivity_plot or (Path(args.out) / "sensitivity.png" if args.out
                                                   else "sensitivity.png")).expanduser()
        try:
            import matplotlib  # noqa: F401 - checked before the minutes of measuring
        except ImportError:
            raise Fp8fxError(f"--sensitivity writes a plot and needs the package 'matplotlib', which is "
                             f"not installed: {MATPLOTLIB_INSTALL}") from None
        if plot_path.is_dir():
            raise Fp8fxError(f"--sensitivity-plot {plot_path}: is a folder; give a .png file path")
    try:
        same = os.path.samefile(calib_path, eval_path)
    except OSError:
        same = False
    if same:
        raise Fp8fxError(f"--calib and --eval are the same file ({eval_path}): the validation text is cut "
                         "from --calib and must never be the evaluation text; give another --eval")
    ids_text = data.read_text(calib_path)
    try:
        calib, validation = data.calibration_and_validation_windows(
            tokenizer, ids_text, args.window, args.calib_tokens, args.validation_tokens)
    except Fp8fxError as exc:
        raise Fp8fxError(f"--calib {calib_path}: {exc}; give a longer text or smaller --calib-tokens / "
                         "--validation-tokens") from exc
    n_tokens = len(data.token_ids(tokenizer, ids_text))
    start, stop = data.validation_span(n_tokens, args.calib_tokens, args.validation_tokens)

    def say(message: str) -> None:
        print(f"fp8fx: {message}", file=sys.stderr, flush=True)

    found = None
    if target is not None:
        with clock.phase("auto_blocklist"):
            found = auto_blocklist(model, calib, validation, target, cfg, windows=args.sensitivity_windows,
                                   max_evals=args.auto_blocklist_evals, progress=progress, log=say)
        table = found.table
    else:
        with clock.phase("sensitivity"):
            table = sensitivity(model, calib, cfg, windows=args.sensitivity_windows, progress=progress, log=say)
    if want_table:
        print(table)
        plot_sensitivity(table, plot_path, kept=found.kept if found else ())
        print(f"sensitivity plot: {plot_path}")
    if found is not None:
        print(found)
        cfg = found.apply(cfg)
    report = {
        "validation": {"file": str(calib_path), "tokens": [start, stop]},
        "table": table.to_dict() if want_table else None,
        "plot": str(plot_path) if plot_path else None,
        "auto_blocklist": found.to_dict() if found is not None else None,
    }
    return cfg, report


class _CallableModule(types.ModuleType):
    """``fp8fx.sensitivity`` is this module; ``fp8fx.sensitivity(model, calibration)`` calls
    :func:`sensitivity` (one name for the module and its main function, whichever import ran first)."""

    def __call__(self, *args: Any, **kwargs: Any) -> SensitivityTable:
        return sensitivity(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

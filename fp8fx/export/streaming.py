"""Quantize a safetensors checkpoint shard by shard, without ever building the model.

::

    fp8fx.quantize_checkpoint("llama-bf16", "llama-fp8", scheme="FP8_DYNAMIC", workers=2)
    fp8fx quantize-checkpoint llama-bf16 llama-fp8 --scheme FP8_BLOCK --format vllm --workers 2

What is quantized is decided exactly as :func:`fp8fx.quantize` decides it, from a model tree of
the architecture that ``config.json`` names, built with every parameter on the meta device
(:func:`~.checks.skeleton`): each ``nn.Linear`` of that tree is one candidate, named by
``named_modules()``, and goes through :func:`fp8fx.passes.annotate.decide` with the same config
(by default every Linear but ``lm_head``; ``cfg``'s allowlist/blocklist otherwise; a weight tied
to another parameter, by identity, stays in high precision). Checkpoint keys are mapped to their
modules through the tree's own parameters and persistent buffers: a key the tree lacks, or a
tensor of the tree the checkpoint lacks, is refused before anything is computed.

Each input shard is one task: its tensors are read one at a time with ``safetensors.safe_open``
(the file is opened for each tensor, so at most one tensor's pages are ever mapped), each selected
Linear weight goes through :func:`fp8fx.passes.rewrite.linear_quant` (the scales ``convert``
computes, with the input scale from the measurements for static schemes) into an
:class:`~fp8fx.modules.Fp8Linear`, whose tensors the format lays out (its ``linear_tensors``),
and every other tensor is copied as stored. Output tensors are written to disk as they are made
(:class:`_StreamWriter`), so a task holds one tensor at a time, not a shard. Tasks run in worker
processes (a spawn-context process pool; ``workers=1`` runs them in this process).

The output folder gets one file per input shard (more when ``max_shard_size`` splits one; a
Linear's scales always stay next to its weight), ``model.safetensors.index.json``, ``config.json``
with the format's ``quantization_config``, and the other files of the input (tokenizer,
generation config; not weights of other formats, not sub-folders). It is written as
:func:`fp8fx.save_pretrained` writes: into a hidden sibling folder that is validated with
:func:`~.core.validate` (a problem refuses the checkpoint) and only then renamed onto ``out_dir``.

Not covered (use the whole-model path, or blocklist them): KV-cache and other attention-op
scales, MoE expert stacks, GPT-2 ``Conv1D`` (all refused with an error naming the modules); a
Linear whose forward is never called, or one module called twice, is decided like any other
(the whole-model path sees calls in a graph; a checkpoint has none).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import struct
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FP8Config
from ..errors import ConfigError, Fp8fxError, UnsupportedError
from ..formats.inc import Measurements, read_measurements
from ..fp8 import FORMATS as FP8_FORMATS
from ..modules import Fp8Experts, Fp8Linear
from ..passes.annotate import Decision, _is_conv1d, decide
from ..passes.match import INC_TYPE_NAMES, Match, OpKind, _linear_name
from ..passes.rewrite import linear_quant
from .checks import (CONFIG, DTYPE_NAMES, FP8_NAMES, INDEX, SINGLE, CheckpointError, Manifest, Problem,
                     manifest_from_dir, skeleton, structure)
from .core import Report, format_module, validate
from .plan import Plan, QLinear
from .writer import parse_size, write_folder

__all__ = ["quantize_checkpoint", "StreamResult"]

#: files of the input folder that are not copied: weights (the output has its own), other formats' weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NAMES = {d: n for n, d in DTYPE_NAMES.items()}
_MAX_LISTED = 20


@dataclass
class StreamResult:
    """What :func:`quantize_checkpoint` wrote and measured."""

    path: Path                     # the checkpoint folder
    report: Report                 # the validator's report on it (no problems)
    quantized: list[str]           # FP8 Linear modules
    hp_linears: list[str]          # Linear modules left in high precision
    shards_in: int
    files_out: int
    bytes_in: int                  # tensor bytes read
    bytes_out: int                 # tensor bytes written
    seconds: float
    workers: int
    #: peak resident memory (VmHWM, bytes) of each process that ran tasks, by pid (this process
    #: when workers=1); empty where /proc is not available
    peak_rss: dict[int, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ streaming writer
class _StreamWriter:
    """One safetensors file written tensor by tensor.

    The file starts with room for the header (``reserve`` bytes, an upper bound estimated from the
    tensor names); tensor data is appended as it arrives and the header is written last, padded
    with spaces, as the format allows. A header larger than the room moves the data once."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path, self.reserve = path, -(-max(reserve, 64) // 8) * 8
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.file.seek(8 + self.reserve)
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0

    def add(self, key: str, t: Tensor) -> None:
        t = t.detach().contiguous().cpu()
        name = _NAMES.get(t.dtype)
        if name is None:
            raise UnsupportedError(f"{key}: dtype {t.dtype} has no safetensors name")
        data = t.reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.entries[key] = {"dtype": name, "shape": list(t.shape), "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes

    def close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
            self.file.close()
            return
        self.file.close()
        moved = self.path.with_name(self.path.name + ".move")
        padded = header + b" " * (-len(header) % 8)
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(padded)) + padded)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(moved, self.path)


# ----------------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class _Linear:
    name: str
    type_name: str
    bias: str | None       # bias key
    bias_file: str | None  # the shard that holds it


@dataclass(frozen=True)
class _Task:
    index: int
    in_dir: str
    shard: str
    folder: str
    items: tuple[tuple[str, _Linear | None], ...]   # (key, Linear whose weight it is, or None: copy)
    cfg: FP8Config
    meas: Measurements | None
    fmt: str
    max_bytes: int | None
    reserve: int


@dataclass(frozen=True)
class _Done:
    index: int
    files: tuple[tuple[str, tuple[str, ...]], ...]   # (file in the folder, its keys)
    bytes_out: int
    pid: int
    peak_rss: int | None


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _read(path: Path, key: str) -> Tensor:
    """One tensor, from a file mapped only while it is read (its pages leave this process's RSS)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _outputs(task: _Task, key: str, linear: _Linear | None, root: Path) -> dict[str, Tensor]:
    t = _read(root / task.shard, key)
    if linear is None:
        return {key: t}
    bias = _read(root / linear.bias_file, linear.bias) if linear.bias is not None else None
    q = linear_quant(t, linear.name, linear.type_name, task.cfg, task.meas)
    del t
    module = Fp8Linear(q.weight, q.weight_scale, q.input_scale, bias, task.cfg.fp8_max, q.scheme)
    return dict(format_module(task.fmt).linear_tensors(linear.name, module))


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _run(task: _Task) -> _Done:
    """Quantize one input shard into its file(s) in ``task.folder`` (named ``.part-<shard>-<j>``)."""
    root, folder = Path(task.in_dir), Path(task.folder)
    files: list[tuple[str, list[str]]] = []
    writer: _StreamWriter | None = None
    bytes_out = 0
    try:
        for key, linear in task.items:
            group = _outputs(task, key, linear, root)
            size = sum(_nbytes(t) for t in group.values())
            if writer is not None and task.max_bytes is not None and writer.size and writer.size + size > task.max_bytes:
                writer.close()
                writer = None
            if writer is None:
                name = f".part-{task.index:05d}-{len(files):03d}.safetensors"
                writer = _StreamWriter(folder / name, task.reserve)
                files.append((name, []))
            for k in list(group):
                writer.add(k, group.pop(k))  # each tensor (and its mapped pages) freed once written
                files[-1][1].append(k)
            bytes_out += size
        if writer is not None:
            writer.close()
    except BaseException as e:
        if writer is not None:
            writer.file.close()
        if isinstance(e, Fp8fxError):
            raise _in_shard(e, task.shard) from None
        raise
    return _Done(task.index, tuple((n, tuple(k)) for n, k in files), bytes_out, os.getpid(), _peak_rss())


def _in_shard(e: Fp8fxError, shard: str) -> Fp8fxError:
    """The error, naming the shard, as a class that crosses a process boundary (one message argument)."""
    try:
        return type(e)(f"{shard}: {e}")
    except TypeError:
        return Fp8fxError(f"{shard}: {e}")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ planning
def _qconfig(scheme: Any, cfg: FP8Config | dict | str | None) -> FP8Config:
    """The QUANTIZE config, built as :func:`fp8fx.quantize` builds it."""
    from ..api import QUANTIZE_DEFAULT_BLOCKLIST
    from ..state import quantize_config, resolve_config

    if isinstance(scheme, FP8Config):
        if cfg is not None:
            raise ConfigError("fp8fx.quantize_checkpoint: give the scheme inside one FP8Config, or a scheme plus cfg, "
                              "not two configs")
        qcfg = scheme.replace(mode="QUANTIZE")
    else:
        if scheme is None:
            raise ConfigError("fp8fx.quantize_checkpoint: scheme is None; give a preset (FP8_DYNAMIC, FP8_BLOCK, FP8, "
                              "FP8_WEIGHT_ONLY) or a scheme object")
        base = FP8Config(blocklist=QUANTIZE_DEFAULT_BLOCKLIST) if cfg is None else resolve_config(cfg, "quantize_checkpoint")
        qcfg = base.replace(mode="QUANTIZE", scheme=scheme)
    return quantize_config(qcfg, None)


def _check_input(m: Manifest) -> None:
    if m.problems:
        raise CheckpointError(f"fp8fx.quantize_checkpoint: input {m.source}", m.problems)
    if m.quant is not None:
        raise UnsupportedError(f"{m.source}: {CONFIG} has a quantization_config (quant_method "
                               f"{m.quant.get('quant_method')!r}): the checkpoint is already quantized; give the "
                               "high-precision checkpoint")
    odd = sorted(k for k, i in m.tensors.items() if i.dtype not in DTYPE_NAMES)
    if odd:
        raise UnsupportedError(f"{m.source}: tensor(s) of a dtype fp8fx does not handle: "
                               f"{', '.join(f'{k} ({m.tensors[k].dtype})' for k in odd[:4])}")
    fp8 = sorted(k for k, i in m.tensors.items() if i.dtype in FP8_NAMES)
    if fp8:
        raise UnsupportedError(f"{m.source}: {len(fp8)} tensor(s) are already FP8 ({', '.join(fp8[:4])}): give the "
                               "high-precision checkpoint")


def _owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """state_dict key -> (module path, attribute), from the modules' own parameters and buffers."""
    out: dict[str, tuple[str, str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for leaf, p in mod._parameters.items():
            if p is not None:
                out[prefix + leaf] = (path, leaf)
        for leaf, b in mod._buffers.items():
            if b is not None and leaf not in mod._non_persistent_buffers_set:
                out[prefix + leaf] = (path, leaf)
    return out


def _listed(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return problems[:_MAX_LISTED] + [Problem("...", f"and {len(problems) - _MAX_LISTED} more")]


def _tied_key(model: nn.Module) -> str | None:
    """The output embedding's weight key when it is the input embedding's tensor (stored once)."""
    st = structure(model)
    if not (st.tied and st.output_embedding and st.input_embedding):
        return None
    out_w = getattr(model.get_submodule(st.output_embedding), "weight", None)
    in_w = getattr(model.get_submodule(st.input_embedding), "weight", None)
    return f"{st.output_embedding}.weight" if out_w is not None and out_w is in_w else None


def _check_keys(m: Manifest, model: nn.Module, owners: dict[str, tuple[str, str]], tied: str | None) -> None:
    arch = type(model).__name__
    unknown = [Problem(k, f"not a parameter or buffer of {arch} (built from {CONFIG}): fp8fx cannot tell what it "
                       "is; remove it, or fix architectures in config.json") for k in sorted(m.tensors.keys() - owners.keys())]
    missing = [Problem(k, "missing from the checkpoint: a consumer would initialize it at random")
               for k in sorted(owners.keys() - m.tensors.keys()) if k != tied]
    if unknown or missing:
        raise CheckpointError(f"fp8fx.quantize_checkpoint: input {m.source} does not match {arch}",
                              _listed(unknown) + _listed(missing))


def _check_dtypes(m: Manifest, cfg: FP8Config) -> None:
    """``hp_dtype`` must be the stored dtype (fp8fx.quantize's check_hp_dtype, on the stored tensors)."""
    want = cfg.hp_torch_dtype
    if want is None:
        return
    wrong = sorted(k for k, i in m.tensors.items()
                   if DTYPE_NAMES.get(i.dtype, torch.int8).is_floating_point and DTYPE_NAMES[i.dtype] != want)
    if wrong:
        raise ConfigError(f"hp_dtype is {cfg.hp_dtype.value!r} but {len(wrong)} tensor(s) of {m.source} are stored in "
                          f"another dtype: {', '.join(f'{k} ({m.tensors[k].dtype})' for k in wrong[:3])}. Set hp_dtype "
                          "to the stored dtype, or leave it unset to follow the checkpoint")


def _decisions(model: nn.Module, cfg: FP8Config) -> list[tuple[Decision, nn.Module]]:
    """One :func:`decide` per Linear-like module (and MoE expert stack) of the tree."""
    out = []
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        linear = isinstance(mod, nn.Linear)
        if linear or _is_conv1d(mod):
            bias = f"{prefix}bias" if mod._parameters.get("bias") is not None else None
            match = Match(node=path, kind=OpKind.LINEAR, name=path, module_path=path, module_type=type(mod).__name__,
                          inputs=(), weight=f"{prefix}weight", weight_transposed=not linear, bias=bias,
                          module_is_linear=linear)
            out.append((decide(match, cfg, model), mod))
            continue
        for leaf, p in mod._parameters.items():
            if p is not None and p.dim() == 3 and leaf in Fp8Experts.PROJECTIONS:
                key = prefix + leaf
                match = Match(node=key, kind=OpKind.LINEAR, name=_linear_name(key), module_path=path,
                              module_type=type(mod).__name__, inputs=(), weight=key, experts=int(p.shape[0]))
                out.append((decide(match, cfg, model), mod))
    return out


def _refuse_other_kinds(model: nn.Module, cfg: FP8Config, picked: list[tuple[Decision, nn.Module]]) -> None:
    """What the whole-model path would quantize but no checkpoint of this path can hold."""
    experts = [d.match.name for d, _ in picked if d.quantize and d.match.experts]
    conv = [d.match.name for d, mod in picked if d.quantize and not d.match.experts and not isinstance(mod, nn.Linear)]
    if experts:
        raise UnsupportedError(f"FP8 MoE experts ({', '.join(experts[:4])}) are not exported in this version: each "
                               "engine has its own expert layout. Blocklist the experts modules to quantize the rest")
    if conv:
        raise UnsupportedError(f"{', '.join(conv[:6])}: {type(model).__name__} holds these as Conv1D (weight stored "
                               "[in, out]), which these formats do not quantize. Blocklist them")
    ops = []
    for path in structure(model).attention:
        attn = model.get_submodule(path)
        for kind in (OpKind.KV_CACHE, OpKind.SDPA, OpKind.MATMUL, OpKind.SOFTMAX):
            types = (kind.value, type(attn).__name__, *INC_TYPE_NAMES[kind])
            if any(cfg.filter_reason(f"{path}.{kind.value}_{i}", types) is None for i in (0, 1)):
                ops.append(f"{path}.{kind.value}")
    if ops:
        raise UnsupportedError(f"the config quantizes attention ops ({', '.join(ops[:4])}{' ...' if len(ops) > 4 else ''}), "
                               "which need a calibrated model graph: quantize_checkpoint quantizes Linears only. Add "
                               "blocklist types [\"kv_cache\", \"sdpa\", \"matmul\", \"softmax\"] (or give no cfg), or use "
                               "fp8fx.convert + fp8fx.save_pretrained")


def _load_measurements(measurements: Any, cfg: FP8Config) -> Measurements | None:
    from ..state import load_measurements, measurement_exists, worker

    if measurements is None:
        return load_measurements(cfg) if measurement_exists(cfg) else None
    if isinstance(measurements, Measurements):
        return measurements
    if not isinstance(measurements, (str, os.PathLike)):
        raise ConfigError(f"measurements must be a dump_stats_path prefix, a .json/.npz file or a Measurements, got "
                          f"{type(measurements).__name__}")
    rank, world = worker(cfg)
    return read_measurements(measurements, observer=cfg.observer.value, rank=rank, world_size=world)


def _measured(model: nn.Module, cfg: FP8Config, decisions: list[Decision], measurements: Any) -> tuple[Measurements | None, set[str]]:
    """The measurements static Linears need (checked as convert checks them) and the Linears
    that ``ignore_modules_wo_measures`` leaves in high precision."""
    from ..api import _check_names, _needs_measurement

    need = [d.match.name for d in decisions if d.quantize and _needs_measurement(d.match, cfg)]
    if not need:
        return None, set()
    meas = _load_measurements(measurements, cfg)
    if meas is None:
        raise ConfigError(f"scheme {cfg.scheme.to_json() if cfg.scheme else None!r} has static activation scales, "
                          f"which come from calibration ({len(need)} Linear(s), e.g. {need[0]}): pass measurements= "
                          "(CLI: --measurements PREFIX) naming the INC measurement files of a calibration of this "
                          f"model (none at dump_stats_path {cfg.dump_stats_path!r}), or pick a dynamic scheme "
                          "(FP8_DYNAMIC, FP8_BLOCK, FP8_WEIGHT_ONLY)")
    return meas, _check_names(model, decisions, meas, cfg)


# --------------------------------------------------------------------------------- entry point
def quantize_checkpoint(in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], scheme: Any = "FP8_DYNAMIC",
                        format: str = "compressed-tensors", cfg: FP8Config | dict | str | None = None,
                        measurements: Any = None, workers: int = 1, max_shard_size: int | str | None = None,
                        progress: bool = False) -> StreamResult:
    """Quantize the safetensors checkpoint ``in_dir`` into a ``format`` checkpoint ``out_dir``
    shard by shard (module docstring); returns a :class:`StreamResult`.

    ``scheme`` and ``cfg`` mean what they mean for :func:`fp8fx.quantize` (no ``cfg``: every
    Linear but ``lm_head``). Static schemes (``"FP8"``) need ``measurements``: an INC
    ``dump_stats_path`` prefix or file of a calibration of this model (or a
    :class:`~fp8fx.formats.inc.Measurements`); without it ``cfg``'s ``dump_stats_path`` is used
    when files exist there. ``workers`` processes run one input shard each at a time.
    ``max_shard_size`` (``"2GB"``) splits an output file; None keeps one file per input shard.
    Bad input raises before anything is written; ``out_dir`` only ever holds a complete, validated
    checkpoint (or what it held before).
    """
    t0 = time.perf_counter()
    fmt = format_module(format)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    src, dst = Path(in_dir), Path(out_dir)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConfigError(f"out_dir {dst} is the input folder or inside it; write the FP8 checkpoint elsewhere")
    qcfg = _qconfig(scheme, cfg)
    m = manifest_from_dir(src)
    _check_input(m)
    model = skeleton(m.config, m.source)
    owners = _owners(model)
    tied = _tied_key(model)
    _check_keys(m, model, owners, tied)
    _check_dtypes(m, qcfg)
    picked = _decisions(model, qcfg)
    _refuse_other_kinds(model, qcfg, picked)
    decisions = [d for d, mod in picked if isinstance(mod, nn.Linear)]
    meas, unmeasured = _measured(model, qcfg, decisions, measurements)
    selected = {d.match.name: d.match.module_type for d in decisions if d.quantize and d.match.name not in unmeasured}
    fp8 = FP8_FORMATS.get(qcfg.fp8_dtype)
    if fp8 is None or qcfg.fp8_max != fp8.max:
        raise UnsupportedError(f"quantizing for an FP8 range of {qcfg.fp8_max} ({qcfg.fp8_dtype}, e.g. Gaudi2's 240); the "
                               "consumers of these checkpoints quantize activations with the format's full range: "
                               "quantize for a target with the full range (cpu, cuda, gaudi3)")
    plan = Plan({n: QLinear(qcfg.scheme_for(n, t, experts=False), qcfg.fp8_dtype) for n, t in selected.items()},
                [d.match.name for d in decisions if d.match.name not in selected])
    if not plan.linears:
        raise UnsupportedError(f"{m.source}: the config selects no Linear of {type(model).__name__} to quantize "
                               "(allowlist/blocklist); nothing to write")
    config = {**m.config, "quantization_config": fmt.quant_config(plan)}  # raises when the format cannot hold it
    linears = {f"{n}.weight": _Linear(n, t, f"{n}.bias" if f"{n}.bias" in m.tensors else None,
                                      m.tensors[f"{n}.bias"].file if f"{n}.bias" in m.tensors else None)
               for n, t in selected.items()}
    skip = {lin.bias for lin in linears.values() if lin.bias is not None} | ({tied} if tied else set())
    shards = sorted({i.file for i in m.tensors.values()})
    by_shard: dict[str, list[str]] = {s: [] for s in shards}
    for key, info in m.tensors.items():
        if key not in skip:
            by_shard[info.file].append(key)
    result: dict[str, Any] = {}

    def fill(folder: Path) -> None:
        tasks = [_Task(i, str(src), s, str(folder), tuple((k, linears.get(k)) for k in keys), qcfg, meas, fmt.NAME,
                       max_bytes, 256 + sum(3 * (len(k) + 160) for k in keys))
                 for i, (s, keys) in enumerate(by_shard.items()) if keys]
        done = _execute(tasks, workers, progress)
        result["done"] = done
        parts = [f for d in done for f in d.files]
        names = [SINGLE] if len(parts) == 1 else [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                                                  for i in range(len(parts))]
        for (part, _), name in zip(parts, names):
            os.rename(folder / part, folder / name)
        if len(parts) > 1:
            index = {"metadata": {"total_size": sum(d.bytes_out for d in done)},
                     "weight_map": {k: name for (_, keys), name in zip(parts, names) for k in keys}}
            (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name not in (CONFIG, INDEX) \
                    and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
                shutil.copyfile(f, folder / f.name)
        for name, text in (fmt.extra_files(plan) if hasattr(fmt, "extra_files") else {}).items():
            (folder / name).write_text(text)  # a format's own files (ModelOpt's hf_quant_config.json)
        report = validate(manifest_from_dir(folder), fmt)
        if report.problems:
            raise CheckpointError(f"fp8fx.quantize_checkpoint({fmt.NAME}) refused to write {dst}", report.problems)
        result["report"], result["files"] = report, len(parts)

    path = write_folder(dst, fill)
    done: list[_Done] = result["done"]
    peaks: dict[int, int] = {}
    for d in done:
        if d.peak_rss is not None:
            peaks[d.pid] = max(peaks.get(d.pid, 0), d.peak_rss)
    bytes_in = sum(math.prod(i.shape) * DTYPE_NAMES[i.dtype].itemsize for i in m.tensors.values())
    return StreamResult(path, result["report"], list(plan.linears), list(plan.hp_linears), len(shards),
                        result["files"], bytes_in, sum(d.bytes_out for d in done),
                        time.perf_counter() - t0, workers, peaks)


def _execute(tasks: Sequence[_Task], workers: int, progress: bool) -> list[_Done]:
    """Run the tasks (in worker processes when ``workers`` > 1); results in task order."""
    from ..evaluate import progress_enabled

    bar = None
    if progress_enabled(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="shards", unit="shard", dynamic_ncols=True)
    try:
        if workers == 1 or len(tasks) <= 1:
            out = []
            for t in tasks:
                out.append(_run(t))
                if bar is not None:
                    bar.update(1)
            return out
        n = min(workers, len(tasks))
        threads = max(1, (os.cpu_count() or 1) // n)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures: list[Future[_Done]] = [pool.submit(_run, t) for t in tasks]
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    if f.exception() is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                        f.result()  # raises the task's error
                    if bar is not None:
                        bar.update(1)
            return [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.close()


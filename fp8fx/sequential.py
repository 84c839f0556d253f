"""Sequential (layer-by-layer) calibration: one decoder block in memory at a time.

``fp8fx.prepare(model, cfg, sequential=True, calibration_data=batches)`` calibrates in
*layer-major* order instead of running every batch through the whole model:

1. **Inputs of block i.** For every batch the model's own forward runs (eagerly, uninstrumented)
   with blocks ``0..i-1`` replaced by a *replay* of their cached outputs and a pre-hook on block
   ``i`` that records the ``(args, kwargs)`` it receives and stops the forward. Whatever the model
   computes before a block (embeddings, rotary position embeddings, the causal mask, per-layer
   masks of hybrid-attention models) is therefore exactly what that block receives in a
   whole-model forward. The recorded hidden states must be *the very tensor* the previous
   block returned (checked by identity): a model that transforms the hidden states between two
   blocks is refused, since those ops would see replayed values.
2. **Block i.** Its weights are brought to the compute device (from CPU memory, or read from
   the safetensors files by qualified name for a model loaded with :func:`load_offloaded`), its
   forward is replaced by a dynamo-compiled forward whose graph carries MEASURE observers
   (:func:`fp8fx.state.instrument`, the same passes as the whole-model path), every batch goes
   through it, and its outputs become the next block's cached inputs. Nodes are named against
   the ROOT model (:class:`BlockNames` prefixes the block's path), so a block graph names its
   nodes exactly as the whole-model graph does. Then the weights go back (to CPU, or to the
   meta device after their statistics were taken: :func:`offloaded_weight_stats`).
3. **Outside the blocks.** The model's forward runs once per batch, compiled and instrumented as
   in ``prepare``, with *every* block replaced by a replay of the last block's outputs: the ops
   before the first block (e.g. the rotary-embedding matmul) and after the last one (final
   norm, ``lm_head``) are observed on the values they see in a whole-model forward.

Observers accumulate in the model's one :class:`~fp8fx.state.Fp8fxState`, so
``fp8fx.finalize_calibration(model)`` writes one set of measurement files, equal to those of a
whole-model calibration on the same batches (``use_cache=False``).

Block list: ``blocks="model.layers"`` names it; by default it is the one ``nn.ModuleList`` of the
model whose children are all of a class the model lists in ``_no_split_modules`` (transformers'
own "never split this module" declaration). A model without one, or with several (encoder and
decoder), is refused with a message suggesting ``blocks=`` or whole-model calibration.

Activations between blocks live in CPU memory; past ``cache_limit_bytes`` further batches are
written to a temporary folder (one ``torch.save`` file per batch, written atomically) and read
back when needed. Calibration runs with ``use_cache=False`` (added when the forward takes it):
KV-cache writes are not measured; calibrate the whole model to quantize the KV cache.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .capture import CapturedGraph, CompiledForward, ModuleNames
from .errors import ConfigError, Fp8fxError, MeasurementError, UnsupportedError
from .fileio import atomic_path
from .passes.match import OpKind
from .state import Fp8fxState, instrument

__all__ = ["ActivationCache", "BlockNames", "CheckpointWeights", "calibrate", "find_blocks", "load_offloaded",
           "offloaded_weight_stats"]


# ------------------------------------------------------------------------------ block list
def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(qualified path, module list)`` of the blocks calibrated one at a time."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ConfigError(f"sequential calibration: blocks={blocks!r} names no submodule of "
                              f"{type(model).__name__}; give the path of its list of decoder blocks "
                              "(e.g. 'model.layers')") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ConfigError(f"sequential calibration: blocks={blocks!r} is a {type(found).__name__}, not a "
                              "non-empty nn.ModuleList of blocks")
        return blocks, found
    classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and all(type(c).__name__ in classes for c in mod)]
    if len(lists) == 1:
        return lists[0]
    what = ("several lists of blocks: " + ", ".join(n for n, _ in lists)) if lists else (
        f"no nn.ModuleList of its _no_split_modules classes ({sorted(classes) or 'none declared'})")
    raise ConfigError(f"sequential calibration: {type(model).__name__} has {what}; name the list with "
                      "blocks='path.of.layers', or calibrate the whole model (sequential=False)")


class BlockNames(ModuleNames):
    """:class:`~fp8fx.capture.ModuleNames` of one block, named as in the root model: every
    parameter and module path gets the block's qualified path as a prefix (the block's own
    forward is the module ``prefix`` itself), so match names equal the whole-model graph's."""

    def __init__(self, block: nn.Module, prefix: str) -> None:
        super().__init__(block)
        self.prefix = prefix
        self.tensors = {k: f"{prefix}.{v}" for k, v in self.tensors.items()}

    def owner(self, node: torch.fx.Node) -> tuple[str, str]:
        path, type_name = super().owner(node)
        if not path:
            return self.prefix, type_name or type(self.root).__name__
        return f"{self.prefix}.{path}", type_name


def _block_graph(cg: CapturedGraph, block: nn.Module, prefix: str) -> CapturedGraph:
    return CapturedGraph(gm=cg.gm, example_inputs=cg.example_inputs, names=BlockNames(block, prefix),
                         param_names={k: f"{prefix}.{v}" for k, v in cg.param_names.items()})


# ------------------------------------------------------------------------------ tensors
def _map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _nbytes(value: Any) -> int:
    total = 0

    def add(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    _map(value, add)
    return total


def _to(value: Any, device: torch.device) -> Any:
    return _map(value, lambda t: t if t.device == device else t.to(device))


def _hidden(value: Any) -> Any:
    """The hidden states in a block's output: the output itself, or its first element."""
    return value[0] if isinstance(value, (tuple, list)) and value else value


class ActivationCache:
    """Per-batch values (a block's outputs) in CPU memory up to ``limit_bytes`` (None: no limit),
    the rest in ``folder`` as one ``torch.save`` file per batch, written atomically."""

    def __init__(self, folder: Path, limit_bytes: int | None = None) -> None:
        self.folder, self.limit = Path(folder), limit_bytes
        self.bytes_in_memory = 0
        self._memory: dict[int, Any] = {}
        self._files: dict[int, Path] = {}

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    @property
    def files(self) -> list[Path]:
        return list(self._files.values())

    def put(self, key: int, value: Any) -> None:
        n = _nbytes(value)
        if self.limit is None or self.bytes_in_memory + n <= self.limit:
            self._memory[key] = value
            self.bytes_in_memory += n
            return
        path = self.folder / f"batch_{key:06d}.pt"
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
        self._files[key] = path

    def get(self, key: int) -> Any:
        if key in self._memory:
            return self._memory[key]
        path = self._files[key]
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise MeasurementError(f"sequential calibration: cannot read cached activations {path}: {exc}; "
                                   "keep the cache folder until calibration ends") from exc

    def close(self) -> None:
        self._memory.clear()
        for path in self._files.values():
            with contextlib.suppress(OSError):
                path.unlink()
        self._files.clear()
        self.bytes_in_memory = 0


# ------------------------------------------------------------------------------ weights
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, CheckpointWeights]" = weakref.WeakKeyDictionary()
_WEIGHT_STATS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _slots(module: nn.Module, prefix: str) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """Every parameter/buffer of ``module`` by tensor identity: (qualified name, owner, leaf, is_param)."""
    out: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        base = ".".join(p for p in (prefix, mod_name) if p)
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for leaf, t in table.items():
                if t is not None:
                    out.setdefault(id(t), []).append((f"{base}.{leaf}" if base else leaf, mod, leaf, is_param))
    return out


def _set(slots: list[tuple[str, nn.Module, str, bool]], value: torch.Tensor) -> None:
    is_param = slots[0][3]
    obj = nn.Parameter(value, requires_grad=False) if is_param else value
    for _, mod, leaf, _ in slots:
        (mod._parameters if is_param else mod._buffers)[leaf] = obj


class CheckpointWeights:
    """The tensors of a safetensors checkpoint folder, read by qualified name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise Fp8fxError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise Fp8fxError(f"{self.folder}: no model.safetensors or model.safetensors.index.json; "
                                 "save the model with save_pretrained(DIR) (safetensors)")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}

    def load(self, module: nn.Module, prefix: str, device: torch.device, only: set[int] | None = None) -> int:
        """Give every meta tensor of ``module`` (qualified names under ``prefix``; only the tensors
        whose ids are in ``only`` when given) its checkpoint value on ``device``, in the meta
        tensor's dtype; returns the bytes loaded."""
        from safetensors import safe_open

        todo: dict[Path, list[tuple[str, list, torch.Tensor]]] = {}
        for key, slots in _slots(module, prefix).items():
            if only is not None and key not in only:
                continue
            current = getattr(slots[0][1], slots[0][2])
            if not current.is_meta:
                continue
            name = next((s[0] for s in slots if s[0] in self.files), None)
            if name is None:
                raise Fp8fxError(
                    f"{self.folder}: the checkpoint has no tensor {slots[0][0]!r} (nor any tied name of it); "
                    "the folder does not match the model's parameter names (a transformers key renaming?): "
                    "load the model with from_pretrained and calibrate it from CPU memory instead")
            todo.setdefault(self.files[name], []).append((name, slots, current))
        loaded = 0
        for path, items in todo.items():
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name, slots, current in items:
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(current.shape):
                        raise Fp8fxError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                                         f"{tuple(current.shape)}; the checkpoint belongs to another config")
                    t = t.to(current.dtype)
                    _set(slots, t)
                    loaded += t.numel() * t.element_size()
        return loaded

    @staticmethod
    def release(module: nn.Module) -> None:
        """Put every tensor of ``module`` back on the meta device."""
        for slots in _slots(module, "").values():
            current = getattr(slots[0][1], slots[0][2])
            if not current.is_meta:
                _set(slots, torch.empty_like(current, device="meta"))


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside the ``with`` block is moved to the meta device as it is
    registered (buffers, computed at init, stay where they are)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_offloaded(folder: str | Path, dtype: torch.dtype | str | None = None,
                   blocks: str | None = None) -> nn.Module:
    """A causal LM of the checkpoint ``folder`` whose blocks stay on disk (meta device) and
    whose other parameters (embeddings, final norm, lm_head) are loaded on CPU; sequential
    calibration reads each block from the safetensors files when it gets to it.

    ``dtype`` defaults to the dtype saved in the config; tensors are cast to it as they are read.
    Parameter names must equal the checkpoint's keys (true of Llama-shaped checkpoints); a
    missing key raises naming it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise Fp8fxError(f"{folder}: no config.json; give a Hugging Face model folder")
    config = AutoConfig.from_pretrained(folder)
    if isinstance(dtype, str):
        from .data import parse_dtype

        dtype = parse_dtype(dtype)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    weights = CheckpointWeights(folder)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    path, block_list = find_blocks(model, blocks)
    in_blocks = {id(t) for t in block_list.parameters()}
    outside = {k: v for k, v in _slots(model, "").items() if k not in in_blocks}
    weights.load(model, "", torch.device("cpu"), only=set(outside))  # embeddings, final norm, lm_head
    _SOURCES[model] = weights
    return model


def offloaded_weight_stats(model: nn.Module, match: Any, per_channel: bool) -> np.ndarray:
    """The weight statistics of a Linear whose weight went back to the meta device after its
    block was calibrated (taken while it was loaded, by the same function as for the others)."""
    stats = _WEIGHT_STATS.get(model, {}).get((match.weight, per_channel))
    if stats is None:
        raise MeasurementError(
            f"weight {match.weight!r} of {match.name!r} is on the meta device and was not measured while its "
            "block was loaded; calibrate with fp8fx.prepare(model, cfg, sequential=True, ...) on a model from "
            "fp8fx.sequential.load_offloaded, or load the weights")
    return stats


class _Resident:
    """Blocks whose weights are in memory: moved to the compute device and back."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def load(self, module: nn.Module, prefix: str, device: torch.device) -> int:
        first = next((t for t in [*module.parameters(), *module.buffers()]), None)
        if first is None or first.device == device:
            return 0
        if first.is_meta:
            raise Fp8fxError(f"block {prefix!r} has its parameters on the meta device and no checkpoint is "
                             "attached: load the model with fp8fx.sequential.load_offloaded(DIR), or load "
                             "its weights")
        self._home[id(module)] = first.device
        module.to(device)
        return sum(t.numel() * t.element_size() for t in module.parameters())

    def release(self, module: nn.Module) -> None:
        home = self._home.pop(id(module), None)
        if home is not None:
            module.to(home)


# ------------------------------------------------------------------------------ the run
class _Caught(Exception):
    """Private: raised by the pre-hook that records a block's inputs, to stop the forward."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("block inputs recorded")
        self.args, self.kwargs = args, kwargs


def _as_call(batch: Any, takes_use_cache: bool, index: int) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        raise ConfigError(f"calibration_data[{index}] is a {type(batch).__name__}; give a Tensor (input ids), "
                          "a tuple of positional arguments or a dict of keyword arguments")
    if kwargs.get("use_cache"):
        raise UnsupportedError(f"calibration_data[{index}] sets use_cache=True: sequential calibration runs "
                               "without a KV cache (KV-cache nodes are not measured); drop use_cache, or "
                               "calibrate the whole model to measure the KV cache")
    if takes_use_cache:
        kwargs["use_cache"] = False
    return args, kwargs


class _Replays:
    """Blocks whose forward returns a cached value instead of computing (see the module doc)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks, self.value = blocks, None
        for b in blocks:
            if "forward" in b.__dict__:
                raise UnsupportedError(f"{type(b).__name__} block has an instance forward (a hook library's "
                                       "wrapper?); sequential calibration replaces it: remove the wrapper")

    def __enter__(self) -> "_Replays":
        def replay(*_: Any, **__: Any) -> Any:
            return self.value

        for b in self.blocks:
            b.forward = replay
        return self

    def __exit__(self, *_: Any) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)


def _block_inputs(model: nn.Module, blocks: list[nn.Module], i: int, prev: Any, call: tuple[tuple, dict],
                  where: str) -> tuple[tuple, dict]:
    """What block ``i`` receives in the model's forward for one batch, with blocks ``< i``
    replaying ``prev`` (block ``i-1``'s output for that batch)."""

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Caught(args, kwargs)

    handle = blocks[i].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _Replays(blocks[:i]) as replays:
            replays.value = prev
            model(*call[0], **call[1])
    except _Caught as caught:
        args, kwargs = caught.args, caught.kwargs
    else:
        raise UnsupportedError(f"the forward of {type(model).__name__} did not call block {where}; sequential "
                               "calibration needs a model that runs every block of its block list")
    finally:
        handle.remove()
    if i:
        got = args[0] if args else kwargs.get("hidden_states")
        if got is not _hidden(prev):
            raise UnsupportedError(
                f"{type(model).__name__} changes the hidden states between blocks (block {where} does not "
                "receive the previous block's output itself), so ops between blocks cannot be observed "
                "block by block; calibrate the whole model, or name another block list with blocks=")
    return args, kwargs


def _bar(items: list, progress: bool) -> Iterable:
    from .evaluate import progress_enabled

    if not progress_enabled(progress):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="calibrate blocks", unit="block", leave=False, dynamic_ncols=True)


def _default_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def calibrate(model: nn.Module, state: Fp8fxState, calibration_data: Iterable[Any], *, blocks: str | None = None,
              device: str | torch.device | None = None, cache_limit_bytes: int | None = None,
              cache_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Calibrate ``model`` block by block into ``state`` (see the module docstring); returns a
    summary (blocks, batches, bytes of activations written to disk)."""
    path, block_list = find_blocks(model, blocks)
    blocks_ = list(block_list)
    forward = state.original_forward or model.forward
    try:
        takes_use_cache = "use_cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_use_cache = False
    calls = [_as_call(b, takes_use_cache, i) for i, b in enumerate(calibration_data)]
    if not calls:
        raise ConfigError("sequential calibration: calibration_data is empty; give a list of batches")
    if cache_limit_bytes is not None and cache_limit_bytes < 0:
        raise ConfigError(f"cache_limit_bytes must be >= 0 (bytes of activations kept in memory), got {cache_limit_bytes}")
    device = torch.device(device) if device is not None else _default_device(model)
    source = _SOURCES.get(model) or _Resident()
    per_channel = state.config.observer.value == "maxabs_per_channel"
    stats = _WEIGHT_STATS.setdefault(model, {})
    from .api import _weight_stats
    from .evaluate import release_freed_memory

    in_blocks = {id(t) for t in block_list.parameters()}
    empty = [n for n, t in model.named_parameters() if id(t) not in in_blocks and t.is_meta]
    if empty:
        raise Fp8fxError(f"sequential calibration: {len(empty)} parameter(s) outside the blocks of {type(model).__name__} "
                         f"are on the meta device ({', '.join(empty[:3])}); only blocks may be offloaded: load the "
                         "model with fp8fx.sequential.load_offloaded(DIR)")
    moved = [m for m in model.modules() if any(id(t) not in in_blocks and not t.is_meta and t.device != device
                                               for t in m.parameters(recurse=False))]
    homes = [(m, next(m.parameters(recurse=False)).device) for m in moved]
    for m in moved:
        m.to(device)
    cpu = torch.device("cpu")
    spilled = 0
    folder = Path(tempfile.mkdtemp(prefix="fp8fx-sequential-", dir=cache_dir))
    try:
        prev: ActivationCache | None = None
        for i in _bar(list(range(len(blocks_))), progress):
            block, prefix = blocks_[i], f"{path}.{i}"
            source.load(block, prefix, device)
            compiled = CompiledForward(block, lambda cg, b=block, p=prefix: instrument(_block_graph(cg, b, p), state, model))
            compiled.install()
            out = ActivationCache(folder / f"block_{i:04d}", cache_limit_bytes)
            try:
                with torch.no_grad():
                    for k, call in enumerate(calls):
                        previous = None if prev is None else _to(prev.get(k), device)
                        args, kwargs = _block_inputs(model, blocks_, i, previous, _to(call, device), prefix)
                        out.put(k, _to(block(*args, **kwargs), cpu) if device != cpu else block(*args, **kwargs))
                for name, d in state.decisions.items():
                    m = d.match
                    if m.kind is OpKind.LINEAR and m.weight is not None and m.weight.startswith(prefix + "."):
                        stats[(m.weight, per_channel)] = _weight_stats(model, m, per_channel)
            finally:
                compiled.uninstall()
                source.release(block)
                release_freed_memory()  # hand the block's freed pages back before the next one is read
            spilled += sum(p.stat().st_size for p in out.files)
            if prev is not None:
                prev.close()
            prev = out
        _observe_outside(model, state, blocks_, prev, calls, device)
        prev.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for m, home in homes:
            m.to(home)
    return {"blocks": len(blocks_), "block_list": path, "batches": len(calls), "bytes_on_disk": spilled}


def _observe_outside(model: nn.Module, state: Fp8fxState, blocks: list[nn.Module], last: ActivationCache,
                     calls: list[tuple[tuple, dict]], device: torch.device) -> None:
    """The model's forward, instrumented, with every block replaying the last block's outputs.

    Its nodes that compute from the replayed values come after the blocks in the model's forward,
    the others before: the state's node order is made that of a whole-model graph (the order of
    the measurement files)."""
    block_names = list(state.decisions)  # graph order, block by block
    known = set(block_names)
    after: set[str] = set()

    def backend(cg: CapturedGraph) -> torch.fx.GraphModule:
        replayed: set[int] = set()
        _map(replays.value, lambda t: replayed.add(id(t)))
        placeholders = [n for n in cg.gm.graph.nodes if n.op == "placeholder"]
        frontier = [n for n, v in zip(placeholders, cg.example_inputs) if id(v) in replayed]
        reached: set[torch.fx.Node] = set()
        while frontier:
            n = frontier.pop()
            if n not in reached:
                reached.add(n)
                frontier.extend(n.users)
        gm = instrument(cg, state, model)
        after.update(n.meta["fp8fx"]["name"] for n in reached if "fp8fx" in n.meta)
        return gm

    compiled = CompiledForward(model, backend)
    compiled.install()
    try:
        with _Replays(blocks) as replays, torch.no_grad():
            for k, call in enumerate(calls):
                replays.value = _to(last.get(k), device)
                args, kwargs = _to(call, device)
                model(*args, **kwargs)
    finally:
        compiled.uninstall()
    outside = [n for n in state.decisions if n not in known]
    order = [n for n in outside if n not in after] + block_names + [n for n in outside if n in after]
    state.decisions = {n: state.decisions[n] for n in order}
    state.observers = {n: state.observers[n] for n in order if n in state.observers}

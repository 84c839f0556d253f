"""What a checkpoint on disk (or about to be written) holds, and the checks shared by the formats.

A checkpoint is described by a :class:`Manifest`: its ``config.json`` as a dict, and for every
tensor its name, shape, dtype and the file that holds it (read from the safetensors headers,
without reading the tensor data), plus a way to read one tensor when a check needs its values
(scales: a few numbers each). :func:`manifest_from_dir` reads one from disk;
:func:`manifest_from_tensors` describes tensors that are still in memory, so that
:func:`fp8fx.save_pretrained` runs exactly the checks ``fp8fx check`` runs, before anything is
written.

The model's structure (which names are Linear modules, which are attention modules and their
``layer_idx``) comes from the model itself: a module tree of the architecture that
``config.json`` names, built with every parameter on the meta device (:func:`skeleton`), so a
check never guesses a module's kind from its name.

Every check appends a :class:`Problem` (where: a tensor or config key; what is wrong; what the
consumer would do with it) instead of raising at the first one; :class:`CheckpointError` lists
them all.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, Fp8fxError

__all__ = ["CheckpointError", "Problem", "TensorInfo", "Manifest", "manifest_from_dir", "manifest_from_tensors",
           "skeleton", "params_on_meta", "CONFIG", "INDEX", "SINGLE", "DTYPE_NAMES", "FP8_NAMES",
           "structure", "Structure", "kv_heads", "check_kv_scale"]

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

#: safetensors' dtype names (its header format) <-> torch dtypes
DTYPE_NAMES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FP8_NAMES = {"F8_E4M3", "F8_E5M2"}
SCALE_DTYPES = {"F32", "BF16", "F16"}


@dataclass(frozen=True)
class Problem:
    where: str   # a tensor name, "config.json: <key>", or a file
    what: str    # what is wrong, what the consumer does with it, and what to do

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str   # safetensors' name, e.g. "F8_E4M3"
    file: str


@dataclass
class Manifest:
    """config.json plus the tensors of a checkpoint (see the module docstring)."""

    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    read: Callable[[str], Tensor]
    source: str
    problems: list[Problem] = field(default_factory=list)  # found while reading (index, shards)

    @property
    def quant(self) -> dict[str, Any] | None:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise Fp8fxError(f"tensor dtype {dtype} has no safetensors name")


def manifest_from_tensors(config: dict[str, Any], tensors: dict[str, Tensor], source: str) -> Manifest:
    infos = {k: TensorInfo(tuple(t.shape), _dtype_name(t.dtype), "(memory)") for k, t in tensors.items()}
    return Manifest(config, infos, lambda k: tensors[k], source)


def manifest_from_dir(path: str | Path) -> Manifest:
    """Read ``config.json`` and the safetensors headers of the checkpoint in ``path``."""
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise Fp8fxError(f"{root}: not a directory; give the folder of a saved checkpoint")
    problems: list[Problem] = []
    cfg_file = root / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(str(root), [Problem(CONFIG, "missing: every consumer reads the architecture and "
                                                  "quantization_config from it")])
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(str(root), [Problem(CONFIG, f"not valid JSON ({e})")]) from None
    if not isinstance(config, dict):
        raise CheckpointError(str(root), [Problem(CONFIG, "is not a JSON object")])
    index_file = root / INDEX
    files: list[str]
    weight_map: dict[str, str] | None = None
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            weight_map = index["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(str(root), [Problem(INDEX, f"unreadable or without a weight_map ({e})")]) from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(str(root), [Problem(INDEX, "unreadable or without a weight_map (weight_map is "
                                                             "not an object)")])
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise CheckpointError(str(root), [Problem(str(root), f"holds neither {SINGLE} nor {INDEX}")])
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        f = root / name
        if not f.is_file():
            problems.append(Problem(INDEX, f"names shard {name!r}, which does not exist: its tensors cannot load"))
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata() or {}
                if meta.get("format") != "pt":
                    problems.append(Problem(name, f"safetensors metadata format is {meta.get('format')!r}; "
                                            "transformers refuses a file whose format is not 'pt'"))
                for key in st.keys():
                    sl = st.get_slice(key)
                    if key in tensors:
                        problems.append(Problem(key, f"stored twice ({tensors[key].file} and {name})"))
                    tensors[key] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype(), name)
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            problems.append(Problem(name, f"not a readable safetensors file ({type(e).__name__}: {e})"))
    if weight_map is not None:
        for key, shard in weight_map.items():
            info = tensors.get(key)
            if info is None:
                if (root / shard).is_file():
                    problems.append(Problem(key, f"listed in {INDEX} under {shard!r}, which does not hold it"))
            elif info.file != shard:
                problems.append(Problem(key, f"listed in {INDEX} under {shard!r} but stored in {info.file!r}"))
        for key in tensors.keys() - weight_map.keys():
            problems.append(Problem(key, f"stored in {tensors[key].file!r} but missing from {INDEX}: transformers "
                                    "never loads it"))

    def read(key: str) -> Tensor:
        with safe_open(str(root / tensors[key].file), framework="pt") as st:
            return st.get_tensor(key)

    return Manifest(config, tensors, read, str(root), problems)


# ----------------------------------------------------------------------------- model structure
@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer real.

    Buffers stay real because modules compute some of them at construction (rotary ``inv_freq``)
    and checkpoints do not hold them; parameters are each moved to meta as they are registered,
    so at most one parameter is ever allocated at a time."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(self._parameters[name])
            kwargs = getattr(self._parameters[name], "__dict__", {})
            meta = cls(self._parameters[name].to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(kwargs)
            self._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def skeleton(config: dict[str, Any], source: str, attn_implementation: str | None = None) -> nn.Module:
    """The model class that ``config["architectures"][0]`` names, built from ``config`` with its
    parameters on the meta device (no quantization_config: fp8fx places the FP8 modules).
    ``attn_implementation`` is not part of a checkpoint; None means transformers' default."""
    import transformers

    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(source, [Problem(f"{CONFIG}: architectures", "missing: name the model class "
                                               "(e.g. [\"LlamaForCausalLM\"]) so the model can be built")])
    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(source, [Problem(f"{CONFIG}: architectures", f"{archs[0]!r} is not a model class of "
                                               f"transformers {transformers.__version__}")])
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    if attn_implementation is not None:
        plain["attn_implementation"] = attn_implementation
    cfg = transformers.AutoConfig.for_model(**plain)
    with params_on_meta():
        model = cls(cfg)
    return model.eval()


@dataclass
class Structure:
    """What the consumer's model looks like: Linear modules (name -> module), attention modules
    holding a KV cache (name -> layer index), and the tied-embedding pair.

    MoE experts modules (:mod:`.moe`) are seen as the checkpoint holds them: ``experts`` maps each
    one's checkpoint prefix to its :class:`~.moe.Experts`, every per-expert projection is in
    ``linears`` (and ``modules``) under its checkpoint name, as a meta-device ``nn.Linear`` of its
    shape, and ``renames`` maps module prefixes in memory to the checkpoint's (Mixtral's
    ``mlp`` -> ``block_sparse_moe``)."""

    linears: dict[str, nn.Module]
    attention: dict[str, int]
    modules: dict[str, nn.Module]
    tied: bool
    input_embedding: str | None
    output_embedding: str | None
    experts: dict[str, Any] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)

    def ckpt_key(self, key: str) -> str:
        """A state_dict key of the model in memory as the checkpoint names it."""
        from .moe import ckpt_key

        return ckpt_key(key, self.renames)

    def checkpoint_keys(self, keys: Any) -> set[str]:
        """The model's state_dict ``keys`` as the checkpoint holds them: renamed, and each fused
        experts stack replaced by its per-expert Linears' weights."""
        fused = {f"{info.path}.{p}": info for info in self.experts.values() for p in ("gate_up_proj", "down_proj")}
        out: set[str] = set()
        for key in keys:
            owner, _, leaf = key.rpartition(".")
            info = fused.get(key)
            if info is not None:
                continue
            if any(owner == i.path for i in self.experts.values()):
                continue  # an Fp8Experts' scale buffers: written per expert by the format
            out.add(self.ckpt_key(key))
        for info in self.experts.values():
            out.update(f"{n}.weight" for n in info.all_names())
        return out

    def kv_heads(self, path: str) -> int | None:
        """The number of KV heads of attention module ``path`` (the ``H`` of its ``[B, H, S, D]``
        cache): its ``k_proj`` output features over its ``head_dim``, else its config's
        ``num_key_value_heads``; None when the module says neither."""
        return kv_heads(self.modules[path])


def kv_heads(attention: nn.Module) -> int | None:
    """See :meth:`Structure.kv_heads`."""
    k_proj, head_dim = getattr(attention, "k_proj", None), getattr(attention, "head_dim", None)
    out_features = getattr(k_proj, "out_features", None)
    if isinstance(out_features, int) and isinstance(head_dim, int) and head_dim > 0 and out_features % head_dim == 0:
        return out_features // head_dim
    cfg = getattr(attention, "config", None)
    n = getattr(cfg, "num_key_value_heads", None) if cfg is not None else None
    return n if isinstance(n, int) and n > 0 else None


def structure(model: nn.Module) -> Structure:
    names = {id(m): n for n, m in model.named_modules()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    attention = {}
    for n, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and isinstance(getattr(m, "k_proj", None), nn.Module) and \
                isinstance(getattr(m, "v_proj", None), nn.Module):
            attention[n] = idx
    inp = out = None
    if hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings"):
        i, o = model.get_input_embeddings(), model.get_output_embeddings()
        inp, out = names.get(id(i)), names.get(id(o))
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    if cfg is not None and hasattr(cfg, "get_text_config"):
        tied = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", tied))
    from .moe import find

    experts, renames = find(model)
    modules = dict(model.named_modules())
    for info in experts.values():
        modules[info.ckpt] = modules[info.path]
        for name, (out_f, in_f) in info.shapes().items():
            linears[name] = modules[name] = nn.Linear(in_f, out_f, bias=False, device="meta")
    return Structure(linears, attention, modules, tied, inp, out, experts, renames)


# --------------------------------------------------------------------------- shared tensor checks
def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_weight_shape(m: Manifest, name: str, not_fp8: str, problems: list[Problem]) -> tuple[int, int] | None:
    """``[out, in]`` of the quantized Linear ``name``'s weight, or None (reported) when it is missing
    or not 2-D; a weight that is not F8_E4M3 is reported with ``not_fp8`` (what the consumer does)."""
    w = m.tensors.get(f"{name}.weight")
    if w is None:
        problems.append(Problem(f"{name}.weight", "missing"))
        return None
    if w.dtype != "F8_E4M3":
        problems.append(Problem(f"{name}.weight", f"dtype {w.dtype}{not_fp8}"))
    if len(w.shape) != 2:
        problems.append(Problem(f"{name}.weight", f"shape {list(w.shape)}; expected [out, in]"))
        return None
    return w.shape[0], w.shape[1]


def check_scale_values(m: Manifest, key: str, problems: list[Problem]) -> None:
    """A scale must be finite and positive: 0 gives inf/NaN on dequant, NaN spreads."""
    try:
        t = m.read(key).float()
    except Exception as e:  # noqa: BLE001 (any read failure is a problem to report)
        problems.append(Problem(key, f"cannot be read ({type(e).__name__}: {e})"))
        return
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        bad = int((~torch.isfinite(t) | (t <= 0)).sum())
        problems.append(Problem(key, f"{bad} of {t.numel()} value(s) are not finite and positive: the layer "
                                "dequantizes to inf/NaN"))


def check_scale(m: Manifest, key: str, shapes: list[tuple[int, ...]], what: str, problems: list[Problem]) -> bool:
    """``key`` exists, is a float scale of one of ``shapes``, with finite positive values."""
    info = m.tensors.get(key)
    if info is None:
        problems.append(Problem(key, f"missing ({what}); without it the consumer leaves the parameter "
                                "uninitialized and the layer gives NaN/garbage"))
        return False
    ok = True
    if info.dtype not in SCALE_DTYPES:
        problems.append(Problem(key, f"dtype {info.dtype}; a scale is F32, BF16 or F16"))
        ok = False
    if info.shape not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        problems.append(Problem(key, f"shape {list(info.shape)}, the consumer reads {want} ({what})"))
        ok = False
    if ok:
        check_scale_values(m, key, problems)
    return ok


def check_kv_scale(m: Manifest, key: str, shapes: list[tuple[int, ...]], scheme: str, problems: list[Problem],
                   heads: int | None = None) -> bool:
    """A KV-cache scale ``key`` of one of ``shapes``: read per tensor (``heads`` None) or with one
    value per KV head (``heads`` values); ``scheme`` names the config that says which. Values per
    head where the config says per tensor, or a head count other than the model's, are reported
    as such, naming the tensor; anything else as :func:`check_scale` reports it."""
    info = m.tensors.get(key)
    if info is not None and info.dtype in SCALE_DTYPES and info.shape not in shapes:
        n = math.prod(info.shape)
        want = " or ".join(str(list(s)) for s in shapes)
        if heads is None and n > 1:
            problems.append(Problem(key, f"shape {list(info.shape)}: {n} values (per-head scales?), but {scheme} is "
                                    f"one KV-cache scale per tensor ({want}): the consumer refuses to load it or "
                                    "uses one wrong scale"))
            return False
        if heads is not None and n != heads:
            problems.append(Problem(key, f"shape {list(info.shape)}: {n} value(s), but the model has {heads} KV heads "
                                    f"({scheme}: one scale per KV head, {want})"))
            return False
    return check_scale(m, key, shapes, scheme, problems)


def block_shape(out_f: int, in_f: int, block: tuple[int, int]) -> tuple[int, int]:
    return ceil_div(out_f, block[0]), ceil_div(in_f, block[1])


def finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

"""FP8 storage for transformers' KV caches (``DynamicCache`` and ``StaticCache``).

Why not a graph rewrite alone: dynamo traces the model's own Python, so the tensors a cache
hands back to that code must have the dtype the code expects; an FP8 tensor stored by a
rewritten graph breaks the trace of the next call. fp8fx therefore gives each cache layer FP8
storage at the Python level: :func:`fp8_cache` turns the layers of a cache object into
:class:`Fp8DynamicLayer` / :class:`Fp8StaticLayer`, whose ``update`` writes
``fp8fx.kv_append`` / ``fp8fx.kv_index_copy_`` (FP8 bytes, half the memory of bf16) and returns
``fp8fx.dequant`` of the whole cache: one scale per layer and tensor, shared by the write and
every read, from calibration (the ``{attention}.kv_cache_0`` / ``kv_cache_1`` nodes: keys and
values). Dynamo traces these methods like any others, so compiled models get the same ops.

Per-head scales (``observer_params.kv_cache_strategy = "attn_head"``): a :class:`KVQuant` whose
``scale_k``/``scale_v`` are tuples (one float per KV head, vLLM's ``[num_kv_heads]``
``k_scale``/``v_scale``) makes the layers call the ``.heads`` overloads of the same ops, which
scale head ``h`` of the ``[B, H_kv, S, D]`` cache by entry ``h``.

A converted model (``fp8fx.convert``) does this by itself for every cache passed to its
forward (``generate`` included). With ``torch.compile(model, backend="fp8fx")`` call
``fp8fx.fp8_kv_cache(cache, model, cfg)`` on the cache you pass to ``generate``. Layers of
other kinds (sliding-window, quantized, linear-attention) keep the model's dtype; their writes
still go through an FP8 round trip in the graph, so the numerics are those of an FP8 cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import attention_ops  # noqa: F401  (registers torch.ops.fp8fx.kv_append/...)
from .errors import QuantizationError

__all__ = ["KVQuant", "fp8_cache", "kv_layer_names", "is_cache"]


@dataclass(frozen=True)
class KVQuant:
    """Scales and format of one cache layer's keys and values: a float each (per tensor) or a
    tuple of floats (one per KV head)."""

    scale_k: float | tuple[float, ...]
    scale_v: float | tuple[float, ...]
    fp8_dtype: torch.dtype
    fp8_max: float

    def __post_init__(self) -> None:
        for key in ("scale_k", "scale_v"):
            v = getattr(self, key)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, key, tuple(float(x) for x in v))
                if not v:
                    raise QuantizationError(f"KVQuant.{key}: an empty per-head scale list")
            else:
                object.__setattr__(self, key, float(v))


def _op(packet: Any, scale: float | tuple[float, ...]) -> Any:
    """``packet.heads`` for per-head scales, else ``packet`` itself (its default overload)."""
    return packet.heads if isinstance(scale, tuple) else packet


def _arg(scale: float | tuple[float, ...]) -> float | list[float]:
    return list(scale) if isinstance(scale, tuple) else scale


def is_cache(obj: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # transformers is optional
        return False
    return isinstance(obj, Cache)


def kv_layer_names(model: nn.Module, kv_names: list[str]) -> dict[int, tuple[str, str]]:
    """Cache layer index -> (keys node name, values node name), from the attention modules that
    own the ``kv_cache_0``/``kv_cache_1`` nodes and their ``layer_idx`` (transformers' convention)."""
    out: dict[int, tuple[str, str]] = {}
    for name in kv_names:
        path, _, leaf = name.rpartition(".")
        if leaf != "kv_cache_0" or f"{path}.kv_cache_1" not in kv_names:
            continue
        try:
            idx = getattr(model.get_submodule(path), "layer_idx", None)
        except AttributeError:
            continue
        if isinstance(idx, int):
            out[idx] = (name, f"{path}.kv_cache_1")
    return out


def _read(layer: Any, key_dtype: torch.dtype, value_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A cache read: the whole FP8 cache of ``layer`` dequantized with its scales."""
    q = layer.fp8fx
    dq = torch.ops.fp8fx.dequant
    return (_op(dq, q.scale_k)(layer.keys, _arg(q.scale_k), key_dtype),
            _op(dq, q.scale_v)(layer.values, _arg(q.scale_v), value_dtype))


def _layer_classes():
    from transformers.cache_utils import DynamicLayer, StaticLayer

    class Fp8DynamicLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are stored in FP8."""

        fp8fx: KVQuant

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            q = self.fp8fx
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            append = torch.ops.fp8fx.kv_append
            self.keys = _op(append, q.scale_k)(self.keys, key_states, _arg(q.scale_k), q.fp8_max, q.fp8_dtype)
            self.values = _op(append, q.scale_v)(self.values, value_states, _arg(q.scale_v), q.fp8_max,
                                                 q.fp8_dtype)
            return _read(self, key_states.dtype, value_states.dtype)

    class Fp8StaticLayer(StaticLayer):
        """A StaticLayer whose preallocated key and value buffers are FP8."""

        fp8fx: KVQuant

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.keys = torch.zeros(self.keys.shape, dtype=self.fp8fx.fp8_dtype, device=self.device)
            self.values = torch.zeros(self.values.shape, dtype=self.fp8fx.fp8_dtype, device=self.device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            q = self.fp8fx
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            kv_length = key_states.shape[-2]
            cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
            self.cumulative_length.add_(kv_length)
            copy_ = torch.ops.fp8fx.kv_index_copy_
            _op(copy_, q.scale_k)(self.keys, 2, cache_position, key_states, _arg(q.scale_k), q.fp8_max, q.fp8_dtype)
            _op(copy_, q.scale_v)(self.values, 2, cache_position, value_states, _arg(q.scale_v), q.fp8_max,
                                  q.fp8_dtype)
            return _read(self, key_states.dtype, value_states.dtype)

    return {DynamicLayer: Fp8DynamicLayer, StaticLayer: Fp8StaticLayer}


_CLASSES: dict | None = None


def _fp8_class(cls: type):
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _layer_classes()
    return _CLASSES.get(cls)


class _Replicate:
    """Stands in for a cache's ``layer_class_to_replicate``: layers the cache creates lazily (one
    per layer index, in order) are created FP8 with that index's scales."""

    def __init__(self, cache: Any, base: type, scales: dict[int, KVQuant]) -> None:
        self.cache, self.base, self.scales = cache, base, scales

    def __call__(self) -> Any:
        layer = self.base()
        return _convert_layer(layer, self.scales.get(len(self.cache.layers)))


def _convert_layer(layer: Any, q: KVQuant | None) -> Any:
    cls = _fp8_class(type(layer))
    if q is None or cls is None:
        return layer
    if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel() and \
            layer.keys.dtype != q.fp8_dtype:
        raise QuantizationError(
            f"this {type(layer).__name__} already holds {layer.keys.dtype} keys (it was filled without "
            "fp8fx): an FP8 KV cache must start empty. Pass a fresh cache object.")
    layer.__class__ = cls
    layer.fp8fx = q
    return layer


def fp8_cache(cache: Any, scales: dict[int, KVQuant]) -> Any:
    """Give ``cache``'s DynamicLayer/StaticLayer layers FP8 storage with ``scales`` (by layer
    index); returns ``cache``. Calling it again on the same cache changes nothing."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        _convert_layer(layer, scales.get(i))
    base = getattr(cache, "layer_class_to_replicate", None)
    if isinstance(base, type) and _fp8_class(base) is not None:
        cache.layer_class_to_replicate = _Replicate(cache, base, scales)
    return cache

"""Accuracy and size measurements the ``fp8fx`` command reports.

Design
------
* :func:`perplexity` is the plain causal-LM perplexity: every window is scored on its own
  (no state carried between windows), token ``t+1`` is predicted from tokens ``<= t``, and the
  result is ``exp`` of the mean negative log-likelihood over every predicted token of every
  window. Logits are upcast to float32 before the log-softmax so bf16 and FP8 models are scored
  with the same arithmetic. It runs under :func:`torch.no_grad` rather than
  ``torch.inference_mode``: a quantized model may create or cache tensors during its first
  call, and inference tensors cannot be used later outside inference mode.
* :func:`linear_weight_bytes` sums the storage of Linear-like modules (``nn.Linear`` and its
  subclasses, which includes the FP8 Linear modules fp8fx swaps in): the ``weight`` plus any
  ``weight_scale`` / ``input_scale`` tensors (FP8 modules keep them as buffers). A Linear whose
  weight is the very tensor of an embedding (a tied ``lm_head``) is reported under ``"tied"``
  and left out of ``"total"``: its bytes belong to the embedding, and quantizing or skipping it
  does not change the model's size.
* :func:`resident_bytes` is the resident set size (RSS) of the whole process, read from
  ``/proc/self/statm`` (Linux), else from ``psutil`` when it happens to be installed (it is not
  a dependency), else unknown (``None``). RSS counts everything the process holds — Python,
  torch and its allocator caches, the tokenizer, captured graphs, the model — so it is an upper
  bound on what a model costs, not a weight count; the command reports it next to
  :func:`linear_weight_bytes`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fp8fx.errors import Fp8fxError

SCALE_NAMES: tuple[str, ...] = ("weight_scale", "weight_scale_inv", "input_scale")


def progress_enabled(progress: bool) -> bool:
    """Show a progress bar only when asked to and stderr is a terminal."""
    if not progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def iterate(items: Sequence[Any], *, progress: bool, desc: str) -> Iterable[Any]:
    """``items`` wrapped in a tqdm bar when :func:`progress_enabled`."""
    if not progress_enabled(progress):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="win", leave=False, dynamic_ncols=True)


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise Fp8fxError(
            f"the model returned {type(output).__name__} without logits; perplexity needs a "
            "causal LM whose forward returns .logits of shape [batch, seq, vocab]"
        )
    return logits


def window_nll(model: nn.Module, input_ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL in float64, number of predicted tokens) for one window."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise Fp8fxError(
            f"expected input_ids of shape [batch, seq>=2], got {tuple(input_ids.shape)}"
        )
    logits = _logits(model(input_ids))
    if logits.shape[:2] != input_ids.shape:
        raise Fp8fxError(
            f"logits of shape {tuple(logits.shape)} do not match input_ids "
            f"{tuple(input_ids.shape)}; perplexity needs one logit row per input token"
        )
    pred = logits[:, :-1, :].float()
    target = input_ids[:, 1:].to(pred.device)
    nll = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"
    )
    return float(nll.double()), int(target.numel())


def perplexity(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    progress: bool = True,
    desc: str = "ppl",
) -> float:
    """``exp(mean NLL)`` over every predicted token of every window."""
    if len(windows) == 0:
        raise Fp8fxError("perplexity needs at least one token window; the text is too short")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in iterate(windows, progress=progress, desc=desc):
            nll, n = window_nll(model, ids)
            total += nll
            count += n
    mean = total / count
    if not math.isfinite(mean):
        raise Fp8fxError(
            f"perplexity is not finite (mean NLL {mean}); the model produced inf/NaN logits"
        )
    return math.exp(mean)


# --------------------------------------------------------------------------- sizes

#: where :func:`resident_bytes` reads the process's pages first
STATM_PATH = "/proc/self/statm"


def resident_bytes() -> tuple[int | None, str]:
    """``(RSS of this process in bytes, where it came from)``; ``(None, "n/a")`` if unknown.

    The source is ``"/proc/self/statm"`` or ``"psutil"``.
    """
    try:
        with open(STATM_PATH, encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil  # optional: not a declared dependency
    except ImportError:
        return None, "n/a"
    try:
        return int(psutil.Process().memory_info().rss), "psutil"
    except Exception:  # noqa: BLE001 - psutil raises its own errors on odd platforms
        return None, "n/a"



def release_freed_memory() -> bool:
    """Collect garbage and hand the C allocator's free pages back to the OS (glibc's
    ``malloc_trim``), so that RSS shows what the process holds rather than what the allocator
    keeps for reuse (after convert it keeps the freed high-precision weights: about twice the
    saving, seen on SmolLM2). Returns whether the pages could be handed back."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc: RSS then includes the allocator's free pages
        return False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # meta or exotic tensor subclasses
        return None


def _embedding_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """(object ids, storage pointers) of every embedding weight."""
    ids: set[int] = set()
    storages: set[int] = set()
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.Embedding) and isinstance(weight, torch.Tensor):
            ids.add(id(weight))
            key = _storage_key(weight)
            if key is not None:
                storages.add(key)
    return ids, storages


def _is_tied(weight: torch.Tensor, embeddings: tuple[set[int], set[int]]) -> bool:
    ids, storages = embeddings
    return id(weight) in ids or _storage_key(weight) in storages


def linear_weight_bytes(model: nn.Module) -> dict[str, Any]:
    """Bytes held by Linear-like modules' weights and scales.

    Returns ``{"total": int, "tied": int, "per_module": {name: int}}``; ``total`` excludes
    Linears whose weight is shared with an embedding (counted in ``tied`` instead, and listed in
    ``per_module``), and ``"tied_modules"`` names them.
    """
    embeddings = _embedding_weights(model)
    total = tied = 0
    per_module: dict[str, int] = {}
    tied_modules: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        size = _nbytes(weight)
        for scale_name in SCALE_NAMES:
            scale = getattr(module, scale_name, None)
            if isinstance(scale, torch.Tensor):
                size += _nbytes(scale)
        per_module[name] = size
        if _is_tied(weight, embeddings):
            tied += size
            tied_modules.append(name)
        else:
            total += size
    return {"total": total, "tied": tied, "tied_modules": tied_modules, "per_module": per_module}


__all__ = [
    "linear_weight_bytes", "perplexity", "progress_enabled", "resident_bytes", "window_nll",
]

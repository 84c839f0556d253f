"""A generated Llama-shaped checkpoint on disk, written shard by shard (never whole in memory).

    python benchmarks/synthetic.py OUT_DIR --size-gb 4            # about 4 GB of bf16 weights
    python benchmarks/synthetic.py OUT_DIR --layers 2 --hidden 256  # a small one for a test

Used by the scale benchmarks (sequential calibration, streaming checkpoint quantization) and
their tests. The parameter names and shapes come from a ``LlamaForCausalLM`` built on the meta
device (so they are exactly the names transformers loads), the values are seeded normal noise
scaled like an initialized model, and the folder holds ``config.json``, sharded
``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``, and the tokenizer of
SmolLM2 when it is installed (so that real text can be fed to the model).

Prints one JSON line: the folder, parameter count, bytes and shard count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["llama_config", "make_llama_checkpoint"]


def llama_config(*, hidden: int = 2048, layers: int = 16, intermediate: int | None = None, heads: int = 16,
                 kv_heads: int = 4, vocab: int = 49152, size_gb: float | None = None) -> Any:
    """A LlamaConfig; with ``size_gb`` the layer count is chosen so the bf16 weights are about that."""
    from transformers import LlamaConfig

    intermediate = intermediate or 4 * hidden
    if size_gb is not None:
        head_dim = hidden // heads
        per_layer = (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
                     + 2 * hidden)
        outside = 2 * vocab * hidden + hidden
        layers = max(1, round((size_gb * 1e9 / 2 - outside) / per_layer))
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=1, eos_token_id=2)


def _tokenizer_dir() -> Path | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from fp8fx import data
        return data.default_model_dir()
    except Exception:  # noqa: BLE001 - the tokenizer is optional for a generated model
        return None


def make_llama_checkpoint(out_dir: str | os.PathLike[str], config: Any = None, *, shard_bytes: int = 1 << 30,
                          seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Write a random-weight checkpoint of ``config`` (default :func:`llama_config`) to ``out_dir``.

    Tensors are generated one at a time and each shard is written as soon as it is full, so the
    memory this takes is one shard. Returns ``{"dir", "params", "bytes", "shards"}``.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = config if config is not None else llama_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    names = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
    gen = torch.Generator().manual_seed(seed)

    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight") or len(shape) == 1:
            return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
        return (torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)).to(dtype)

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: value(name, shape) for name, shape in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = ["LlamaForCausalLM"]  # as the model's own save_pretrained writes it
    config.save_pretrained(out)
    tok = _tokenizer_dir()
    if tok is not None and config.vocab_size == 49152:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (tok / f).exists():
                shutil.copy(tok / f, out / f)
    return {"dir": str(out), "params": sum(torch.Size(s).numel() for _, s in names), "bytes": total,
            "shards": len(groups)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--size-gb", type=float, default=None, help="choose the layer count for this bf16 size")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--shard-mb", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = llama_config(hidden=a.hidden, layers=a.layers, intermediate=a.intermediate, heads=a.heads,
                       kv_heads=a.kv_heads, vocab=a.vocab, size_gb=a.size_gb)
    print(json.dumps(make_llama_checkpoint(a.out_dir, cfg, shard_bytes=a.shard_mb << 20, seed=a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

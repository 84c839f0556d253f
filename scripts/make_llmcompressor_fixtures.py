"""Write the llm-compressor fixture checkpoints of tests/fixtures/llmcompressor (run once, by hand).

llm-compressor is not installed beside fp8fx (it pins other transformers and compressed-tensors
releases), so the checkpoints it writes are made here, in an environment of its own, and
committed; tests/test_export_fixtures.py loads them with fp8fx and with transformers. To remake:

    python3 -m venv /tmp/lcvenv
    /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/lcvenv/bin/python scripts/make_llmcompressor_fixtures.py tests/fixtures/llmcompressor

Each fixture is a small random-weight Llama (seeded; 2 layers, hidden 128 and MLP width 256, so
that FP8_BLOCK's 128x128 blocks and 1x128 groups fit exactly) quantized by ``llmcompressor.oneshot`` with
``QuantizationModifier(targets="Linear", scheme=S, ignore=["lm_head"])`` and saved with
``save_pretrained(save_compressed=True)``, which is how llm-compressor's examples write them:

* ``fp8_dynamic``: ``FP8_DYNAMIC`` (per-channel weights, dynamic per-token activations);
* ``fp8_block``: ``FP8_BLOCK`` (128x128 weight blocks, dynamic 1x128 activation groups);
* ``fp8_static``: ``FP8`` (static per-tensor weights and activations), calibrated on 8 random
  token sequences of 32 tokens given as a DataLoader of ``input_ids`` (with a word-level tokenizer
  over the 512 ids as the processor, which oneshot requires whenever data is given);
* ``fp8_static_kv``: the same with an FP8 KV cache (``kv_cache_scheme``: static per-tensor
  ``k_scale`` / ``v_scale``);
* ``fp8_block_partial``: ``FP8_BLOCK`` with MLP width 320, which 128 does not divide:
  llm-compressor writes it (with a warning), and compressed-tensors' own forward then raises on
  ``down_proj``'s 320-wide input (its 1x128 activation groups must divide K). ``fp8fx check``
  must say so.

``versions.json`` records the versions that wrote them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

# folder -> (llm-compressor scheme, MLP width)
SCHEMES = {"fp8_dynamic": ("FP8_DYNAMIC", 256), "fp8_block": ("FP8_BLOCK", 256), "fp8_static": ("FP8", 256),
           "fp8_static_kv": ("FP8", 256), "fp8_block_partial": ("FP8_BLOCK", 320)}
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def tiny_llama(intermediate: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # spread the weights so that per-channel and per-block scales differ
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 0.5).to(p.dtype))
    return model


def tiny_tokenizer():
    """A word-level tokenizer over the 512 ids (oneshot wants a processor whenever data is given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def calibration_loader():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (8, 32), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]

    def collate(batch):
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    return torch.utils.data.DataLoader(rows, batch_size=1, collate_fn=collate)


def main(argv: list[str] | None = None) -> int:
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp())
    for folder, (scheme, intermediate) in SCHEMES.items():
        base = tmp / f"base{intermediate}"  # oneshot reads the model's config from its folder
        if not base.exists():
            tiny_llama(intermediate).save_pretrained(base)
            tiny_tokenizer().save_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
        kv = {"kv_cache_scheme": KV_CACHE_SCHEME} if folder.endswith("_kv") else {}
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], **kv)
        kwargs = {"dataset": calibration_loader()} if scheme == "FP8" else {}
        oneshot(model=model, recipe=recipe, **kwargs)
        dest = out / folder
        if dest.exists():
            shutil.rmtree(dest)
        model.save_pretrained(dest, save_compressed=True)
        (dest / "recipe.yaml").unlink(missing_ok=True)  # llm-compressor's record of the run; not part of the format
        print(f"wrote {dest} ({scheme})", file=sys.stderr)
    (out / "versions.json").write_text(json.dumps({
        "llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

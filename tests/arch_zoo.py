"""Tiny random-weight transformers models, one per architecture family (no network).

Every builder returns ``(model, kind)`` where ``kind`` is ``"causal_lm"`` (has ``generate``)
or ``"encoder"`` (a plain forward). Configs are as small as each family allows (hidden 32-64,
1-2 layers, vocab 128-256) so that the architecture matrix runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

VOCAB = 128

__all__ = ["VOCAB", "ARCHS", "build", "calibration_batches", "eval_ids", "prompt", "main_output"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            sliding_window=None))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0))


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM
    # eager attention (explicit Q·Kᵀ, softmax, P·V), GPT-J's only form up to transformers 5.23; 5.24
    # defaults to SDPA, which the other architectures of the matrix cover
    return GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64,
                                      attn_implementation="eager"))


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            num_local_experts=4, num_experts_per_tok=2, sliding_window=None))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    return GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))


def _starcoder2():
    from transformers import Starcoder2Config, Starcoder2ForCausalLM
    return Starcoder2ForCausalLM(Starcoder2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, sliding_window=None))


def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=64))


ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "llama": (_llama, "causal_lm"),
    "mistral": (_mistral, "causal_lm"),
    "qwen2": (_qwen2, "causal_lm"),
    "phi3": (_phi3, "causal_lm"),
    "gptj": (_gptj, "causal_lm"),
    "falcon": (_falcon, "causal_lm"),
    "bloom": (_bloom, "causal_lm"),
    "mixtral": (_mixtral, "causal_lm"),
    "gpt2": (_gpt2, "causal_lm"),
    "opt": (_opt, "causal_lm"),
    "gemma": (_gemma, "causal_lm"),
    "starcoder2": (_starcoder2, "causal_lm"),
    "bert": (_bert, "encoder"),
}


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh model of ``arch`` with weights drawn from ``seed`` (same seed, same weights)."""
    fn, _ = ARCHS[arch]
    torch.manual_seed(seed)
    return fn().to(dtype).eval()


def calibration_batches(seed: int = 0) -> list[torch.Tensor]:
    """A few random token batches of different shapes (one dynamic graph serves them all; a
    batch of one would make dynamo specialize on it and capture a second graph)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, shape, generator=g) for shape in ((2, 7), (2, 12), (3, 5))]


def eval_ids(seed: int = 1) -> torch.Tensor:
    """Held-out tokens for comparing outputs (not seen in calibration)."""
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def prompt(seed: int = 2) -> torch.Tensor:
    """A one-sequence prompt for generate."""
    return torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))


def main_output(out) -> torch.Tensor:  # noqa: ANN001 (a transformers ModelOutput)
    """The tensor to compare: a causal LM's logits, an encoder's last hidden state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state

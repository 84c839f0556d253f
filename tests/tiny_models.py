"""Small random-weight models shared by the tests (no network, seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(layers: int = 2, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(dtype).eval()


class TwoLinear(nn.Module):
    """Linear -> ReLU -> Linear, plus a functional softmax at the end."""

    def __init__(self, d: int = 32, h: int = 64, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.fc2 = nn.Linear(h, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), dim=-1)


class EagerAttention(nn.Module):
    """Projections plus functional Q·Kᵀ, softmax, P·V (what attn_implementation='eager' does)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = torch.matmul(q, k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        p = p.softmax(dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).reshape(b, s, d)
        return self.out(o)


class GraphBreak(nn.Module):
    """Data-dependent Python control flow: dynamo cannot keep this forward in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 2 if y.sum().item() > 0 else y

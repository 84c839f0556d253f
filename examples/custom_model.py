"""Quantize a custom nn.Module to FP8 on a CPU, end to end, in under a second of compute.

    python examples/custom_model.py

MEASURE (observers record activations) -> INC measurement files -> QUANTIZE in a fresh
model, as a second process would -> compare with the high-precision model.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

import fp8fx
from fp8fx.numerics import sqnr_db


class Block(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return torch.softmax(self.head(h), dim=-1)


def main() -> None:
    torch.manual_seed(0)
    stats = tempfile.mkdtemp() + "/measure"
    model = Block()
    reference = Block()
    reference.load_state_dict(model.state_dict())

    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=stats, blocklist={"names": ["head"]})
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for _ in range(8):                       # calibration
            model(torch.randn(16, 64))
    files = fp8fx.finalize_calibration(model)
    print("measurement files:", *[f.name for f in files])

    # a fresh model, converted from the files (what a second process does)
    fresh = Block()
    fresh.load_state_dict(reference.state_dict())
    x = torch.randn(4, 64)
    fp8fx.convert(fresh, cfg.replace(mode="QUANTIZE"), example_inputs=x)
    print(fp8fx.explain(fresh))
    with torch.no_grad():
        print(f"SQNR vs fp32: {sqnr_db(reference(x), fresh(x)):.1f} dB")
    print(fresh.up)


if __name__ == "__main__":
    main()

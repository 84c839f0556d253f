"""The CPU class a benchmark ran for, and ``--isa avx2`` (an AVX2-only CPU emulated on a newer
one), shared by ``linear.py`` and ``model.py``."""

from __future__ import annotations

import os
import sys

import torch

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def emulate_isa(isa: str) -> None:
    """``--isa avx2``: re-run this script with ATen and oneDNN capped at AVX2 (they read their
    variables when torch loads) and Inductor's vector width at 256 bits."""
    if isa != "avx2":
        return
    if any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = 256


def cpu_class() -> str:
    """ATen's CPU capability, bf16 GEMM instructions or not, emulation settings, GEMV path."""
    import torch._inductor.config as inductor_config
    from fp8fx.kernels.linear import cpu_has_bf16

    parts = [torch.backends.cpu.get_cpu_capability(),
             "bf16 GEMM instructions" if cpu_has_bf16() else "no bf16 GEMM instructions"]
    env = [f"{k}={os.environ[k]}" for k in AVX2_ENV if k in os.environ]
    if env or inductor_config.cpp.simdlen:
        parts.append("emulated: " + ", ".join(env + [f"cpp.simdlen={inductor_config.cpp.simdlen}"]))
    try:
        from fp8fx.kernels import gemv
    except ImportError:  # an fp8fx from before the GEMV kernel
        parts.append("fp8 GEMV: none")
    else:
        parts.append(f"fp8 GEMV: {gemv.status()}")
    return "; ".join(parts)

"""fp8fx.backends.inductor: ``fp8fx::linear`` compiles to real Inductor kernels.

The compiled model runs every variant side by side (E4M3/E5M2, per-tensor/per-channel weight
scales, with/without bias, float32 and bfloat16 activations, ``M == 1`` and ``M > 1``) so that
two compiles (static and dynamic shapes) cover all CPU paths. Each variant reads the same input,
so its output is compared with the eager reference op on its own, tightly; one chained MLP shows
the realistic case.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

from fp8fx import numerics
from fp8fx.backends import inductor
from fp8fx.errors import QuantizationError
from fp8fx.modules import Fp8Linear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
K, H, N = 32, 48, 16

# (format, per_channel, bias) per activation dtype: every (format, granularity) pair appears
# with and without bias across the two dtypes.
VARIANTS = {
    torch.float32: [(E4M3, False, True), (E4M3, True, False), (E5M2, False, False),
                    (E5M2, True, True)],
    torch.bfloat16: [(E4M3, False, False), (E4M3, True, True), (E5M2, False, True),
                     (E5M2, True, False)],
}

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def fp8_linear(in_f: int, out_f: int, fmt: torch.dtype, per_channel: bool, bias: bool,
               dtype: torch.dtype, seed: int) -> Fp8Linear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.1
    method = "act_maxabs_pow2_weights_pcs_maxabs_pow2" if per_channel else "maxabs_arbitrary"
    w_scale = numerics.weight_scale(weight, method, fp8_dtype=fmt, target="cpu")
    fp8_max = numerics.fp8_max(fmt)
    b = (torch.randn(out_f, generator=gen) * 0.1).to(dtype) if bias else None
    # |x| above 2 saturates: the clamp is exercised too
    x_scale = torch.tensor(2.0 / fp8_max)
    return Fp8Linear(numerics.quantize_weight(weight, w_scale, fmt), w_scale, x_scale, b, fp8_max)


class Variants(nn.Module):
    """Every variant on the same input, plus a Linear -> GELU -> Linear MLP.

    The bfloat16 inputs come in as graph inputs: a cast inside the graph would be fused and
    skipped by Inductor (``emulate_precision_casts`` is off by default), so the compiled layer
    would quantize a different activation than the eager one. The MLP is float32 for the same
    reason (GELU's output).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({
            _NAMES[dtype]: nn.ModuleList(
                fp8_linear(K, N, fmt, pc, bias, dtype, seed=i) for i, (fmt, pc, bias) in
                enumerate(variants))
            for dtype, variants in VARIANTS.items()})
        self.mlp = nn.Sequential(fp8_linear(K, H, E4M3, False, True, torch.float32, 10),
                                 nn.GELU(),
                                 fp8_linear(H, N, E5M2, True, False, torch.float32, 11))

    def forward(self, x: Tensor, xb: Tensor, x1: Tensor, x1b: Tensor) -> list[Tensor]:
        out = []
        for inp, inp_bf16 in ((x, xb), (x1, x1b)):
            out += [layer(inp) for layer in self.layers["fp32"]]
            out += [layer(inp_bf16) for layer in self.layers["bf16"]]
            out.append(self.mlp(inp))
        return out


@pytest.fixture(scope="module")
def model() -> Variants:
    return Variants().eval()


def _inputs(*lead: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(sum(lead))
    x, x1 = torch.randn(*lead, K, generator=gen), torch.randn(1, K, generator=gen)
    return x, x.to(torch.bfloat16), x1, x1.to(torch.bfloat16)


def _check_outputs(got: list[Tensor], want: list[Tensor]) -> None:
    per_input = sum(len(variants) for variants in VARIANTS.values()) + 1  # + the MLP
    assert len(got) == len(want) == 2 * per_input
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        if w.dtype == torch.float32:  # float32 accumulation, only the summation order differs
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
        else:  # bfloat16 output; the bfloat16 GEMM rounds once more than the reference
            scale = float(w.float().abs().max())
            torch.testing.assert_close(g.float(), w.float(), rtol=2**-7, atol=2**-7 * scale)
            assert numerics.sqnr_db(w.float(), g.float()) > 40.0, i


def _code_lines(codes: list[str]) -> list[str]:
    assert codes, "Inductor generated no code: the compile did not go through Inductor"
    return [line for code in codes for line in code.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _assert_lowered(codes: list[str]) -> None:
    lines = _code_lines(codes)
    assert not [line for line in lines if "fp8fx.linear" in line]  # no call of the eager op
    assert any("cpp_fused" in line for line in lines)  # real Inductor kernels
    # the M > 1 products: GEMMs, or the C++ GEMV on the FP8 bytes for a few static rows
    assert any("extern_kernels.mm(" in line or "fp8fx_cpp.qgemv" in line for line in lines)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_model_matches_reference(model: Variants, dynamic: bool) -> None:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    inductor.register_lowering()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)  # fullgraph: no breaks
    inputs = _inputs(2, 3)
    with torch.no_grad():
        got, codes = run_and_get_code(compiled, *inputs)
        _check_outputs(got, model(*inputs))
    _assert_lowered(codes)
    if dynamic:  # a new batch shape reuses the graph
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        inputs = _inputs(4, 5)
        with torch.no_grad():
            _check_outputs(compiled(*inputs), model(*inputs))
        assert counters["stats"]["unique_graphs"] == graphs


def _same_bits(got: Tensor, want: Tensor) -> bool:
    eq = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    return bool(eq.all())


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_bit_conversion_is_exact_for_all_256_codes(fmt: torch.dtype) -> None:
    """The weight conversion the CPU lowering uses, eager and compiled, flushed denormals too:
    subnormal codes never pass through a float32 denormal."""
    codes = torch.arange(256, dtype=torch.uint8).view(fmt).reshape(16, 16)
    want = codes.to(torch.float32)
    compiled = torch.compile(inductor._fp8_to_float32, dynamic=False, fullgraph=True)
    assert _same_bits(inductor._fp8_to_float32(codes), want)
    assert _same_bits(compiled(codes), want)
    if torch.set_flush_denormal(True):
        try:
            assert _same_bits(compiled(codes), want)
        finally:
            torch.set_flush_denormal(False)


def _reduction_bodies(code: str) -> list[str]:
    """The inner loops of Inductor's CPU reductions (accumulator init to final reduce)."""
    return re.findall(r"tmp_acc0 = 0;(.*?)out_ptr\d+\[", code, re.S)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_decode_reduction_reads_fp8_bytes_without_casts(fmt: torch.dtype) -> None:
    """``M == 1`` without the C++ GEMV: one reduction over the FP8 bytes; the activation is
    quantized once, outside it (no FP8 cast in the loop: neither the activation's nor the
    weight's)."""
    inductor.register_lowering()
    layer = fp8_linear(64, 40, fmt, True, True, torch.bfloat16, seed=7).eval()
    x = torch.randn(1, 64).to(torch.bfloat16)
    got, codes, want = _compile_afresh(layer, x, _cpu_gemv=_NO_GEMV, _cpu_qgemv=_NO_GEMV)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0.0)
    bodies = [b for code in codes for b in _reduction_bodies(code)]
    assert len(bodies) == 1, "expected exactly one reduction (the GEMV)"
    loads = re.findall(r"auto (tmp\d+) = [^;]*Float8[^;]*loadu", bodies[0])
    assert loads  # it reads the FP8 weight bytes themselves ...
    for var in loads:  # ... and reinterprets them as integers: no FP8 -> float cast
        assert not re.search(rf"convert<[^>]*>\({var}\)", bodies[0]), var
    assert not re.search(r"convert<[^>]*Float8", bodies[0])  # no cast to FP8 either ...
    assert " / " not in bodies[0]  # ... nor x / s_x: the activation is quantized once
    assert not [line for line in _code_lines(codes) if "extern_kernels.mm(" in line]


def _NO_GEMV(*args):  # noqa: N802  (``inductor._cpu_gemv``/``_cpu_qgemv`` as where the C++ kernel is not built)
    return None


def _compile_afresh(layer, x, **patches):
    """(compiled output, generated code, eager output) with ``inductor.<name>`` patched for
    each ``name=value``: values that are not part of the compile cache key, so the graph is
    compiled afresh, caches off."""
    from torch._inductor.utils import run_and_get_code

    with contextlib.ExitStack() as stack:
        for attr, value in patches.items():
            stack.enter_context(mock.patch.object(inductor, attr, value))
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        torch._dynamo.reset()
        compiled = torch.compile(layer, dynamic=False, fullgraph=True)
        with torch.no_grad():
            got, codes = run_and_get_code(compiled, x)
            want = layer(x)
    torch._dynamo.reset()
    return got, codes, want


def test_decode_reduction_is_split_below_the_cascade_threshold() -> None:
    """A long ``K`` is summed in equal parts (Inductor's cascade helper is slow); numerics stay
    the reference's up to summation order."""
    inductor.register_lowering()
    layer = fp8_linear(768, 8, E5M2, False, True, torch.float32, seed=9).eval()
    x = torch.randn(1, 768)
    assert inductor._reduction_parts(768) == 1 and inductor._reduction_parts(14336) == 4
    got, codes, want = _compile_afresh(layer, x, _MAX_REDUCTION=256, _cpu_gemv=_NO_GEMV, _cpu_qgemv=_NO_GEMV)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert not [line for line in _code_lines(codes) if "CascadeSumHelper" in line]
    assert any(re.search(r"x\d+<static_cast<int64_t>\(256L\)", code) for code in codes)


def test_gemm_path_converts_the_weight_in_groups() -> None:
    """``M > 1``: the weight is converted and multiplied in row groups (an uneven last one),
    never as one weight-sized temporary; the groups' outputs are the reference's columns."""
    inductor.register_lowering()
    layer = fp8_linear(24, 40, E4M3, True, True, torch.bfloat16, seed=8).eval()
    x = torch.randn(5, 24).to(torch.bfloat16)
    # the group size is not part of the compile cache key: compile this graph afresh
    got, codes, want = _compile_afresh(layer, x, _GROUP_ELEMS=24 * 16, _cpu_gemv=_NO_GEMV, _cpu_qgemv=_NO_GEMV)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7,
                               atol=2**-7 * float(want.float().abs().max()))
    mms = [line for line in _code_lines(codes) if "extern_kernels.mm(" in line]
    assert len(mms) == 3  # 40 rows in groups of 14, 14, 12


@pytest.mark.parametrize("rows, dtype", [(1, torch.bfloat16), (3, torch.float32),
                                         (16, torch.bfloat16)])
def test_few_rows_call_the_cpp_gemv_on_the_fp8_bytes(rows: int, dtype: torch.dtype) -> None:
    """Static ``M`` up to ``_GEMV_MAX_M``: one extern call of the C++ kernel per Linear
    (quantization, GEMV on the FP8 weight itself, epilogue; no conversion kernel, no GEMM, no
    reduction); float32 accumulation, the reference's numerics up to summation
    order."""
    from fp8fx.kernels import gemv
    from fp8fx.kernels import linear as kl

    if not gemv.available():
        pytest.skip(f"C++ GEMV not in use: {gemv.status()}")
    inductor.register_lowering()
    layer = fp8_linear(40, 24, E4M3, True, True, dtype, seed=12).eval()
    x = torch.randn(rows, 40).to(dtype)
    uses_gemv = rows <= kl._GEMV_MAX_M
    got, codes, want = _compile_afresh(layer, x)
    lines = _code_lines(codes)
    calls = [line for line in lines if "= torch.ops.fp8fx_cpp.qgemv.default(" in line]
    assert len(calls) == int(uses_gemv)
    if uses_gemv:  # quantization, GEMV and epilogue in that one call: no generated kernel
        assert not [line for line in lines if "extern_kernels.mm(" in line]
        assert not [line for line in lines if "cpp_fused" in line]
        assert not [b for code in codes for b in _reduction_bodies(code)]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=0.0)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_many_rows_convert_groups_by_the_cpp_op() -> None:
    """More rows than the GEMV takes: each weight group is converted by the C++ op into float32
    (exact), then multiplied; the reference's numerics up to summation order (float32 x)."""
    from fp8fx.kernels import gemv

    if not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    inductor.register_lowering()
    layer = fp8_linear(24, 40, E4M3, True, True, torch.float32, seed=14).eval()
    x = torch.randn(20, 24)
    got, codes, want = _compile_afresh(layer, x, _GROUP_ELEMS=24 * 16)
    lines = _code_lines(codes)
    assert len([line for line in lines if "= torch.ops.fp8fx_cpp.fp8_to_float32" in line]) == 3
    assert len([line for line in lines if "extern_kernels.mm(" in line]) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_many_bf16_rows_convert_groups_straight_to_bfloat16() -> None:
    """bfloat16 x on a CPU with bfloat16 GEMMs: each group is written by the C++ op in bfloat16
    (the GEMM's operand, exact), with no float32 group and no cast kernel; the eager kernel's
    result (the same bfloat16 GEMM numerics) up to summation order."""
    from fp8fx.kernels import gemv
    from fp8fx.kernels.linear import cpu_has_bf16

    if not gemv.available() or not cpu_has_bf16():
        pytest.skip(f"needs the C++ kernels and bfloat16 GEMM instructions ({gemv.status()})")
    inductor.register_lowering()
    layer = fp8_linear(24, 40, E4M3, True, True, torch.bfloat16, seed=15).eval()
    x = torch.randn(20, 24).bfloat16()
    got, codes, want = _compile_afresh(layer, x, _GROUP_ELEMS=24 * 16)
    lines = _code_lines(codes)
    assert len([line for line in lines if "= torch.ops.fp8fx_cpp.fp8_to_bfloat16" in line]) == 3
    assert not [line for line in lines if "fp8fx_cpp.fp8_to_float32" in line]
    assert len([line for line in lines if "extern_kernels.mm(" in line]) == 3
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * float(want.abs().max()))


def test_symbolic_rows_keep_the_generated_kernels() -> None:
    """A dynamic ``M`` (prefill) never takes the GEMV: it is chosen by a static size only, so
    no guard is added on the symbolic one."""
    from torch._inductor.utils import run_and_get_code

    inductor.register_lowering()
    layer = fp8_linear(32, 16, E4M3, False, True, torch.float32, seed=13).eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    with torch.no_grad():
        got, codes = run_and_get_code(compiled, torch.randn(7, 32))
    lines = _code_lines(codes)
    assert not [line for line in lines if "fp8fx_cpp.gemv_fp8" in line or "fp8fx_cpp.qgemv" in line]
    assert [line for line in lines if "extern_kernels.mm(" in line]
    torch._dynamo.reset()


def test_register_is_idempotent_and_tags_the_cache() -> None:
    from torch._inductor.decomposition import decompositions, select_decomp_table
    from torch.compiler import config

    inductor.register_lowering()
    tag = config.cache_key_tag
    inductor.register_lowering()
    assert config.cache_key_tag == tag and tag.count("fp8fx-inductor-") == 1
    op = torch.ops.fp8fx.linear.default
    assert decompositions[op] is select_decomp_table()[op] is inductor._decompose_linear


def test_importing_fp8fx_registers_nothing() -> None:
    script = textwrap.dedent("""
        import torch, fp8fx, fp8fx.backends.inductor
        from torch._inductor.decomposition import decompositions, select_decomp_table
        from torch.compiler import config
        op = torch.ops.fp8fx.linear.default
        assert op not in decompositions and op not in select_decomp_table()
        assert "fp8fx" not in config.cache_key_tag
        fp8fx.backends.inductor.register_lowering()
        assert op in decompositions and op in select_decomp_table()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# ---- the CUDA decomposition, traced with fake CUDA tensors (no GPU needed) ----------------


def _fake_cuda_args(fmt: torch.dtype, n: int, k: int, per_channel: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = torch.device("cuda")
        return (torch.empty(2, 3, k, dtype=torch.bfloat16, device=dev),
                torch.empty(n, k, dtype=fmt, device=dev),
                torch.empty(n if per_channel else (), device=dev),
                torch.empty((), device=dev),
                torch.empty(n, dtype=torch.bfloat16, device=dev), 448.0)


def _trace_cuda(args: tuple, capability: tuple[int, int]) -> str:
    from torch.fx.experimental.proxy_tensor import make_fx

    with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        graph = make_fx(inductor._decompose_linear, tracing_mode="fake")(*args)
    return graph.code


@pytest.mark.parametrize("fmt, n, k, per_channel, scaled_mm", [
    (E4M3, 64, 32, False, True),
    (E4M3, 64, 32, True, True),
    (E5M2, 64, 32, False, False),  # E5M2 x E5M2 is not supported by _scaled_mm
    (E4M3, 24, 32, False, False),  # N not a multiple of 16
])
def test_cuda_decomposition_picks_scaled_mm(fmt, n, k, per_channel, scaled_mm) -> None:
    code = _trace_cuda(_fake_cuda_args(fmt, n, k, per_channel), (9, 0))
    assert ("aten._scaled_mm" in code) is scaled_mm
    assert ("aten.mm" in code) is not scaled_mm


def test_cuda_without_fp8_raises_at_trace_time() -> None:
    with pytest.raises(QuantizationError, match="compute capability 8.0"):
        _trace_cuda(_fake_cuda_args(E4M3, 64, 32, False), (8, 0))


@pytest.mark.parametrize("per_channel", [False, True])
def test_cuda_formula_numerics_on_cpu(per_channel: bool) -> None:
    """The _scaled_mm formula (scales, transposes, per-channel epilogue) run with CPU tensors:
    CPU _scaled_mm is not exact, so this compares by SQNR."""
    layer = fp8_linear(K, N, E4M3, per_channel, True, torch.bfloat16, seed=3)
    x = torch.randn(5, K).to(torch.bfloat16)
    args = (layer.weight, layer.weight_scale, layer.input_scale, layer.bias, layer.fp8_max)
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        got = inductor._cuda_linear(x, *args)
    want = torch.ops.fp8fx.linear(x, *args)
    assert got.dtype == want.dtype and numerics.sqnr_db(want.float(), got.float()) > 40.0


def test_converted_model_compiles_with_default_inductor(tmp_path):
    """fp8fx.convert registers the lowering: plain torch.compile needs nothing else."""
    import fp8fx
    from tiny_models import TwoLinear

    model = TwoLinear()
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    with torch.no_grad():
        model(torch.randn(8, 32))
    fp8fx.convert(model)
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(5, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _assert_lowered(codes)

"""The CUDA paths of fp8fx, with and without a GPU.

Every CUDA branch in ``fp8fx/`` lives in ``fp8fx.backends.inductor`` (``_decompose_linear``'s
device dispatch and ``_cuda_linear``) plus the eager kernel's fallback for non-CPU tensors
(``fp8fx.kernels.linear.linear_fast`` -> ``linear_reference``). The tests without a GPU trace
those branches with fake CUDA tensors (``FakeTensorMode``: shapes, dtypes, strides and the
meta checks of ``aten._scaled_mm``, no kernels) and run the CUDA formulas with CPU tensors;
``tests/test_backend_inductor.py`` has the first of them (``_scaled_mm`` or not by format and
``N``, the capability error). The ``gpu`` tests run on a real device and skip without one.

All tests here carry the ``cuda`` marker: ``pytest -m cuda`` selects them (on a GPU machine
``benchmarks/gpu.sh`` runs them first).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import Tensor

from fp8fx import numerics
from fp8fx.backends import inductor
from fp8fx.errors import QuantizationError
from fp8fx.kernels import linear as kernels
from fp8fx.modules import Fp8Linear

pytestmark = pytest.mark.cuda

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() "
                                                "is False)")


def _fp8_capable() -> bool:
    return _HAS_CUDA and torch.cuda.get_device_capability(0) >= inductor._MIN_CUDA_CAPABILITY


fp8_gpu = pytest.mark.skipif(not _fp8_capable(),
                             reason="needs a CUDA device with compute capability >= 8.9")


# ---- fake CUDA tensors ----------------------------------------------------------------------


def _fake_args(fmt: torch.dtype = E4M3, n: int = 64, k: int = 32, per_channel: bool = False,
               bias: bool = True, lead: tuple[int, ...] = (2, 3),
               dtype: torch.dtype = torch.bfloat16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = torch.device("cuda")
        return (torch.empty(*lead, k, dtype=dtype, device=dev),
                torch.empty(n, k, dtype=fmt, device=dev),
                torch.empty(n if per_channel else (), device=dev),
                torch.empty((), device=dev),
                torch.empty(n, dtype=dtype, device=dev) if bias else None, 448.0)


def _trace(fn, args: tuple, capability: tuple[int, int] = (9, 0), mode: str = "fake"):
    from torch.fx.experimental.proxy_tensor import make_fx

    with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        return make_fx(fn, tracing_mode=mode)(*args)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _only(gm, target):
    nodes = [n for n in gm.graph.nodes if n.target is target]
    assert len(nodes) == 1, gm.code
    return nodes[0]


def _out_val(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0].meta["val"]


aten = torch.ops.aten


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_operands_layouts_and_epilogue(per_channel: bool, bias: bool) -> None:
    """``_scaled_mm`` gets q_x row-major [M, K] in E4M3, the weight as a column-major [K, N]
    view, 0-d float32 scales (``scale_b`` = 1 for a per-channel weight, whose scale goes in the
    epilogue) and a float32 output; the bias is added in float32, then cast to x's dtype."""
    n, k = 64, 32
    gm = _trace(inductor._decompose_linear, _fake_args(E4M3, n, k, per_channel, bias))
    node = _only(gm, aten._scaled_mm.default)
    qx, w_t, s_a, s_b = (a.meta["val"] for a in node.args[:4])
    assert qx.dtype == w_t.dtype == E4M3
    assert tuple(qx.shape) == (6, k) and qx.stride() == (k, 1)
    assert tuple(w_t.shape) == (k, n) and w_t.stride() == (1, k)  # column-major
    assert s_a.shape == s_b.shape == () and s_a.dtype == s_b.dtype == torch.float32
    kw = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    assert kw["out_dtype"] == torch.float32 and kw.get("bias") is None  # bias: the epilogue
    assert node.meta["val"].dtype == torch.float32 and node.meta["val"].device.type == "cuda"
    if per_channel:  # scale_b is a constant 1: the weight scale is a [N] multiply after the GEMM
        assert s_b.device.type == "cuda"
        muls = [m for m in gm.graph.nodes if m.target is aten.mul.Tensor]
        assert any(tuple(a.meta["val"].shape) == (n,) for m in muls for a in m.args
                   if hasattr(a, "meta") and "val" in a.meta)
    assert (aten.add.Tensor in _targets(gm)) is bias
    y = _out_val(gm)
    assert tuple(y.shape) == (2, 3, n) and y.dtype == torch.bfloat16 and y.device.type == "cuda"


def test_scaled_mm_activation_quantized_to_weight_format_with_saturation() -> None:
    gm = _trace(inductor._decompose_linear, _fake_args())
    code = gm.code
    assert "aten.clamp" in code and "448.0" in code
    casts = [n for n in gm.graph.nodes if n.target is aten._to_copy.default
             and n.kwargs.get("dtype") == E4M3]
    assert len(casts) == 1  # only q_x: the FP8 weight goes to _scaled_mm uncast


@pytest.mark.parametrize("fmt, n, k, why", [
    (E4M3, 64, 24, "K not a multiple of 16"),
    (E4M3, 24, 32, "N not a multiple of 16"),
    (E4M3, 8, 8, "both"),
    (E5M2, 64, 32, "E5M2 x E5M2"),
])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fallback_dequant_mm(fmt, n, k, why, per_channel: bool) -> None:
    """Shapes/formats that ``_scaled_mm`` refuses take a float32 ``mm`` of the dequantized
    operands, with the scales (per-channel too) in the float32 epilogue."""
    gm = _trace(inductor._decompose_linear, _fake_args(fmt, n, k, per_channel))
    targets = _targets(gm)
    assert aten._scaled_mm.default not in targets, why
    mm = _only(gm, aten.mm.default)
    a, b = (x.meta["val"] for x in mm.args)
    assert a.dtype == b.dtype == torch.float32 and tuple(a.shape) == (6, k)
    assert tuple(b.shape) == (k, n)
    assert any(c.kwargs.get("dtype") == fmt for c in gm.graph.nodes
               if c.target is aten._to_copy.default)  # q_x in the weight's format
    y = _out_val(gm)
    assert tuple(y.shape) == (2, 3, n) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("capability, ok", [
    ((7, 5), False), ((8, 0), False), ((8, 6), False), ((8, 7), False),
    ((8, 9), True), ((9, 0), True), ((10, 0), True), ((12, 0), True),
])
def test_capability_threshold(capability, ok: bool) -> None:
    args = _fake_args()
    if ok:
        gm = _trace(inductor._decompose_linear, args, capability)
        assert aten._scaled_mm.default in _targets(gm)
    else:
        with pytest.raises(QuantizationError, match=rf"compute capability {capability[0]}\."
                                                    rf"{capability[1]}.*8\.9"):
            _trace(inductor._decompose_linear, args, capability)


def test_capability_is_asked_for_the_input_device() -> None:
    args = _fake_args()
    with mock.patch.object(torch.cuda, "get_device_capability",
                           return_value=(9, 0)) as cap:
        from torch.fx.experimental.proxy_tensor import make_fx

        make_fx(inductor._decompose_linear, tracing_mode="fake")(*args)
    assert cap.call_args.args[0].type == "cuda"


@pytest.mark.parametrize("lead", [(1,), (5,), (1, 1), (2, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_output_shapes_and_dtypes(lead, dtype) -> None:
    """2-D and 3-D inputs, ``M == 1`` included (the CPU path's reduction is CPU-only), in the
    three activation dtypes: the output is ``[*lead, N]`` in x's dtype on the CUDA device."""
    gm = _trace(inductor._decompose_linear, _fake_args(lead=lead, dtype=dtype))
    assert aten._scaled_mm.default in _targets(gm)
    assert aten.sum.dim_IntList not in _targets(gm)  # not the CPU M == 1 reduction
    y = _out_val(gm)
    assert tuple(y.shape) == (*lead, 64) and y.dtype == dtype and y.device.type == "cuda"


def test_cuda_path_has_no_cpu_integer_conversion() -> None:
    """The device dispatch: CUDA tensors never reach ``_cpu_linear`` (its integer-op FP8
    conversion, ``bitwise_*`` ops and ``as_strided`` buffers)."""
    for fmt, n in ((E4M3, 64), (E5M2, 64), (E4M3, 24)):
        for lead in ((1,), (4,)):
            code = _trace(inductor._decompose_linear, _fake_args(fmt, n, lead=lead)).code
            assert "bitwise" not in code and "as_strided" not in code, (fmt, n, lead)


def test_cuda_dynamic_m_traces_without_guards_on_m() -> None:
    """Symbolic shapes (``torch.compile(dynamic=True)``): the CUDA path keeps the leading
    size symbolic and adds no guard on it (``_scaled_mm`` only constrains K and N)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    sym = env.create_symbol(4, ConstantSource("m"), dynamic_dim=DimDynamic.DYNAMIC)
    m = env.create_symintnode(sym, hint=4)
    with FakeTensorMode(shape_env=env):
        dev = torch.device("cuda")
        args = (torch.empty(m, 8, 32, dtype=torch.bfloat16, device=dev),
                torch.empty(64, 32, dtype=E4M3, device=dev), torch.empty((), device=dev),
                torch.empty((), device=dev), None, 448.0)
    gm = _trace(inductor._decompose_linear, args, mode="symbolic")
    node = _only(gm, aten._scaled_mm.default)
    assert not isinstance(node.args[0].meta["val"].shape[0], int)  # M = 8 * m, symbolic
    y = _out_val(gm)
    assert not isinstance(y.shape[0], int) and tuple(y.shape[1:]) == (8, 64)
    assert not env.guards


def test_eager_kernel_on_cuda_falls_back_to_reference() -> None:
    """``linear_fast`` (the op's eager kernel) is CPU-only: CUDA tensors go to
    ``linear_reference`` (FP8 casts, float32 mm); no int16 block conversion."""
    args = _fake_args(per_channel=True)
    with mock.patch.object(kernels, "linear_reference",
                           wraps=kernels.linear_reference) as ref:
        gm = _trace(kernels.linear_fast, args)
    assert ref.call_count == 1
    targets = _targets(gm)
    assert aten.mm.default in targets and aten._scaled_mm.default not in targets
    assert "int16" not in gm.code
    y = _out_val(gm)
    assert tuple(y.shape) == (2, 3, 64) and y.dtype == torch.bfloat16


def test_op_fake_kernel_on_cuda() -> None:
    """``torch.ops.fp8fx.linear`` under fake CUDA tensors: its fake kernel, output on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = torch.device("cuda")
        x = torch.empty(3, 5, 32, dtype=torch.bfloat16, device=dev)
        w = torch.empty(48, 32, dtype=E4M3, device=dev)
        y = torch.ops.fp8fx.linear(x, w, torch.empty((), device=dev), torch.empty((), device=dev),
                                   None, 448.0)
    assert tuple(y.shape) == (3, 5, 48) and y.dtype == torch.bfloat16 and y.device.type == "cuda"


def test_registered_lowering_is_the_cuda_dispatcher() -> None:
    """What Inductor decomposes ``fp8fx::linear`` with is ``_decompose_linear``, which sends
    CUDA inputs to ``_cuda_linear``."""
    from torch._inductor.decomposition import select_decomp_table

    inductor.register_lowering()
    assert select_decomp_table()[torch.ops.fp8fx.linear.default] is inductor._decompose_linear
    with mock.patch.object(inductor, "_cuda_linear", wraps=inductor._cuda_linear) as cuda, \
            mock.patch.object(inductor, "_cpu_linear", wraps=inductor._cpu_linear) as cpu:
        _trace(inductor._decompose_linear, _fake_args())
    assert cuda.call_count == 1 and cpu.call_count == 0


# ---- the CUDA formulas with CPU tensors (numerics, no GPU) ---------------------------------


def _layer(k: int, n: int, fmt: torch.dtype, per_channel: bool, bias: bool, seed: int,
           dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.1
    method = "act_maxabs_pow2_weights_pcs_maxabs_pow2" if per_channel else "maxabs_arbitrary"
    w_scale = numerics.weight_scale(weight, method, fp8_dtype=fmt, target="cpu")
    fp8_max = numerics.fp8_max(fmt)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    return Fp8Linear(numerics.quantize_weight(weight, w_scale, fmt), w_scale,
                     torch.tensor(2.0 / fp8_max), b, fp8_max)


def _layer_args(layer: Fp8Linear) -> tuple:
    return (layer.weight, layer.weight_scale, layer.input_scale, layer.bias, layer.fp8_max)


@pytest.mark.parametrize("fmt, n, k", [(E5M2, 64, 32), (E4M3, 64, 24), (E4M3, 24, 32)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fallback_formula_numerics_on_cpu(fmt, n, k, per_channel: bool) -> None:
    """The dequantize-and-``mm`` CUDA fallback equals the reference (float32 accumulation)."""
    layer = _layer(k, n, fmt, per_channel, True, seed=5, dtype=torch.float32)
    x = torch.randn(7, k) * 1.5
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        got = inductor._cuda_linear(x, *_layer_args(layer))
    want = kernels.linear_reference(x, *_layer_args(layer))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


# ---- on a real GPU (skipped without one) ----------------------------------------------------


def _to(layer: Fp8Linear, device: str) -> Fp8Linear:
    return layer.to(device)


@gpu
@pytest.mark.parametrize("fmt, per_channel", [(E4M3, False), (E4M3, True), (E5M2, False)])
def test_cuda_eager_op_matches_cpu_reference(fmt, per_channel: bool) -> None:
    layer = _layer(64, 48, fmt, per_channel, True, seed=1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    want = kernels.linear_reference(x, *_layer_args(layer))
    got = _to(layer, "cuda")(x.cuda()).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert numerics.sqnr_db(want.float(), got.float()) > 40.0


@fp8_gpu
@pytest.mark.parametrize("fmt, n, k, per_channel, bias", [
    (E4M3, 64, 32, False, True), (E4M3, 64, 32, True, False), (E4M3, 64, 24, False, True),
    (E4M3, 24, 32, True, True), (E5M2, 64, 32, False, False),
])
@pytest.mark.parametrize("m", [1, 5, 32])
def test_cuda_decomposition_runs_on_gpu(fmt, n, k, per_channel, bias, m) -> None:
    """``_decompose_linear`` eagerly on the GPU (real ``_scaled_mm``) against the reference."""
    layer = _layer(k, n, fmt, per_channel, bias, seed=2).to("cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    got = inductor._decompose_linear(x, *_layer_args(layer))
    want = kernels.linear_reference(x, *_layer_args(layer))
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_cuda
    assert numerics.sqnr_db(want.float(), got.float()) > 40.0


@fp8_gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compiled_converted_model_uses_scaled_mm(tmp_path, dynamic: bool) -> None:
    """``fp8fx.convert`` + plain ``torch.compile`` on the GPU: Triton kernels around a
    ``_scaled_mm`` call, no call of the eager op, output close to eager."""
    import fp8fx
    from tiny_models import TwoLinear
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = TwoLinear(d=64, h=128).to("cuda")
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    with torch.no_grad():
        model(torch.randn(8, 64, device="cuda"))
    fp8fx.convert(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for m in (5, 16):
        x = torch.randn(m, 64, device="cuda")
        with torch.no_grad():
            out, codes = run_and_get_code(compiled, x)
            ref = model(x)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    code = "\n".join(codes)
    assert "_scaled_mm" in code and "triton" in code
    assert "torch.ops.fp8fx.linear" not in code


@gpu
@pytest.mark.skipif(_fp8_capable(), reason="this GPU has FP8 tensor cores (compute capability "
                                           ">= 8.9): the error path needs an older one")
def test_cuda_old_gpu_raises() -> None:
    layer = _layer(64, 48, E4M3, False, False, seed=3).to("cuda")
    with pytest.raises(QuantizationError, match="8.9"):
        inductor._decompose_linear(torch.randn(2, 64, device="cuda"), *_layer_args(layer))


# ---- fp8fx::scaled_linear (schemes) on CUDA ---------------------------------------------------

from fp8fx.backends import inductor_schemes  # noqa: E402
from fp8fx.kernels.schemes import scaled_linear_reference  # noqa: E402


def _fake_scheme_args(n: int, k: int, *, weights: str, activations: str, group: int = 0,
                      block: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.bfloat16,
                      lead: tuple[int, ...] = (2, 3), fmt: torch.dtype = E4M3):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = torch.device("cuda")
        if weights == "block":
            ws = torch.empty(-(-n // block[0]), -(-k // block[1]), device=dev)
        else:
            ws = torch.empty(n if weights == "channel" else (), device=dev)
        return (torch.empty(*lead, k, dtype=dtype, device=dev), torch.empty(n, k, dtype=fmt, device=dev), ws,
                None, torch.empty(n, dtype=dtype, device=dev), 448.0, activations, group, *block)


def _scaled_mm_vals(gm):
    node = _only(gm, aten._scaled_mm.default)
    return node, [a.meta["val"] for a in node.args[:4]]


def test_scheme_fp8_dynamic_takes_rowwise_scaled_mm() -> None:
    """FP8_DYNAMIC (per-token x per-channel), bfloat16: ``scale_a [M, 1]``, ``scale_b [1, N]``,
    both contiguous float32, bfloat16 output (the row-wise rule); bias in the epilogue."""
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(64, 32, weights="channel", activations="token"))
    node, (q, w_t, s_a, s_b) = _scaled_mm_vals(gm)
    assert q.dtype == w_t.dtype == E4M3 and tuple(q.shape) == (6, 32) and w_t.stride() == (1, 32)
    assert tuple(s_a.shape) == (6, 1) and s_a.stride() == (1, 1) and s_a.dtype == torch.float32
    assert tuple(s_b.shape) == (1, 64) and s_b.stride() == (64, 1) and s_b.dtype == torch.float32
    assert node.meta["val"].dtype == torch.bfloat16
    assert aten.amax.default in _targets(gm)  # the dynamic scale is computed in the graph
    y = _out_val(gm)
    assert tuple(y.shape) == (2, 3, 64) and y.dtype == torch.bfloat16 and y.device.type == "cuda"


def test_scheme_dynamic_tensor_takes_tensorwise_scaled_mm() -> None:
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(64, 32, weights="tensor", activations="tensor", dtype=torch.float16))
    node, (_, _, s_a, s_b) = _scaled_mm_vals(gm)
    assert s_a.shape == s_b.shape == () and node.meta["val"].dtype == torch.float32
    assert _out_val(gm).dtype == torch.float16


def test_scheme_fp8_dynamic_float32_model_dequantizes() -> None:
    """The row-wise form only outputs bfloat16: a float32 model takes the float32 ``mm``."""
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(64, 32, weights="channel", activations="token", dtype=torch.float32))
    assert aten._scaled_mm.default not in _targets(gm) and aten.mm.default in _targets(gm)


@pytest.mark.parametrize("lead", [(2, 3), (1,), (7,)])
def test_scheme_fp8_block_takes_blockwise_scaled_mm_on_sm90(lead) -> None:
    """FP8_BLOCK, K = 512, N = 256 on sm90: ``scale_a [M, K/128]`` outer-dim-major (strides
    ``(1, M)``), ``scale_b [K/128, N/128]`` whose transpose is the stored row-major scale;
    the meta checks of ``_scaled_mm`` accept exactly these layouts for the block recipe."""
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(256, 512, weights="block", activations="group", group=128, block=(128, 128),
                                  lead=lead))
    node, (q, w_t, s_a, s_b) = _scaled_mm_vals(gm)
    m = 1
    for d in lead:
        m *= d
    assert q.dtype == E4M3 and tuple(q.shape) == (m, 512) and tuple(w_t.shape) == (512, 256)
    assert tuple(s_a.shape) == (m, 4) and s_a.dtype == torch.float32
    assert m == 1 or s_a.stride() == (1, m)
    assert tuple(s_b.shape) == (4, 2) and s_b.stride() == (1, 4) and s_b.dtype == torch.float32
    assert node.meta["val"].dtype == torch.bfloat16
    assert aten.mm.default not in _targets(gm)
    y = _out_val(gm)
    assert tuple(y.shape) == (*lead, 256) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("capability, n, k, group, block, dtype, why", [
    ((10, 0), 256, 512, 128, (128, 128), torch.bfloat16, "Blackwell: no 2-D block scales in cuBLAS"),
    ((8, 9), 256, 512, 128, (128, 128), torch.bfloat16, "Ada"),
    ((9, 0), 256, 384, 128, (128, 128), torch.bfloat16, "K/128 = 3, not a multiple of 4"),
    ((9, 0), 200, 512, 128, (128, 128), torch.bfloat16, "N not a multiple of 128"),
    ((9, 0), 256, 512, 64, (64, 64), torch.bfloat16, "64x64 blocks"),
    ((9, 0), 256, 512, 128, (128, 128), torch.float32, "float32 model"),
])
def test_scheme_block_fallback_dequantizes(capability, n, k, group, block, dtype, why) -> None:
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(n, k, weights="block", activations="group", group=group, block=block,
                                  dtype=dtype), capability)
    targets = _targets(gm)
    assert aten._scaled_mm.default not in targets, why
    mm = _only(gm, aten.mm.default)
    assert all(a.meta["val"].dtype == torch.float32 for a in mm.args)
    y = _out_val(gm)
    assert tuple(y.shape) == (2, 3, n) and y.dtype == dtype


@pytest.mark.parametrize("weights, activations, group", [("channel", "none", 0), ("channel", "group", 128)])
def test_scheme_weight_only_and_group_only_dequantize(weights, activations, group) -> None:
    gm = _trace(inductor_schemes.decompose_scaled_linear,
                _fake_scheme_args(256, 512, weights=weights, activations=activations, group=group))
    assert aten._scaled_mm.default not in _targets(gm) and aten.mm.default in _targets(gm)


def test_scheme_capability_error() -> None:
    with pytest.raises(QuantizationError, match=r"compute capability 8\.0.*8\.9"):
        _trace(inductor_schemes.decompose_scaled_linear,
               _fake_scheme_args(64, 32, weights="channel", activations="token"), (8, 0))


def _emulated_blockwise_scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
    """``torch._scaled_mm``'s 1x128 x 128x128 recipe, written from its definition: the product
    of each 128-long K slice scaled by ``scale_a[m, kb] * scale_b.t()[n // 128, kb]``."""
    m, k = a.shape
    n = b.shape[1]
    acc = torch.zeros(m, n)
    sb = scale_b.t()
    for kb in range(k // 128):
        part = a[:, kb * 128:(kb + 1) * 128].float() @ b[kb * 128:(kb + 1) * 128].float()
        acc += part * scale_a[:, kb:kb + 1] * sb[:, kb].repeat_interleave(128)[None, :n]
    return acc.to(out_dtype)


def test_scheme_block_formula_numerics_on_cpu() -> None:
    """The block form's operands and scale layouts, run on CPU through an emulation of the
    recipe, equal the op's definition up to the bfloat16 rounding of the output."""
    gen = torch.Generator().manual_seed(3)
    n, k = 256, 512
    w = torch.randn(n, k, generator=gen) * 0.05
    tiles = w.abs().reshape(2, 128, 4, 128).amax(dim=(1, 3)) / 448.0
    q = numerics.quantize_fp32(w, numerics.expand_block_scale(tiles, (n, k), (128, 128)), E4M3, 448.0)
    x = (torch.randn(5, k, generator=gen) * 3).to(torch.bfloat16)
    with mock.patch.object(torch, "_scaled_mm", _emulated_blockwise_scaled_mm):
        got = inductor_schemes._cuda_block_gemm(x, q, tiles, 448.0, "group", 128, 128, 128, torch.bfloat16, (9, 0))
    want = scaled_linear_reference(x, q, tiles, None, None, 448.0, "group", 128, 128, 128)
    assert got is not None and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert numerics.sqnr_db(want.float(), got.float()) > 45.0


def _scheme_layer(scheme: str, n: int, k: int, seed: int):
    from fp8fx.schemes import Scheme

    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    ls = Scheme.preset(scheme, "scheme").linear
    bn, bk = ls.op_block
    return lin, ls, bn, bk


def _quantized_args(lin, ls, bn, bk):
    w = lin.weight.detach().float()
    n, k = w.shape
    if bn:
        nb, kb = -(-n // bn), -(-k // bk)
        s = w.abs().reshape(nb, bn, kb, bk).amax(dim=(1, 3)) / 448.0
        q = numerics.quantize_fp32(w, numerics.expand_block_scale(s, (n, k), (bn, bk)), E4M3, 448.0)
    else:
        s = w.abs().amax(dim=1) / 448.0
        q = numerics.quantize_fp32(w, s.reshape(-1, 1), E4M3, 448.0)
    return q, s, None, lin.bias.detach(), 448.0, ls.activations.op_name, ls.op_group, bn, bk


@fp8_gpu
@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK"])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_scheme_decomposition_runs_on_gpu(scheme, m) -> None:
    """``decompose_scaled_linear`` eagerly on the GPU (real ``_scaled_mm`` forms) against the CPU
    definition."""
    lin, ls, bn, bk = _scheme_layer(scheme, 256, 512, seed=m)
    args = _quantized_args(lin, ls, bn, bk)
    x = (torch.randn(m, 512) * 2).to(torch.bfloat16)
    want = scaled_linear_reference(x, *args)
    cuda_args = tuple(a.cuda() if isinstance(a, Tensor) else a for a in args)
    got = inductor_schemes.decompose_scaled_linear(x.cuda(), *cuda_args).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert numerics.sqnr_db(want.float(), got.float()) > 35.0


@fp8_gpu
@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_cuda_quantized_scheme_model_compiles(scheme) -> None:
    """``fp8fx.quantize(model, scheme)`` + ``torch.compile`` on the GPU: close to eager, no call
    of the eager op left in the generated code."""
    import fp8fx
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.GELU(), torch.nn.Linear(256, 512))
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    fp8fx.quantize(model, scheme, example_inputs=(x,))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        ref = model(x)
    assert numerics.sqnr_db(ref.float(), out.float()) > 30.0
    assert "torch.ops.fp8fx.scaled_linear" not in "\n".join(codes)

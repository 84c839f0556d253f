"""Tests of the Gaudi lowering (fp8fx.backends.hpu).

Without a Gaudi, the ``torch.ops.hpu`` ops the lowering emits are registered here with the
schemas of the Gaudi PyTorch bridge and reference kernels that follow their documented
semantics (cast: saturate(x * scale_inv); gemm: op(A) @ op(B) * A_scale_inv * B_scale_inv +
bias, FP32 accumulation; softmax_fp8 and fp8_sdpa_recomp_fwd for the attention path, tested in
test_hpu_attention.py, which reuses this registration). The registration lives for this module only (a module-scoped
fixture that removes it afterwards), so other test files see the process as it was. On a
Gaudi host the real ops are used instead and the tensors are moved to the device.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from unittest import mock

from fp8fx import numerics as N
from fp8fx import ops
from fp8fx.backends import hpu
from fp8fx.errors import QuantizationError
from fp8fx.modules import Fp8Linear

E4M3 = torch.float8_e4m3fn

# --------------------------------------------------------------------------------------------
# Reference implementations of the Gaudi ops
# --------------------------------------------------------------------------------------------

SCHEMAS = {
    "cast_to_fp8_v2": "cast_to_fp8_v2(Tensor input, Tensor? scale=None, bool stochastic_rounding="
                      "False, bool is_amax=False, ScalarType dtype=None, int[]? scale_shape=None)"
                      " -> (Tensor, Tensor)",
    "fp8_gemm_v2": "fp8_gemm_v2(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D, "
                   "ScalarType out_dtype, Tensor? A_scale_inv=None, Tensor? B_scale_inv=None, "
                   "Tensor? bias=None, bool accumulate=False, int[]? B_scale_shape=None) -> Tensor",
    "cast_from_fp8": "cast_from_fp8(Tensor input, Tensor? scale, ScalarType out_dtype, "
                     "int[]? scale_shape=None) -> Tensor",
    # the attention path (fp8fx/backends/hpu_attention.py)
    "softmax_fp8": "softmax_fp8(Tensor input, int dim, Tensor? input_scale=None, Tensor? output_scale=None, "
                   "Tensor? inv_attn_heads=None, Tensor? fused_add=None) -> Tensor",
    "fp8_sdpa_recomp_fwd": "fp8_sdpa_recomp_fwd(Tensor q, Tensor k, Tensor v, Tensor? attention_mask, float p, "
                           "float scale, bool is_causal, bool requires_backward, str softmax_mode, "
                           "Tensor? d_scale_q, Tensor? d_scale_k, Tensor? d_scale_v, Tensor? q_scale_s, "
                           "Tensor? q_scale_o, Tensor? d_scale_s, bool is_amax_s, bool is_amax_0, "
                           "Tensor? valid_seq_len, str seq_padding_type) "
                           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}

# E4M3 saturation of the emulated Gaudi: 448 (Gaudi3); the gaudi2 fixture sets 240
HW = {"e4m3_max": 448.0}


def _hw_max(dtype: torch.dtype) -> float:
    return HW["e4m3_max"] if dtype == E4M3 else float(torch.finfo(dtype).max)


def ref_cast_to_fp8_v2(input, scale=None, stochastic_rounding=False, is_amax=False, dtype=None,
                       scale_shape=None):
    if stochastic_rounding or dtype is None or scale_shape is not None:
        raise NotImplementedError("reference cast: round-to-nearest, explicit FP8 dtype only")
    y = input.float() if scale is None else input.float() * scale.float()
    limit = _hw_max(dtype)
    out = y.clamp(-limit, limit).to(dtype)
    amax = input.abs().amax().float() if is_amax else input.new_empty(0, dtype=torch.float32)
    return out, amax


def ref_fp8_gemm_v2(A, trans_A, B, trans_B, D, out_dtype, A_scale_inv=None, B_scale_inv=None,
                    bias=None, accumulate=False, B_scale_shape=None):
    if B_scale_shape is not None:
        raise NotImplementedError("reference gemm: no per-block B scales")
    a, b = A.float(), B.float()
    a = a.transpose(-1, -2) if trans_A else a
    b = b.transpose(-1, -2) if trans_B else b
    y = torch.matmul(a, b)
    if A_scale_inv is not None:
        y = y * A_scale_inv.float()
    if B_scale_inv is not None:
        y = y * B_scale_inv.float()
    if bias is not None:
        y = y + bias.float()
    if accumulate:
        y = y + D.float()
    return y.to(out_dtype)


def ref_cast_from_fp8(input, scale, out_dtype, scale_shape=None):
    y = input.float() if scale is None else input.float() * scale.float()
    return y.to(out_dtype)


def _saturate(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = _hw_max(dtype)
    return y.clamp(-limit, limit).to(dtype)


def ref_softmax_fp8(input, dim, input_scale=None, output_scale=None, inv_attn_heads=None, fused_add=None):
    """softmax in float32 of ``input * input_scale``; with scales, ``saturate(y * output_scale)`` as
    E4M3 (the bridge's SoftmaxFp8Meta: E4M3 when the scales are given, else bfloat16). The bridge
    takes bfloat16 or E4M3 input only, and both scales or neither."""
    if input.dtype not in (torch.bfloat16, E4M3):
        raise RuntimeError("Input tensor must be of torch.bfloat16 or torch.float8_e4m3fn dtype.")
    if (input_scale is None) != (output_scale is None):
        raise RuntimeError("Output and input scales must be both given or None")
    if inv_attn_heads is not None or fused_add is not None:
        raise NotImplementedError("reference softmax_fp8: no inv_attn_heads / fused_add")
    x = input.float() if input_scale is None else input.float() * input_scale.float()
    y = torch.softmax(x, dim)
    return y.to(torch.bfloat16) if output_scale is None else _saturate(y * output_scale.float(), E4M3)


def ref_fp8_sdpa_recomp_fwd(q, k, v, attention_mask, p, scale, is_causal, requires_backward, softmax_mode,
                            d_scale_q, d_scale_k, d_scale_v, q_scale_s, q_scale_o, d_scale_s, is_amax_s,
                            is_amax_0, valid_seq_len, seq_padding_type):
    """Inference FP8 SDPA as the bridge's Fp8SDPARecompFwd sets it up: q, k, v dequantized with
    d_scale_q/k/v; P = softmax(q kᵀ * scale + mask) in float32 (is_causal: lower triangle); P cast to
    q's FP8 dtype with q_scale_s and dequantized with d_scale_s; O = P v, cast to E4M3 with q_scale_o
    when q is E4M3 and q_scale_o is given, else bfloat16. Batch dims broadcast (torch.matmul), which
    covers the 5-D grouped-query layout of hpex.kernels.fp8_fused_sdpa."""
    if p != 0 or requires_backward or valid_seq_len is not None:
        raise NotImplementedError("reference fp8_sdpa_recomp_fwd: inference without dropout / valid_seq_len")

    def deq(t, s):
        return t.float() if s is None else t.float() * s.float()

    qf, kf, vf = deq(q, d_scale_q), deq(k, d_scale_k), deq(v, d_scale_v)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1)
    amax_s = probs.amax().reshape(1) if is_amax_s else torch.zeros(1)
    if q.dtype in (E4M3, torch.float8_e5m2) and q_scale_s is not None:
        probs = deq(_saturate(probs * q_scale_s.float(), q.dtype), d_scale_s)
    out = torch.matmul(probs, vf)
    if q.dtype == E4M3 and q_scale_o is not None:
        out = _saturate(out * q_scale_o.float(), E4M3)
    else:
        out = out.to(torch.bfloat16)
    dummy = torch.zeros(1)
    return out, dummy, dummy.clone(), torch.zeros(1, dtype=torch.int32), amax_s, torch.zeros(1)


REFERENCE_IMPLS = {"cast_to_fp8_v2": ref_cast_to_fp8_v2, "fp8_gemm_v2": ref_fp8_gemm_v2,
                   "cast_from_fp8": ref_cast_from_fp8, "softmax_fp8": ref_softmax_fp8,
                   "fp8_sdpa_recomp_fwd": ref_fp8_sdpa_recomp_fwd}


@pytest.fixture(scope="module")
def device():
    """The device the lowered graphs run on: the real Gaudi, or CPU with reference ops."""
    if hpu.habana_available():
        yield "hpu"
        return
    if not hpu._missing_hpu_ops(list(SCHEMAS)):  # registered by someone else in this process: use them
        yield "cpu"
        return
    lib = torch.library.Library("hpu", "FRAGMENT")
    try:
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, REFERENCE_IMPLS[name], "CompositeExplicitAutograd")
        yield "cpu"
    finally:
        lib._destroy()


@pytest.fixture
def gaudi2(device):
    """Emulate Gaudi2's E4M3 range (±240) in the reference cast."""
    if device != "cpu":
        pytest.skip("emulates a Gaudi generation with the reference ops")
    HW["e4m3_max"] = 240.0
    yield
    HW["e4m3_max"] = 448.0


# --------------------------------------------------------------------------------------------
# Models and graphs
# --------------------------------------------------------------------------------------------


def make_linear(in_f: int, out_f: int, *, per_channel: bool, bias: bool, dtype: torch.dtype,
                seed: int, fp8_max: float = 448.0, pow2: bool = True) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    target = "gaudi2" if fp8_max == 240.0 else "cpu"
    if pow2:
        method = "act_maxabs_pow2_weights_pcs_maxabs_pow2" if per_channel else "maxabs_pow2"
        input_scale = torch.tensor(2.0**-5)
    else:
        method = "maxabs_arbitrary"
        input_scale = torch.tensor(0.0371)
    s = N.weight_scale(w, method, fp8_dtype=E4M3, target=target)
    if not pow2 and per_channel:
        s = w.abs().amax(dim=1) / fp8_max
    q = N.quantize_weight(w, s, E4M3, fp8_max)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return Fp8Linear(q, s, input_scale, b, fp8_max)


class Net(nn.Module):
    """Three FP8 Linears; ``spec`` gives (per_channel, bias) for each.

    The activation scales are calibrated on ``example(dtype)`` with a backoff of 0.5, so the
    activations of that input and of smaller ones stay within ``±fp8_max / 2`` of the scale.
    """

    def __init__(self, spec, dtype: torch.dtype, fp8_max: float = 448.0, pow2: bool = True):
        super().__init__()
        dims = [(16, 32), (32, 24), (24, 8)]
        self.up, self.down, self.head = (
            make_linear(i, o, per_channel=pc, bias=b, dtype=dtype, seed=k, fp8_max=fp8_max,
                        pow2=pow2)
            for k, ((i, o), (pc, b)) in enumerate(zip(dims, spec)))
        x = example(dtype)
        for layer in (self.up, self.down, self.head):  # in order: each scale moves later inputs
            seen = []
            hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            self(x)
            hook.remove()
            scale = seen[0].float().abs().amax() / (fp8_max * 0.5)
            layer.input_scale.copy_(N.pow2_ceil(scale) if pow2 else scale)

    def forward(self, x):
        return self.head(torch.relu(self.down(nn.functional.gelu(self.up(x)))))


MIXED = [(False, True), (True, False), (False, False)]


def definition(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with every Fp8Linear on ``fp8fx.ops.linear_reference``, the op's definition
    (float32 GEMM and epilogue, one rounding): what Gaudi's fp8_gemm_v2 computes. The op's fast
    CPU kernel may round a bfloat16 GEMM once more, which three FP8 layers can amplify."""
    def forward(self, inp):
        return ops.linear_reference(inp, self.weight, self.weight_scale, self.input_scale, self.bias, self.fp8_max)

    with mock.patch.object(Fp8Linear, "forward", forward):
        return model(x)


def example(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 16, generator=g) * 2).to(dtype)


def traced(model: nn.Module, x: torch.Tensor, shape_prop: bool = True) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    if shape_prop:
        ShapeProp(gm).propagate(x)
    return gm


def dynamo_graph(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list]:
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(captured) == 1
    return captured[0]


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def fp8fx_nodes(gm: fx.GraphModule) -> int:
    return count(gm, torch.ops.fp8fx.linear) + count(gm, torch.ops.fp8fx.linear.default)


def run(gm: fx.GraphModule, args: list, device: str) -> torch.Tensor:
    out = gm.to(device)(*[a.to(device) for a in args])
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.cpu()


def cast_op():
    return torch.ops.hpu.cast_to_fp8_v2.default


def gemm_op():
    return torch.ops.hpu.fp8_gemm_v2.default


# --------------------------------------------------------------------------------------------
# Availability and errors
# --------------------------------------------------------------------------------------------


def test_availability_probes_never_raise():
    available = hpu.habana_available()
    assert isinstance(available, bool)
    if not available:
        assert hpu.gaudi_e4m3_max() is None


def test_missing_hpu_ops_raise_and_leave_graph_unchanged(monkeypatch):
    monkeypatch.setattr(hpu, "_HPU_NAMESPACE", "fp8fx_test_absent")
    monkeypatch.setattr(hpu, "habana_available", lambda: False)
    x = example(torch.float32)
    gm = traced(Net(MIXED, torch.float32), x)
    code = gm.code
    with pytest.raises(QuantizationError) as err:
        hpu.lower_to_hpu(gm)
    message = str(err.value)
    assert "cast_to_fp8_v2" in message and "fp8_gemm_v2" in message
    assert "habana_frameworks" in message and "'linear'" in message
    assert gm.code == code and fp8fx_nodes(gm) == 3


def test_graph_without_fp8fx_nodes_needs_no_gaudi(monkeypatch):
    monkeypatch.setattr(hpu, "_HPU_NAMESPACE", "fp8fx_test_absent")
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    code = gm.code
    assert hpu.lower_to_hpu(gm) == 0
    assert gm.code == code


def test_not_a_graph_module():
    with pytest.raises(QuantizationError, match="GraphModule"):
        hpu.lower_to_hpu(nn.Linear(2, 2))


def test_unknown_input_dtype_needs_out_dtype(device):
    x = example(torch.float32)
    model = Net(MIXED, torch.float32)
    gm = traced(model, x, shape_prop=False)  # symbolic_trace records no dtypes
    code = gm.code
    with pytest.raises(QuantizationError, match="out_dtype") as err:
        hpu.lower_to_hpu(gm)
    assert "'linear'" in str(err.value)
    assert gm.code == code and fp8fx_nodes(gm) == 3
    assert hpu.lower_to_hpu(gm, out_dtype=torch.float32) == 3
    torch.testing.assert_close(run(gm, [x], device), model(x), rtol=0, atol=0)


def test_bad_e4m3_max(device):
    gm = traced(Net(MIXED, torch.float32), example(torch.float32))
    with pytest.raises(QuantizationError, match="e4m3_max"):
        hpu.lower_to_hpu(gm, e4m3_max=1000.0)
    assert fp8fx_nodes(gm) == 3


# --------------------------------------------------------------------------------------------
# Graph structure
# --------------------------------------------------------------------------------------------


def test_counts_and_scale_arguments(device):
    x = example(torch.bfloat16)
    model = Net(MIXED, torch.bfloat16)
    gm = traced(model, x)
    assert fp8fx_nodes(gm) == 3
    assert hpu.lower_to_hpu(gm) == 3
    assert fp8fx_nodes(gm) == 0
    assert count(gm, cast_op()) == 3 and count(gm, gemm_op()) == 3
    assert count(gm, operator.getitem) == 3
    assert count(gm, torch.ops.aten.reciprocal.default) == 0  # folded: scales are attributes

    gemms = [n for n in gm.graph.nodes if n.target == gemm_op()]
    seen = set()
    for gemm in gemms:
        qx, trans_a, w, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate = gemm.args
        name = w.target.rsplit(".", 1)[0]
        seen.add(name)
        layer = getattr(model, name)
        assert (trans_a, trans_b, d, out_dtype, accumulate) == (False, True, None,
                                                                 torch.bfloat16, False)
        assert w.op == "get_attr" and w.target == f"{name}.weight"
        # the gemm's *_scale_inv arguments receive the dequant scales s (INC's convention)
        assert a_scale.op == "get_attr" and a_scale.target == f"{name}.input_scale"
        assert b_scale.op == "get_attr" and b_scale.target == f"{name}.weight_scale"
        assert tuple(getattr(gm, name).weight_scale.shape) == (
            (layer.out_features,) if layer.per_channel else ())
        assert (bias is None) == (layer.bias is None)
        if bias is not None:
            assert bias.target == f"{name}.bias"
        # the cast receives 1/input_scale (INC's QuantInput passes scale_inv)
        assert qx.target is operator.getitem and qx.args[1] == 0
        cast = qx.args[0]
        assert cast.target == cast_op()
        _, scale_inv, stochastic, is_amax, fp8_dtype = cast.args
        assert (stochastic, is_amax, fp8_dtype) == (False, False, E4M3)
        assert scale_inv.op == "get_attr"
        folded = getattr(gm, scale_inv.target)
        assert folded.dtype == torch.float32 and folded.dim() == 0
        assert folded.item() == 1.0 / layer.input_scale.item()
    assert seen == {"up", "down", "head"}


def test_node_called_with_keywords(device):
    layer = make_linear(16, 8, per_channel=True, bias=True, dtype=torch.float32, seed=3)
    graph = fx.Graph()
    root = nn.Module()
    root.lin = layer
    x = graph.placeholder("x")
    attrs = {n: graph.get_attr(f"lin.{n}") for n in ("weight", "weight_scale", "input_scale",
                                                    "bias")}
    y = graph.call_function(
        torch.ops.fp8fx.linear.default, (x, attrs["weight"]),
        {"weight_scale": attrs["weight_scale"], "input_scale": attrs["input_scale"],
         "bias": attrs["bias"], "fp8_max": 448.0})
    graph.output(y)
    gm = fx.GraphModule(root, graph)
    inp = example(torch.float32)
    expected = gm(inp)
    assert hpu.lower_to_hpu(gm, out_dtype=torch.float32) == 1
    assert count(gm, gemm_op()) == 1 and fp8fx_nodes(gm) == 0
    torch.testing.assert_close(run(gm, [inp], device), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Numerics: the lowered graph reproduces fp8fx's reference op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_lowered_graph_matches_reference(device, dtype, per_channel, bias):
    x = example(dtype)
    model = Net([(per_channel, bias)] * 3, dtype)
    expected = definition(model, x)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm) == 3
    out = run(gm, [x], device)
    assert out.dtype == dtype
    # power-of-two scales: 1/s and every scale product are exact, so the results are identical
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_arbitrary_scales_match_closely(device, per_channel):
    x = example(torch.float32)
    model = Net([(per_channel, True)] * 3, torch.float32, pow2=False)
    expected = definition(model, x)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm) == 3
    # x * (1/s) may differ from x / s by one float32 ulp, which can move an FP8 rounding
    assert N.sqnr_db(expected, run(gm, [x], device)) > 40.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_unfused_bias_as_inc(device, dtype):
    x = example(dtype)
    model = Net(MIXED, dtype)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm, fuse_bias=False) == 3
    adds = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 1 and adds[0].args[1].target == "up.bias"  # only `up` has a bias
    assert all(n.args[8] is None for n in gm.graph.nodes if n.target == gemm_op())
    # INC's PatchedLinear: gemm without bias, rounded to the model dtype, then + bias
    up = model.up
    y = torch.ops.fp8fx.linear(x, up.weight, up.weight_scale, up.input_scale, None, up.fp8_max)
    expected_up = y + up.bias
    up_node = adds[0]
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:  # a copy of the lowered graph that returns `up`'s output
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is up_node:
            graph.output(env[node])
            break
    probe = fx.GraphModule(gm, graph)
    torch.testing.assert_close(run(probe, [x], device), expected_up, rtol=0, atol=0)
    if dtype == torch.float32:  # fp32: the extra rounding is a no-op, the model output is exact
        torch.testing.assert_close(run(gm, [x], device), model(x), rtol=0, atol=0)


def test_dynamo_graph(device):
    x = example(torch.bfloat16)
    model = Net(MIXED, torch.bfloat16)
    expected = definition(model, x)
    gm, inputs = dynamo_graph(model, x)
    assert fp8fx_nodes(gm) == 3
    assert hpu.lower_to_hpu(gm) == 3
    assert fp8fx_nodes(gm) == 0 and count(gm, gemm_op()) == 3 and count(gm, cast_op()) == 3
    # dynamo passes the scales as graph inputs: 1/s is computed in the graph
    recips = [n for n in gm.graph.nodes if n.target == torch.ops.aten.reciprocal.default]
    assert len(recips) == 3 and all(r.args[0].op == "placeholder" for r in recips)
    for gemm in (n for n in gm.graph.nodes if n.target == gemm_op()):
        cast = gemm.args[0].args[0]
        assert cast.args[1].target == torch.ops.aten.reciprocal.default
        assert cast.args[1].args[0] is gemm.args[6]  # same input scale, inverted for the cast
        assert gemm.args[5] == torch.bfloat16
    torch.testing.assert_close(run(gm, inputs, device), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Gaudi2 (E4M3 saturates at ±240) vs Gaudi3 (±448)
# --------------------------------------------------------------------------------------------


def test_gaudi2_requantizes_448_weights(gaudi2, device):
    x = example(torch.float32)
    model = Net(MIXED, torch.float32, fp8_max=448.0)
    expected = definition(model, x)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm, e4m3_max=240.0) == 3
    requantized = copy.deepcopy(model)  # fp8fx reference with the requantized weights
    for gemm in (n for n in gm.graph.nodes if n.target == gemm_op()):
        w, s = gemm.args[2], gemm.args[7]
        name = gemm.args[6].target.rsplit(".", 1)[0]
        layer = getattr(model, name)
        new_w, new_s = getattr(gm, w.target), getattr(gm, s.target)
        assert w.target != f"{name}.weight" and new_w.dtype == E4M3
        assert new_w.float().abs().max().item() <= 240.0
        torch.testing.assert_close(new_s, layer.weight_scale * (448.0 / 240.0), rtol=0, atol=0)
        torch.testing.assert_close(  # codes scaled by 240/448, rounded to nearest
            new_w.float(), (layer.weight.float() * (240.0 / 448.0)).to(E4M3).float())
        assert gemm.args[6].target == f"{name}.input_scale"  # activation scale kept, as INC
        ref_layer = getattr(requantized, name)
        ref_layer.weight.data, ref_layer.weight_scale = new_w, new_s
        ref_layer.fp8_max = 240.0
    # the original FP8 weights are no longer read by the graph
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert not {"up.weight", "down.weight", "head.weight"} & targets
    out = run(gm, [x], device)
    torch.testing.assert_close(out, requantized(x), rtol=0, atol=0)
    # one extra FP8 rounding of every weight (about 31 dB each), compounded over three layers
    assert N.sqnr_db(expected, out) > 15.0


def test_gaudi2_cannot_requantize_graph_inputs(device):
    x = example(torch.float32)
    gm, _ = dynamo_graph(Net(MIXED, torch.float32, fp8_max=448.0), x)
    code = gm.code
    with pytest.raises(QuantizationError, match="Gaudi2"):
        hpu.lower_to_hpu(gm, e4m3_max=240.0)
    assert gm.code == code and fp8fx_nodes(gm) == 3


def test_gaudi2_model_on_gaudi3_is_lowered_as_is(device):
    x = example(torch.bfloat16)
    model = Net(MIXED, torch.bfloat16, fp8_max=240.0)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm, e4m3_max=448.0) == 3
    weights = {n.args[2].target for n in gm.graph.nodes if n.target == gemm_op()}
    assert weights == {"up.weight", "down.weight", "head.weight"}  # not requantized
    # identical while activations stay within the calibrated range (|x / s| <= 240)
    torch.testing.assert_close(run(gm, [x], device), definition(model, x), rtol=0, atol=0)
    if device == "cpu":  # beyond it, the (emulated Gaudi3) cast saturates at 448, not at 240
        big = x * 4
        assert not torch.equal(run(gm, [big], device), definition(model, big))


def test_reference_ops_follow_documented_semantics(device):
    if device != "cpu":
        pytest.skip("checks the reference kernels registered without a Gaudi")
    x = torch.tensor([1.0, -300.0, 1000.0, 0.3])
    q, amax = torch.ops.hpu.cast_to_fp8_v2(x, torch.tensor(0.5), False, True, E4M3)
    assert q.dtype == E4M3 and q.float().tolist() == [0.5, -144.0, 448.0, 0.15625]
    assert amax.item() == 1000.0
    a = torch.randn(3, 4).to(E4M3)
    b = torch.randn(5, 4).to(E4M3)
    s_b = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5])
    y = torch.ops.hpu.fp8_gemm_v2(a, False, b, True, None, torch.float32, torch.tensor(0.25), s_b,
                                  torch.ones(5), False)
    torch.testing.assert_close(y, a.float() @ b.float().t() * 0.25 * s_b + 1)
    z = torch.ops.hpu.cast_from_fp8(q, torch.tensor(2.0), torch.bfloat16)
    assert z.dtype == torch.bfloat16 and z.float().tolist() == [1.0, -288.0, 896.0, 0.3125]


# --------------------------------------------------------------------------------------------
# fp8fx.scaled_linear: dynamic schemes lowered, the others kept
# --------------------------------------------------------------------------------------------

from fp8fx.kernels.schemes import scaled_linear_reference  # noqa: E402
from fp8fx.numerics import expand_block_scale, quantize_fp32  # noqa: E402
from fp8fx.schemes import LinearScheme  # noqa: E402

TOKEN_CHANNEL = LinearScheme("channel", "dynamic_token")  # FP8_DYNAMIC
TOKEN_TENSOR = LinearScheme("tensor", "dynamic_token")
TENSOR_CHANNEL = LinearScheme("channel", "dynamic_tensor")
TENSOR_TENSOR = LinearScheme("tensor", "dynamic_tensor")
BLOCK = LinearScheme("block", "dynamic_group", block=(8, 8), group_size=8)
GROUP_ONLY = LinearScheme("channel", "dynamic_group", group_size=8)
WEIGHT_ONLY = LinearScheme("channel", "none")
LOWERED = [TOKEN_CHANNEL, TOKEN_TENSOR, TENSOR_CHANNEL, TENSOR_TENSOR]


def scheme_linear(in_f: int, out_f: int, scheme: LinearScheme, *, bias: bool, dtype: torch.dtype,
                  seed: int, fp8_max: float = 448.0) -> Fp8Linear:
    """An Fp8Linear in ``scheme`` with power-of-two weight scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if scheme.weights.value == "block":
        bn, bk = scheme.block
        nb, kb = -(-out_f // bn), -(-in_f // bk)
        tiles = torch.nn.functional.pad(w.abs(), (0, kb * bk - in_f, 0, nb * bn - out_f))
        s = N.pow2_ceil(tiles.reshape(nb, bn, kb, bk).amax(dim=(1, 3)) / fp8_max)
        q = quantize_fp32(w, expand_block_scale(s, (out_f, in_f), (bn, bk)), E4M3, fp8_max)
    else:
        amax = w.abs().amax(dim=1) if scheme.weights.value == "channel" else w.abs().amax()
        s = N.pow2_ceil(amax / fp8_max)
        q = quantize_fp32(w, s.reshape(-1, 1) if s.dim() else s, E4M3, fp8_max)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return Fp8Linear(q, s, None, b, fp8_max, scheme=scheme)


class SchemeNet(nn.Module):
    def __init__(self, schemes, dtype: torch.dtype, bias=(True, False, True), fp8_max: float = 448.0):
        super().__init__()
        dims = [(16, 32), (32, 24), (24, 8)]
        self.up, self.down, self.head = (
            scheme_linear(i, o, sc, bias=b, dtype=dtype, seed=k, fp8_max=fp8_max)
            for k, ((i, o), sc, b) in enumerate(zip(dims, schemes, bias)))

    def forward(self, x):
        return self.head(torch.relu(self.down(nn.functional.gelu(self.up(x)))))


def scheme_definition(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with every Fp8Linear on ``scaled_linear_reference``, the op's definition."""
    def forward(self, inp):
        s = self.scheme
        return scaled_linear_reference(inp, self.weight, self.weight_scale, self.input_scale, self.bias,
                                       self.fp8_max, s.activations.op_name, s.op_group, *s.op_block)

    with mock.patch.object(Fp8Linear, "forward", forward):
        return model(x)


def pow2_rows(dtype: torch.dtype, amax: float, shape=(2, 5, 16), seed: int = 1) -> torch.Tensor:
    """Random rows each of whose max |x| is ``amax`` exactly (so ``amax / fp8_max`` can be a
    power of two: then ``1/s`` and every scale product are exact)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return (x / x.abs().amax(dim=-1, keepdim=True) * amax).to(dtype)


def scaled_nodes(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.fp8fx.scaled_linear, torch.ops.fp8fx.scaled_linear.default)]


@pytest.mark.parametrize("scheme", LOWERED, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dynamic_scheme_matches_reference_exactly(device, scheme, dtype, bias):
    """One dynamic Linear on rows whose scale is a power of two: the Gaudi form (scale from
    the graph, cast with 1/s, gemm with s and s_w) equals ``scaled_linear_reference`` bit for
    bit; 3-D input, so the per-token scale is ``[2, 5, 1]``."""
    layer = scheme_linear(16, 32, scheme, bias=bias, dtype=dtype, seed=4)
    x = pow2_rows(dtype, 448.0 * 2**-3)
    expected = scheme_definition(layer, x)
    gm = traced(layer, x)
    assert len(scaled_nodes(gm)) == 1
    assert hpu.lower_to_hpu(gm) == 1
    assert not scaled_nodes(gm) and count(gm, cast_op()) == 1 and count(gm, gemm_op()) == 1
    out = run(gm, [x], device)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_dynamic_graph_structure(device, activations):
    """The scale is computed in the graph (abs, amax over the last dim kept or over all, float32,
    floor, / fp8_max); the cast gets its reciprocal, the gemm the scale itself and the weight's."""
    scheme = TOKEN_CHANNEL if activations == "token" else TENSOR_CHANNEL
    layer = scheme_linear(16, 32, scheme, bias=True, dtype=torch.bfloat16, seed=2)
    x = example(torch.bfloat16)
    gm = traced(layer, x)
    assert hpu.lower_to_hpu(gm) == 1
    aten = torch.ops.aten
    gemm = next(n for n in gm.graph.nodes if n.target == gemm_op())
    qx, trans_a, w, trans_b, d, out_dtype, a_scale, b_scale, b, accumulate = gemm.args
    assert (trans_a, trans_b, d, out_dtype, accumulate) == (False, True, None, torch.bfloat16, False)
    assert w.target == "weight" and b_scale.target == "weight_scale" and b.target == "bias"
    assert a_scale.target == aten.div.Tensor and a_scale.args[1] == 448.0
    floor = a_scale.args[0]
    assert floor.target == aten.clamp_min.default and floor.args[1] == 1e-12
    to32 = floor.args[0]
    assert to32.target == aten._to_copy.default and to32.kwargs == {"dtype": torch.float32}
    amax = to32.args[0]
    assert amax.target == aten.amax.default
    assert tuple(amax.args[1:]) == (([-1], True) if activations == "token" else ([],))
    assert amax.args[0].target == aten.abs.default and amax.args[0].args[0].op == "placeholder"
    cast = qx.args[0]
    assert cast.target == cast_op() and cast.args[2:] == (False, False, E4M3)
    assert cast.args[1].target == aten.reciprocal.default and cast.args[1].args[0] is a_scale
    assert count(gm, aten.reciprocal.default) == 1 and count(gm, aten.amax.default) == 1


def test_dynamic_net_random_inputs(device):
    """Three dynamic Linears on ordinary inputs: 1/s is arbitrary now, ``x * (1/s)`` may differ
    from ``x / s`` by one float32 ulp and move an FP8 code; the result stays within FP8 noise."""
    x = example(torch.float32)
    model = SchemeNet([TOKEN_CHANNEL, TENSOR_TENSOR, TOKEN_TENSOR], torch.float32)
    expected = scheme_definition(model, x)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm) == 3
    assert not scaled_nodes(gm) and count(gm, gemm_op()) == 3 and count(gm, cast_op()) == 3
    assert N.sqnr_db(expected, run(gm, [x], device)) > 40.0


def test_schemes_without_gaudi_form_are_kept_with_reason(device):
    """Block weights, group activations and weight-only stay ``fp8fx.scaled_linear`` nodes (their
    eager kernel), each with its reason in node.meta; the dynamic one next to them is lowered."""
    x = example(torch.float32)
    model = SchemeNet([BLOCK, TOKEN_CHANNEL, WEIGHT_ONLY], torch.float32)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm) == 1
    kept = scaled_nodes(gm)
    assert len(kept) == 2 and count(gm, gemm_op()) == 1
    reasons = {n.args[6]: n.meta["fp8fx_hpu"] for n in kept}
    assert set(reasons) == {"group", "none"}
    assert hpu.KEPT_REASONS["block"] in reasons["group"]  # BLOCK: block weights decide it
    assert hpu.KEPT_REASONS["none"] in reasons["none"]
    assert hpu.kept_reason(kept[0]) is not None
    assert N.sqnr_db(scheme_definition(model, x), run(gm, [x], device)) > 40.0


@pytest.mark.parametrize("scheme, key", [(BLOCK, "block"), (GROUP_ONLY, "group"), (WEIGHT_ONLY, "none")])
def test_graph_of_kept_schemes_needs_no_gaudi(monkeypatch, scheme, key):
    monkeypatch.setattr(hpu, "_HPU_NAMESPACE", "fp8fx_test_absent")
    monkeypatch.setattr(hpu, "habana_available", lambda: False)
    layer = scheme_linear(16, 32, scheme, bias=True, dtype=torch.float32, seed=0)
    x = example(torch.float32)
    gm = traced(layer, x)
    code = gm.code
    assert hpu.lower_to_hpu(gm) == 0
    assert gm.code == code
    node, = scaled_nodes(gm)
    assert hpu.KEPT_REASONS[key] in node.meta["fp8fx_hpu"]


def test_missing_hpu_ops_name_the_scaled_linear_node(monkeypatch):
    monkeypatch.setattr(hpu, "_HPU_NAMESPACE", "fp8fx_test_absent")
    monkeypatch.setattr(hpu, "habana_available", lambda: False)
    x = example(torch.float32)
    gm = traced(scheme_linear(16, 32, TOKEN_CHANNEL, bias=False, dtype=torch.float32, seed=0), x)
    code = gm.code
    with pytest.raises(QuantizationError, match=r"fp8fx.scaled_linear.*cast_to_fp8_v2.*habana_frameworks"):
        hpu.lower_to_hpu(gm)
    assert gm.code == code


def test_dynamic_on_gaudi2_divides_by_240_and_requantizes(gaudi2, device):
    """fp8_max 448 on Gaudi2 (E4M3 up to ±240): the weights are requantized as for static
    Linears and the dynamic scale is ``amax / 240``, so the lowered graph equals the op's
    definition at fp8_max 240 with the requantized weights."""
    layer = scheme_linear(16, 32, TOKEN_CHANNEL, bias=True, dtype=torch.float32, seed=6)
    x = pow2_rows(torch.float32, 240.0 * 2**-2)
    gm = traced(layer, x)
    assert hpu.lower_to_hpu(gm, e4m3_max=240.0) == 1
    gemm = next(n for n in gm.graph.nodes if n.target == gemm_op())
    assert gemm.args[6].args[1] == 240.0
    new_w, new_s = getattr(gm, gemm.args[2].target), getattr(gm, gemm.args[7].target)
    assert new_w.float().abs().max().item() <= 240.0
    torch.testing.assert_close(new_s, layer.weight_scale * (448.0 / 240.0), rtol=0, atol=0)
    expected = scaled_linear_reference(x, new_w, new_s, None, layer.bias, 240.0, "token", 0, 0, 0)
    # the activation codes are the same (s = 2^-2); the weight scales (x 448/240) are not powers of
    # two, so multiplying them after the GEMM instead of before rounds differently in float32
    torch.testing.assert_close(run(gm, [x], device), expected, rtol=1e-5, atol=1e-5)
    # and it is not the definition at the node's fp8_max 448 (scale amax / 448, other FP8 codes)
    assert not torch.allclose(
        expected, scaled_linear_reference(x, new_w, new_s, None, layer.bias, 448.0, "token", 0, 0, 0), rtol=1e-3)


def test_dynamic_dynamo_graph(device):
    """A dynamo graph (weights and scales are placeholders) of an FP8_DYNAMIC Linear."""
    layer = scheme_linear(16, 32, TOKEN_CHANNEL, bias=True, dtype=torch.bfloat16, seed=3)
    x = pow2_rows(torch.bfloat16, 448.0 * 2**-4)
    expected = scheme_definition(layer, x)
    gm, inputs = dynamo_graph(layer, x)
    assert len(scaled_nodes(gm)) == 1
    assert hpu.lower_to_hpu(gm) == 1
    gemm = next(n for n in gm.graph.nodes if n.target == gemm_op())
    assert gemm.args[2].op == "placeholder" and gemm.args[7].op == "placeholder"
    torch.testing.assert_close(run(gm, inputs, device), expected, rtol=0, atol=0)


def test_quantize_fp8_dynamic_model_lowers_every_linear(device):
    """``fp8fx.quantize(model, "FP8_DYNAMIC")`` then a symbolic trace: every Linear lowered."""
    import fp8fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = example(torch.float32)
    fp8fx.quantize(model, "FP8_DYNAMIC", example_inputs=(x,))
    assert all(isinstance(m, Fp8Linear) for m in (model[0], model[2]))
    expected = scheme_definition(model, x)
    gm = traced(model, x)
    assert hpu.lower_to_hpu(gm) == 2 and not scaled_nodes(gm)
    assert N.sqnr_db(expected, run(gm, [x], device)) > 40.0


def test_scaled_linear_static_is_lowered_like_linear(device):
    """A static ``fp8fx.scaled_linear`` node (per-tensor weights) takes fp8fx.linear's form."""
    layer = make_linear(16, 8, per_channel=False, bias=True, dtype=torch.float32, seed=3)
    graph, root = fx.Graph(), nn.Module()
    root.lin = layer
    x = graph.placeholder("x")
    a = {n: graph.get_attr(f"lin.{n}") for n in ("weight", "weight_scale", "input_scale", "bias")}
    y = graph.call_function(torch.ops.fp8fx.scaled_linear.default,
                            (x, a["weight"], a["weight_scale"], a["input_scale"], a["bias"], 448.0, "static", 0, 0, 0))
    graph.output(y)
    gm = fx.GraphModule(root, graph)
    inp = example(torch.float32)
    expected = scaled_linear_reference(inp, layer.weight, layer.weight_scale, layer.input_scale, layer.bias,
                                       448.0, "static", 0, 0, 0)
    assert hpu.lower_to_hpu(gm, out_dtype=torch.float32) == 1
    cast = next(n for n in gm.graph.nodes if n.target == cast_op())
    assert cast.args[1].op == "get_attr"  # folded 1/s
    torch.testing.assert_close(run(gm, [inp], device), expected, rtol=0, atol=0)

"""Graph-in / match-out tests with exact counts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

from fp8fx.capture import ModuleNames, capture
from fp8fx.errors import CaptureError
from fp8fx.passes.match import OpKind, find_matches
from tiny_models import EagerAttention, GraphBreak, TwoLinear, tiny_llama


def kinds(matches) -> dict[str, int]:
    return dict(Counter(m.kind.value for m in matches))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


def test_module_names_resolve_by_class_and_the_models_own_names():
    names = ModuleNames(_Net())
    # whatever dynamo's notation for the root (it changed between releases), the name is the model's
    for root in ("L['self']", "L['args'][0]", "L['fn'].__self__", "L['args'][0]._modules['x']"):
        assert names.entry(f"{root}.blocks.1.mlp", nn.Linear) == "blocks.1.mlp"
        assert names.entry(f"{root}.blocks.1", _Block) == "blocks.1"
    assert names.entry("L['args'][0]", _Net) == ""
    # a path whose class does not match the module of that name resolves to nothing
    assert names.entry("L['self'].blocks.1", nn.Linear) is None
    assert names.entry("L['self'].blocks.7.mlp", nn.Linear) is None


def test_names_come_from_identity_whatever_the_frame_compiled():
    """transformers 5.24 reaches forward through a wrapper (dynamo then names the root
    ``L['args'][0]``); names must not change with that."""
    import functools

    m = TwoLinear()
    original = type(m).forward

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    m.forward = wrapped.__get__(m)
    (cg,) = capture(m, (torch.randn(3, 32),))
    assert sorted(cg.param_names.values()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert sorted(x.name for x in find_matches(cg)) == ["fc1", "fc2", "softmax_0"]


def test_two_linear_and_functional_softmax():
    m = TwoLinear()
    (cg,) = capture(m, (torch.randn(3, 32),))
    matches = find_matches(cg)
    assert kinds(matches) == {"linear": 2, "softmax": 1}
    lin = [x for x in matches if x.kind is OpKind.LINEAR]
    assert [x.name for x in lin] == ["fc1", "fc2"]
    assert [x.weight for x in lin] == ["fc1.weight", "fc2.weight"]
    assert [x.bias for x in lin] == ["fc1.bias", "fc2.bias"]
    assert all(x.module_type == "Linear" for x in lin)
    soft = [x for x in matches if x.kind is OpKind.SOFTMAX][0]
    assert soft.name == "softmax_0" and soft.module_path == ""


def test_capture_runs_nothing():
    calls = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    m = Spy()
    m.fc.register_forward_hook(lambda *a: calls.append(1))
    capture(m, (torch.randn(2, 4),))
    assert calls == []  # traced, never executed


def test_eager_attention_matmuls_softmax():
    (cg,) = capture(EagerAttention(), (torch.randn(2, 5, 32),))
    matches = find_matches(cg)
    assert kinds(matches) == {"linear": 2, "matmul": 2, "softmax": 1}
    mm = [x for x in matches if x.kind is OpKind.MATMUL]
    assert [x.name for x in mm] == ["matmul_0", "matmul_1"]
    assert all(len(x.inputs) == 2 for x in mm)


@pytest.mark.parametrize("attn,expected", [
    ("sdpa", {"linear": 15, "sdpa": 2, "kv_cache": 4}),
    ("eager", {"linear": 15, "matmul": 4, "softmax": 2, "kv_cache": 4}),
])
def test_llama_prefill_matches(attn, expected):
    model = tiny_llama(layers=2, attn=attn)
    (cg,) = capture(model, (), {"input_ids": torch.randint(0, 128, (2, 7)), "use_cache": True})
    matches = find_matches(cg)
    assert kinds(matches) == expected
    names = {m.name for m in matches}
    assert "model.layers.1.self_attn.q_proj" in names
    assert "lm_head" in names
    kv = sorted(m.name for m in matches if m.kind is OpKind.KV_CACHE)
    assert kv == [f"model.layers.{i}.self_attn.kv_cache_{j}" for i in range(2) for j in range(2)]


def test_llama_decode_graph_has_same_names():
    from transformers import DynamicCache

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    (prefill,) = capture(model, (), {"input_ids": ids, "use_cache": True})
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    (decode,) = capture(model, (), {"input_ids": ids[:, -1:], "past_key_values": cache, "use_cache": True})
    a, b = find_matches(prefill), find_matches(decode)
    assert [(m.name, m.kind) for m in a] == [(m.name, m.kind) for m in b]


def test_functional_linear_with_foreign_parameter():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 4))
            self.w2 = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.nn.functional.linear(torch.nn.functional.linear(x, self.w1), self.w2)

    (cg,) = capture(Custom(), (torch.randn(2, 4),))
    matches = find_matches(cg)
    assert [(m.kind, m.name, m.weight) for m in matches] == [
        (OpKind.LINEAR, "w1", "w1"), (OpKind.LINEAR, "w2", "w2")]


def test_addmm_conv1d_style_is_linear():
    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))  # [in, out]
            self.bias = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D()

        def forward(self, x):
            return self.c_fc(x)

    (cg,) = capture(M(), (torch.randn(3, 4),))
    (m,) = find_matches(cg)
    assert (m.kind, m.name, m.weight_transposed, m.bias, m.module_type) == (
        OpKind.LINEAR, "c_fc", True, "c_fc.bias", "Conv1D")


def test_graph_break_is_named():
    with pytest.raises(CaptureError, match="could not capture GraphBreak.forward"):
        capture(GraphBreak(), (torch.randn(2, 4),))


def test_matching_never_mutates_the_graph():
    (cg,) = capture(TwoLinear(), (torch.randn(3, 32),))
    before = str(cg.gm.graph)
    find_matches(cg)
    assert str(cg.gm.graph) == before


class _Branchy(nn.Module):
    """Two softmaxes in one module, the first only on one path: its functional ops are numbered
    by graph order, so ``softmax_0`` is a different op in the two graphs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, both: bool = True):
        out = torch.softmax(self.a(x), -1) if both else 0
        return out + torch.softmax(self.b(x), -1)


def test_one_name_for_two_ops_across_graphs_is_refused(tmp_path):
    import fp8fx

    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"))
    model = fp8fx.prepare(_Branchy(), cfg)
    with torch.no_grad():
        model(torch.randn(2, 8), both=True)
        with pytest.raises(CaptureError, match=r"softmax_0.*two different ops.*\['a'\].*\['b'\]"):
            model(torch.randn(2, 8), both=False)


def test_sources_name_the_linears_an_op_computes_from():
    (cg,) = capture(tiny_llama(layers=1), kwargs={"input_ids": torch.randint(0, 128, (1, 5))})
    by_name = {m.name: m for m in find_matches(cg)}
    sdpa = [m for m in by_name.values() if m.kind is OpKind.SDPA][0]
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"} <= set(sdpa.sources)

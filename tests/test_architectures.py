"""The architecture matrix as tests (docs/architectures.md is the same runs, published).

Thirteen transformers families as tiny random-weight models (tests/arch_zoo.py): each is
prepared, calibrated on a few random token batches, converted, and then generates a few greedy
tokens (decoder LMs) or runs forward (BERT), in eager form and through
``torch.compile(backend="fp8fx")``. Every Linear must be quantized except the ones left in high
precision by design (an lm_head tied to the embedding, a MoE router), and the outputs must stay
close to the fp32 model (SQNR).

The compiled variants run the QUANTIZE graph without Inductor (``options={"inductor": False}``):
Inductor needs 10-50 s per graph on a small CPU, which thirteen models cannot afford here. The
Inductor lowering of ``fp8fx.linear`` is tested in test_backend_inductor.py and
test_backend_dynamo.py; ``python scripts/arch_matrix.py --inductor`` runs this matrix through
Inductor (the grouped experts op is opaque to Inductor: it runs its own kernel).
"""

from __future__ import annotations

import pytest
import torch

import fp8fx
from fp8fx.capture import ModuleNames
from fp8fx.backends.dynamo import fp8fx_backend
from fp8fx.formats.inc import read_measurements
from fp8fx.modules import Fp8Experts, Fp8Linear
from fp8fx.numerics import sqnr_db
from arch_zoo import ARCHS, VOCAB, build, calibration_batches, eval_ids, main_output

# Whole-model SQNR floor: one FP8 Linear measures about 29 dB; a layer, its attention and the
# lm_head accumulate a few dB more noise (the lowest measured here is about 25 dB, GPT-J).
MIN_SQNR_DB = 20.0

# Linears quantized per model (1 decoder layer; a MoE experts stack counts once per projection).
EXPECTED_LINEARS = {
    "llama": 8, "mistral": 8, "qwen2": 8, "phi3": 5, "gptj": 7, "falcon": 4, "bloom": 4,
    "mixtral": 7, "gpt2": 4, "opt": 6, "gemma": 7, "starcoder2": 6, "bert": 7,
}
# Linears left in high precision by design, with a word their reason must contain.
TIED = {"lm_head": "tied"}
EXPECTED_HIGH_PRECISION = {
    "falcon": TIED, "bloom": TIED, "gpt2": TIED, "opt": TIED, "gemma": TIED, "starcoder2": TIED,
    "mixtral": {"model.layers.0.mlp.gate": "MoE router"},
}
FP8_OPS = {torch.ops.fp8fx.linear.default, torch.ops.fp8fx.grouped_linear.default}
FP8_PACKETS = {torch.ops.fp8fx.linear, torch.ops.fp8fx.grouped_linear}
# Attention-path nodes quantized per model (SDPA models; GPT-J and Bloom run matmul/softmax;
# Bloom's Q·Kᵀ is a baddbmm). Mixtral's router softmax is not attention and stays high precision.
SDPA_KV = {"sdpa": 1, "kv_cache": 2}
EXPECTED_ATTENTION = {
    **{a: SDPA_KV for a in ("llama", "mistral", "qwen2", "phi3", "falcon", "mixtral", "gpt2", "opt", "gemma",
                            "starcoder2")},
    "gptj": {"matmul": 2, "softmax": 1, "kv_cache": 2}, "bloom": {"matmul": 2, "softmax": 1, "kv_cache": 2},
    "bert": {"sdpa": 1},
}
ATTENTION_OPS = {torch.ops.fp8fx.sdpa.default, torch.ops.fp8fx.matmul.default, torch.ops.fp8fx.qdq.default}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """arch -> (prepared and calibrated model, its MEASURE config); files written once per arch."""
    cache: dict[str, tuple[torch.nn.Module, fp8fx.FP8Config]] = {}

    def get(arch: str):
        if arch not in cache:
            model = build(arch)
            cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path_factory.mktemp(arch) / "m"))
            fp8fx.prepare(model, cfg)
            with torch.no_grad():
                for ids in calibration_batches():
                    model(input_ids=ids)
            fp8fx.finalize_calibration(model)
            cache[arch] = (model, cfg)
        return cache[arch]

    return get


def _linear_decisions(rows) -> dict[str, object]:
    return {d.match.name: d for d in rows if d.match.kind.value == "linear"}


def _output_sqnr(model, reference, kind: str) -> float:
    """SQNR of the model's output against the fp32 reference on held-out tokens. A decoder LM
    generates three greedy tokens from them (prefill and decode graphs) and the prefill's logits
    are compared; an encoder runs forward."""
    ids = eval_ids()
    with torch.no_grad():
        if kind != "causal_lm":
            return sqnr_db(main_output(reference(input_ids=ids)), main_output(model(input_ids=ids)))
        kw = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
        got, expected = model.generate(ids, **kw), reference.generate(ids, **kw)
    assert got.sequences.shape == (ids.shape[0], ids.shape[1] + 3)
    assert torch.equal(got.sequences[:, : ids.shape[1]], ids) and int(got.sequences.max()) < VOCAB
    return sqnr_db(expected.logits[0], got.logits[0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eager_convert(arch, calibrated):
    model, _ = calibrated(arch)
    reference = build(arch)
    fp8fx.convert(model)

    linears = _linear_decisions(fp8fx.explain(model).rows)
    high = {n: d.reason for n, d in linears.items() if not d.quantize}
    expected_high = EXPECTED_HIGH_PRECISION.get(arch, {})
    assert set(high) == set(expected_high), high
    for name, word in expected_high.items():
        assert word in high[name], high[name]
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": EXPECTED_LINEARS[arch], **EXPECTED_ATTENTION[arch]}
    skipped = {d.match.name: d.reason for d in fp8fx.explain(model).rows
               if d.match.kind.value != "linear" and not d.quantize}
    assert all("outside an attention pattern" in r and arch == "mixtral" for r in skipped.values()), skipped
    text = str(fp8fx.explain(model))
    assert all(name in text for name in linears)

    for name, d in linears.items():  # every quantized Linear now holds an FP8 weight
        if not d.quantize:
            continue
        if d.match.experts:
            path, _, leaf = d.match.weight.rpartition(".")
            owner = model.get_submodule(path)
            assert isinstance(owner, Fp8Experts) and getattr(owner, leaf).dtype == torch.float8_e4m3fn
            assert getattr(owner, f"{leaf}_weight_scale").shape == (d.match.experts,)
        else:
            assert isinstance(model.get_submodule(name), Fp8Linear), name

    assert _output_sqnr(model, reference, ARCHS[arch][1]) >= MIN_SQNR_DB


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compiled(arch, calibrated):
    """``torch.compile(backend="fp8fx")`` with the calibration files: every graph dynamo hands the
    backend (forward; generate's prefill and decode) holds one FP8 op per quantized Linear."""
    _, cfg = calibrated(arch)
    options = {"config": cfg.replace(mode="QUANTIZE"), "inductor": False}
    backend = torch._dynamo.lookup_backend("fp8fx")  # what backend="fp8fx" resolves to
    graphs = []

    def keep_graph(gm, example_inputs):  # the fp8fx backend; keeps the graph it rewrote
        compiled = backend(gm, example_inputs, options)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    reference, model = build(arch), build(arch)
    model.forward = torch.compile(model.forward, backend=keep_graph, dynamic=True)
    assert _output_sqnr(model, reference, ARCHS[arch][1]) >= MIN_SQNR_DB
    assert len(graphs) == (2 if ARCHS[arch][1] == "causal_lm" else 1)  # prefill and decode
    assert backend is fp8fx_backend
    names = ModuleNames(model)
    for gm in graphs:
        # the first graph has its Linears rewritten; the backend then swaps the FP8 modules into
        # the model, and later graphs (decode) call their fp8fx ops directly
        fp8 = [n for n in gm.graph.nodes if n.target in FP8_OPS or n.target in FP8_PACKETS]
        rewritten = sorted(n.meta["fp8fx"]["name"] for n in fp8 if "fp8fx" in n.meta)
        assert len(fp8) == EXPECTED_LINEARS[arch] and len(rewritten) == len(set(rewritten))
        owners = {names.owner(n)[0] for n in fp8} | set(rewritten)
        assert not owners & set(EXPECTED_HIGH_PRECISION.get(arch, {}))
        # one fp8fx op per attention node (a softmax or a KV-cache write gets an FP8 round trip)
        assert sum(n.target in ATTENTION_OPS for n in gm.graph.nodes) == sum(EXPECTED_ATTENTION[arch].values())


# ------------------------------------------------------------- the gaps this matrix closed
def test_conv1d_per_channel_is_measured_and_cast_per_output_channel(tmp_path):
    """GPT-2's Conv1D stores its weight [in, out]: per-channel statistics and scales follow the
    output channels, in the measurement file, in convert and in the compile backend."""
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"), observer="maxabs_per_channel",
                          scale_method="act_maxabs_pow2_weights_pcs_maxabs_pow2")
    model, reference = build("gpt2"), build("gpt2")
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for ids in calibration_batches():
            model(input_ids=ids)
    fp8fx.finalize_calibration(model)
    c_fc = reference.transformer.h[0].mlp.c_fc  # Conv1D(nf=128, nx=32): weight [32, 128]
    stats = read_measurements(tmp_path / "m", observer="maxabs_per_channel").nodes["transformer.h.0.mlp.c_fc"].params["weight"]
    assert stats.shape == (128, 1)
    torch.testing.assert_close(torch.as_tensor(stats).float().reshape(-1), c_fc.weight.abs().amax(dim=0))

    fp8fx.convert(model)
    q = model.transformer.h[0].mlp.c_fc
    assert isinstance(q, Fp8Linear) and (q.out_features, q.in_features) == (128, 32)
    assert q.weight_scale.shape == (128,)
    assert sqnr_db(c_fc.weight.t(), q.weight.float() * q.weight_scale[:, None]) > 25

    torch._dynamo.reset()
    compiled = build("gpt2")
    cm = torch.compile(compiled, backend="fp8fx", options={"config": cfg.replace(mode="QUANTIZE"), "inductor": False})
    ids = eval_ids()
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_grouped_linear_equals_per_expert_fp8_linear():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    offsets = torch.tensor([2, 2, 6])  # expert 1 gets no rows; row 6 belongs to no expert
    w_scale, x_scale = w.abs().amax(dim=(1, 2)) / 448, x.abs().amax() / 448
    w8 = (w / w_scale[:, None, None]).to(torch.float8_e4m3fn)
    y = torch.ops.fp8fx.grouped_linear(x, w8, w_scale, x_scale, offsets, 448.0)
    rows = [(0, 0, 2), (2, 2, 6)]
    for e, lo, hi in rows:
        expect = torch.ops.fp8fx.linear(x[lo:hi], w8[e], w_scale[e], x_scale, None, 448.0)
        torch.testing.assert_close(y[lo:hi], expect)
    assert torch.equal(y[6], torch.zeros(8))
    hp = torch.ops.fp8fx.grouped_linear(x, w, None, None, offsets, 448.0)
    torch.testing.assert_close(hp[2:6], x[2:6] @ w[2].t())
    with pytest.raises(fp8fx.Fp8fxError, match="needs both scales"):
        torch.ops.fp8fx.grouped_linear(x, w8, None, None, offsets, 448.0)


def test_mixtral_experts_blocklisted_projection_stays_high_precision(calibrated):
    """A QUANTIZE config that blocklists one expert stack (converting a fresh model from the
    files): that stack keeps its fp32 parameter inside the Fp8Experts, the other is FP8."""
    _, cfg = calibrated("mixtral")
    model, reference = build("mixtral"), build("mixtral")
    ids = eval_ids()
    fp8fx.convert(model, cfg.replace(mode="QUANTIZE", blocklist={"names": [r"down_proj$"]}),
                  example_kwargs={"input_ids": ids})
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Fp8Experts)
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.down_proj.dtype == torch.float32
    assert torch.equal(experts.down_proj, reference.model.layers[0].mlp.experts.down_proj)
    with torch.no_grad():
        assert sqnr_db(reference(input_ids=ids).logits, model(input_ids=ids).logits) >= MIN_SQNR_DB


def test_experts_with_another_layout_are_reported_not_quantized():
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.is_concatenated = False  # gate and up interleaved: Fp8Experts' chunk(2) would be wrong
    rows = _linear_decisions(fp8fx.explain(model, fp8fx.FP8Config(mode="MEASURE"),
                                           example_kwargs={"input_ids": eval_ids()}).rows)
    reason = rows["model.layers.0.mlp.experts.gate_up_proj"].reason
    assert not rows["model.layers.0.mlp.experts.gate_up_proj"].quantize
    assert "is_concatenated=False" in reason and "MixtralExperts" in reason


def test_fp8_experts_routing_equals_transformers_experts():
    """With both stacks left in high precision, Fp8Experts is transformers' experts forward."""
    experts = build("mixtral").model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 32, generator=g)
    top_k_index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    top_k_weights = torch.rand(6, 2, generator=g).softmax(-1)
    ours = Fp8Experts(experts, {}, 448.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden, top_k_index, top_k_weights), experts(hidden, top_k_index, top_k_weights))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_with_grad_enabled_equals_no_grad(arch, calibrated):
    """Outside torch.no_grad the fp8fx ops run under autograd's wrapper; their outputs must not be
    views that in-place updates refuse (Falcon adds to its Linear outputs in place)."""
    _, cfg = calibrated(arch)
    ids = eval_ids()
    for model in (fp8fx.convert(build(arch), cfg.replace(mode="QUANTIZE"), example_inputs=(ids,)),
                  fp8fx.quantize(build(arch), "FP8_DYNAMIC", example_inputs=(ids,))):
        with torch.no_grad():
            expected = main_output(model(input_ids=ids))
        got = main_output(model(input_ids=ids))
        assert torch.equal(got.detach(), expected), arch

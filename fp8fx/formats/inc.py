"""Intel Neural Compressor (INC) FP8 measurement and scale files.

INC's MEASURE mode (``prepare`` + calibration + ``finalize_calibration``) writes, for
``dump_stats_path = "<dir>/<base>"`` and observer ``maxabs``::

    <dir>/<base>_hooks_maxabs{worker}.npz            the measurements, read back by INC
    <dir>/<base>_hooks_maxabs{worker}.json           the same values, for people and scripts
    <dir>/<base>_hooks_maxabs{worker}_mod_list.json  the names of the patched modules

``worker`` is ``""`` on one device and ``"_{rank}_{world_size}"`` when ``LOCAL_RANK`` /
``WORLD_SIZE`` (or ``torch.distributed``) are set. QUANTIZE mode caches the scales it derives in
``<base>_hooks_maxabs_{SCALE_METHOD}{worker}.npz/.json`` (e.g. ``..._MAXABS_HW_0_8.npz``) and
reads that cache instead of the measurements when it exists.

Both files hold one document::

    {"NumSamples": 64,                       # only when INC counted calibration samples
     "GlobalRank": null, "LocalRank": null,  # LocalRank is the rank of the worker suffix
     "Mode": "DynamicRange",                 # "Scale" for scale files, "Shape" for shapes
     "Nodes": {"model.layers.0.self_attn.q_proj":
                   {"inputs": [[[4.71875]]], "params": {"weight": [[0.0917]]}}}}

In a measurement file every observed tensor is a 2-D array: ``[[m]]`` (shape (1, 1)) per
tensor, ``[[c0], [c1], ...]`` (shape (C, 1)) per channel (observer ``maxabs_per_channel``; the
weight's channels are its output channels). ``outputs`` appears only when outputs were measured;
a Matmul has two ``inputs``; ``params`` is left out when a module has no parameters. The
``.json`` stores nested lists, the ``.npz`` stores the same dict, pickled as a 0-d object array
under the key ``arr_0`` (``np.savez(fname, d)``), float32 numpy arrays as leaves. Scale files
store per-tensor scales as scalars (``"inputs": [0.0625]``, ``"params": {"weight": 0.00048}``)
and per-channel weight scales as ``{"weight": {"0": [out-channel scales], "1": [in-channel
scales]}}`` (integer keys in the ``.npz``). INC's loader accepts only the keys ``inputs``,
``outputs``, ``params`` (and the legacy ``input``/``output``) in a node entry. INC's QUANTIZE
mode takes activation scales from the file but recomputes weight scales from the module's own
weights, so ``params.weight`` is a record of the weight, not an input to INC.

Choices made here:

* Reading: INC's QUANTIZE mode loads only the ``.npz``. :func:`read_measurements` mirrors that
  and reads the ``.npz`` when it exists, else the ``.json`` (for example when only the JSON was
  copied, or edited by a merge script). Naming a ``.json``/``.npz`` file reads that file alone.
* A measurement set is written and read as a set. :func:`write_measurements` stamps the
  ``.json`` and the ``.npz`` of one write with the same top-level ``"WriteId"``:
  ``"<uuid4 hex>-<digest>"``, the digest being the first 16 hex digits of the SHA-256 of the
  document without its ``WriteId`` (canonical JSON: sorted keys, float32 values as lists).
  INC's loader looks only at ``Nodes``, so it still reads these files. The ``_mod_list.json``
  stays a plain list of names (INC's layout; a list has no room for a key); it is tied to the
  set by its content instead: its names must be the ``Nodes`` of the set.
  When :func:`read_measurements` is given a prefix and finds both files, it compares them:

  - neither has a ``WriteId`` (written by INC, by a script, or by fp8fx before write ids):
    read exactly as before: the ``.npz``, the ``.json`` and the module list are not compared;
  - both have the same ``WriteId``: each file's content must still match the digest (a
    ``.json`` edited after the write would otherwise be ignored silently for the ``.npz``),
    and the module list, when present, must name the same modules;
  - different ids, or only one of the pair has an id: the files come from different writes
    (a crash between two renames, or one file rewritten by INC or a script), and no rule can
    tell which is right: :class:`MeasurementError` naming both files and what to do.

  A stamped file whose partner is absent is read as it is (its module list is still checked):
  the digest only compares a pair, so a lone ``.json`` edited by a merge script is accepted.
  Comparing costs one more parse (the ``.json``) and two hashes per read of a stamped set.
* The ``.npz`` is a pickle. It is read with an unpickler that resolves only numpy's array
  reconstruction globals, so a hostile file cannot run code; anything else is refused.
* Every value is checked (structure, finiteness, sign) and every error names the file, the node
  and the key, and says what to do. INC itself fails late (or silently: its writer swallows
  write errors), so these checks are the user's first line of defence.
* Writes are atomic (:func:`fp8fx.fileio.atomic_paths`): all files of one call are written to
  temporary files before any is renamed, and an interrupted renaming is rolled back, so an
  interrupted run keeps the previous set; a write that fails raises :class:`MeasurementError`
  naming the file. Scale files are written the same way but carry no write id: they are a
  cache that INC and :func:`read_scales` read one file at a time.
* Only maxabs layouts are accepted: every measured value is 2-D with one column ((1, 1) or
  (C, 1)), as all of INC's DynamicRange observers write; anything else is refused.
* Every error raised here is an :class:`~fp8fx.errors.Fp8fxError` (``MeasurementError``, or
  ``ConfigError`` for bad arguments) naming the file, node and key; decoding errors of json,
  zip and pickle are wrapped, never leaked.
* Multi-card measurements are merged by :func:`merge_measurements` (elementwise max), which INC
  leaves to external scripts.
* Observers that write a clipped value (``percentile``, ``mse``: docs/observers.md) put it in
  ``Nodes`` where INC reads the maxabs, and keep the true maxabs under the top-level key
  ``"MaxAbs"`` (same layout; :attr:`Measurements.maxabs`); the parameters they used, and the
  ``kv_cache_strategy`` of per-head measurements ((H, 1) arrays), go under ``"ObserverParams"``
  (:attr:`Measurements.observer_params`). INC's loader looks only at ``Nodes``; both keys are
  covered by the write id's digest, checked on read (a clipped value above its maxabs is
  refused) and merged (max of both; parts with different parameters are refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import uuid
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..fileio import atomic_paths

__all__ = [
    "NodeMeasurement", "Measurements", "measurement_file_paths", "mod_list_path",
    "write_measurements", "read_measurements", "merge_measurements", "write_scales",
    "read_scales", "MEASURE_MODE", "SCALE_MODE", "WRITE_ID_KEY", "MAXABS_KEY", "PARAMS_KEY",
]

MEASURE_MODE = "DynamicRange"
SCALE_MODE = "Scale"
SHAPE_MODE = "Shape"
_NODE_KEYS = ("inputs", "outputs", "params")
_LEGACY_KEYS = {"input": "inputs", "output": "outputs"}
_WORKER_RE = re.compile(r"_(\d+)_(\d+)$")
WRITE_ID_KEY = "WriteId"
MAXABS_KEY = "MaxAbs"
PARAMS_KEY = "ObserverParams"
_WRITE_ID_RE = re.compile(r"[0-9a-f]{32}-[0-9a-f]{16}")
_RERUN = ("re-run calibration (fp8fx.prepare in MEASURE mode, the calibration batches, then "
          "fp8fx.finalize_calibration) to write a fresh set")


# --------------------------------------------------------------------------------------------
# In-memory model
# --------------------------------------------------------------------------------------------
def _float_array(value: Any, where: str) -> np.ndarray:
    """A finite float32 array from a number / nested list / array (or a torch tensor)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes, dict)):
        raise MeasurementError(f"{where}: expected a number or a nested list of numbers, got "
                               f"{type(value).__name__} {str(value)[:60]!r}; fix or regenerate the file.")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise MeasurementError(f"{where}: expected a number or a nested list of numbers, got "
                               f"{str(value)[:60]!r} ({e}); fix or regenerate the file.") from None
    if arr.size == 0:
        raise MeasurementError(f"{where}: the value is empty; regenerate the file "
                               "(calibrate with at least one batch that reaches this module).")
    with np.errstate(over="ignore"):
        arr32 = arr.astype(np.float32)
    if not np.all(np.isfinite(arr32)):
        bad = arr.reshape(-1)[~np.isfinite(arr32.reshape(-1))][0]
        raise MeasurementError(
            f"{where}: non-finite value {bad} (NaN/Inf, or beyond float32). The calibration saw "
            "NaN/Inf activations or the file is corrupt: check the model and calibration data "
            "in high precision, then measure again.")
    return arr32


@dataclass
class NodeMeasurement:
    """Measured max-abs values of one module, in INC's layout (float32 arrays).

    Per tensor each array has shape (1, 1); per channel (C, 1). ``inputs`` entries may be
    ``None`` for an input that was not measured.
    """

    inputs: list[np.ndarray | None]
    outputs: list[np.ndarray] | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = [None if x is None else _float_array(x, f"inputs[{i}]")
                       for i, x in enumerate(self.inputs)]
        if self.outputs is not None:
            self.outputs = [_float_array(x, f"outputs[{i}]") for i, x in enumerate(self.outputs)]
        self.params = {str(k): _float_array(v, f"params[{k!r}]") for k, v in self.params.items()}

    def input_maxabs(self, i: int = 0) -> float:
        """Max-abs of input ``i`` over all its channels."""
        if not 0 <= i < len(self.inputs) or self.inputs[i] is None:
            raise MeasurementError(f"input {i} was not measured (this node has "
                                   f"{len(self.inputs)} input entries); measure it again.")
        return float(np.max(self.inputs[i]))

    def output_maxabs(self, i: int = 0) -> float:
        """Max-abs of output ``i``; INC measures outputs only with measure_exclude NONE."""
        if not self.outputs or not 0 <= i < len(self.outputs):
            raise MeasurementError(f"output {i} was not measured; calibrate with "
                                   "measure_exclude='NONE' to record outputs.")
        return float(np.max(self.outputs[i]))

    def weight_maxabs(self) -> np.ndarray:
        """1-D weight max-abs: length 1 (per tensor) or C (per output channel)."""
        if "weight" not in self.params:
            raise MeasurementError("no 'weight' measurement in params "
                                   f"(keys: {sorted(self.params)}); this module has no weight.")
        return self.params["weight"].reshape(-1).copy()


@dataclass
class Measurements:
    """Everything one INC measurement file holds. ``source`` is the file it was read from."""

    nodes: dict[str, NodeMeasurement]
    observer: str = "maxabs"
    global_rank: int | None = None
    local_rank: int | None = None
    source: str | None = None
    num_samples: int | None = None
    #: observers that write a clipped value in ``nodes`` (percentile, mse) keep the true maxabs
    #: here, same layout, top-level key ``"MaxAbs"`` (INC reads only ``Nodes``); None otherwise
    maxabs: dict[str, NodeMeasurement] | None = None
    #: how the values were made (observer parameters, ``kv_cache_strategy``), top-level key
    #: ``"ObserverParams"``; None (INC's files, plain maxabs): maxabs per tensor
    observer_params: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------
def _worker_suffix(rank: int | None, world_size: int | None) -> str:
    if rank is None and world_size is None:
        return ""
    if rank is None or world_size is None:
        raise ConfigError(f"rank={rank!r}, world_size={world_size!r}: INC's per-rank file names "
                          "need both (suffix _{rank}_{world_size}); pass both or neither.")
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ConfigError(f"rank={rank!r}, world_size={world_size!r}: need integers with "
                          "0 <= rank < world_size.")
    return f"_{rank}_{world_size}"


def measurement_file_paths(prefix: str | os.PathLike[str], observer: str = "maxabs",
                           rank: int | None = None, world_size: int | None = None,
                           scale_method: str | None = None) -> tuple[Path, Path]:
    """``(json, npz)`` paths INC uses for ``dump_stats_path=prefix``.

    With ``scale_method`` (e.g. ``"maxabs_hw"``) the names of INC's cached scale files,
    ``{prefix}_hooks_{observer}_{METHOD}{worker}``.
    """
    base = f"{os.fspath(prefix)}_hooks_{observer}"
    if scale_method is not None:
        base += f"_{str(scale_method).upper()}"
    base += _worker_suffix(rank, world_size)
    return Path(base + ".json"), Path(base + ".npz")


def mod_list_path(prefix: str | os.PathLike[str], observer: str = "maxabs",
                  rank: int | None = None, world_size: int | None = None) -> Path:
    """Path of INC's ``..._mod_list.json`` (written next to the measurements, never read)."""
    json_path, _ = measurement_file_paths(prefix, observer, rank, world_size)
    return json_path.with_name(json_path.stem + "_mod_list.json")


def _existing_with_prefix(prefix: Path, rank_given: bool = False) -> str:
    directory = prefix.parent if str(prefix.parent) else Path(".")
    if prefix.is_dir():
        directory, base = prefix, ""
    else:
        base = prefix.name
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                       if p.name.startswith(base) and not p.name.startswith("."))
    except OSError:
        return f"directory {directory} does not exist or cannot be listed"
    if not base:
        return (f"'{prefix}' is a directory, but dump_stats_path is a directory plus a file "
                f"name prefix (e.g. '{prefix}/measure'); it holds: {', '.join(names[:12]) or 'nothing'}.")
    if not names:
        return f"no file in {directory} starts with '{base}'"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    hint = ""
    if any(_WORKER_RE.search(Path(n).stem.replace("_mod_list", "")) for n in names):
        hint = (" Other ranks' files exist but not this rank's: every rank writes its own files "
                "at finalize_calibration, so re-run calibration on every rank (same world size)."
                if rank_given else
                " Some are per-rank files (suffix _{rank}_{world_size}): pass rank= and "
                "world_size=, or read each and combine them with merge_measurements().")
    return f"files in {directory} starting with '{base}': {shown}.{hint}"


# --------------------------------------------------------------------------------------------
# Raw documents (.json / .npz)
# --------------------------------------------------------------------------------------------
_NUMPY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy's array-reconstruction globals only; refuses anything else."""

    def __init__(self, fp: Any, source: Path) -> None:
        super().__init__(fp)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS or (module.startswith("numpy.dtypes")
                                                and name.endswith("DType")):
            return super().find_class(module, name)
        raise MeasurementError(
            f"{self._source}: refusing to unpickle '{module}.{name}'. INC measurement and scale "
            ".npz files hold only numpy arrays, so this file was not written by INC or fp8fx; "
            "regenerate it, or read the .json next to it.")


def _load_npz(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                raise MeasurementError(
                    f"{path}: the .npz has no 'arr_0' entry (entries: {zf.namelist()[:5]}); INC "
                    "writes its dict as arr_0. Regenerate the file, or read the .json instead.")
            with zf.open("arr_0.npy") as fp:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    _, _, dtype = np.lib.format.read_array_header_1_0(fp)
                elif version == (2, 0):
                    _, _, dtype = np.lib.format.read_array_header_2_0(fp)
                else:
                    raise MeasurementError(
                        f"{path}: arr_0 uses .npy format version {version}, which INC never "
                        "writes; regenerate the file with INC or fp8fx.")
                if not dtype.hasobject:
                    raise MeasurementError(
                        f"{path}: arr_0 is a plain {dtype} array, not INC's pickled dict; "
                        "regenerate the file with INC or fp8fx.")
                obj = _NumpyOnlyUnpickler(fp, path).load()
    except MeasurementError:
        raise
    except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, pickle.UnpicklingError,
            ValueError, OSError, KeyError, TypeError, AttributeError, IndexError,
            NotImplementedError, RecursionError) as e:
        raise MeasurementError(
            f"{path}: not a readable INC .npz file (truncated or corrupt: {type(e).__name__}: "
            f"{e}). Re-run calibration, or read the .json next to it.") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype.hasobject:
        obj = obj[()]
    return obj


def _save_npz(path: Path, doc: dict[str, Any]) -> None:
    arr = np.empty((), dtype=object)
    arr[()] = doc
    with open(path, "wb") as f:
        np.savez(f, arr)


def _load_doc(path: Path, expected_mode: str) -> dict[str, Any]:
    if not path.is_file():
        base = path.name.split("_hooks_")[0] if "_hooks_" in path.name else path.stem
        raise MeasurementError(f"{path}: file not found; "
                               f"{_existing_with_prefix(path.with_name(base))}")
    if path.suffix == ".npz":
        doc = _load_npz(path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as e:
            raise MeasurementError(f"{path}: cannot be read ({e}); check its permissions, "
                                   "or re-run calibration.") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ...
            raise MeasurementError(
                f"{path}: not valid JSON (truncated or corrupt: {type(e).__name__}: {e}). "
                "Re-run calibration, restore the file, or read the .npz next to it.") from None
    if isinstance(doc, list) and path.name.endswith("_mod_list.json"):
        raise MeasurementError(f"{path}: this is INC's module list, not {expected_mode} data; "
                               "pass the file without the _mod_list suffix.")
    if not isinstance(doc, dict):
        raise MeasurementError(f"{path}: expected an object with 'Mode' and 'Nodes' (INC's "
                               f"layout), got {type(doc).__name__}; is this an INC file?")
    if "Nodes" not in doc:
        raise MeasurementError(f"{path}: expected an object with 'Mode' and 'Nodes' (INC's "
                               f"layout), but it has no 'Nodes' key (keys: "
                               f"{sorted(map(str, doc))[:8]}); is this an INC file? Regenerate it.")
    mode = doc.get("Mode")
    if mode != expected_mode:
        what = {MEASURE_MODE: "measurements (MEASURE mode)", SCALE_MODE: "scales (QUANTIZE "
                "mode cache; read it with read_scales)", SHAPE_MODE: "tensor shapes (observer "
                "'shape')"}.get(mode, "unknown data")
        want = "read_measurements" if expected_mode == MEASURE_MODE else "read_scales"
        raise MeasurementError(f"{path}: 'Mode' is {mode!r} ({what}), but {want} needs "
                               f"'Mode': {expected_mode!r}; pass the right file.")
    if not isinstance(doc["Nodes"], dict):
        raise MeasurementError(f"{path}: 'Nodes' must map module names to entries, got "
                               f"{type(doc['Nodes']).__name__}; regenerate the file.")
    for key in ("GlobalRank", "LocalRank", "NumSamples"):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise MeasurementError(f"{path}: '{key}' must be an integer or null, got {v!r}.")
    return doc


def _node_dict(name: str, entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise MeasurementError(f"{where}: node '{name}' must be an object with keys "
                               f"{list(_NODE_KEYS)}, got {type(entry).__name__}.")
    entry = {_LEGACY_KEYS.get(k, k): v for k, v in entry.items()}
    unknown = sorted(set(entry) - set(_NODE_KEYS), key=str)
    if unknown:
        raise MeasurementError(f"{where}: node '{name}' has unknown key {unknown[0]!r}; INC "
                               f"accepts only {list(_NODE_KEYS)}. Remove it.")
    if "inputs" not in entry:
        raise MeasurementError(f"{where}: node '{name}' has no 'inputs' key; regenerate the file.")
    for key in ("inputs", "outputs"):
        v = entry.get(key)
        if isinstance(v, np.ndarray):  # INC also accepts a bare array for one tensor
            entry[key] = [v]
        elif v is not None and not isinstance(v, (list, tuple)):
            raise MeasurementError(f"{where}: node '{name}' key '{key}' must be a list "
                                   f"(one entry per tensor), got {type(v).__name__}.")
    if entry.get("params") is not None and not isinstance(entry["params"], dict):
        raise MeasurementError(f"{where}: node '{name}' key 'params' must map parameter names "
                               f"to values, got {type(entry['params']).__name__}.")
    return entry


def _measured(value: Any, where: str) -> np.ndarray:
    arr = _float_array(value, where)
    if arr.ndim != 2 or arr.shape[1] != 1:
        raise MeasurementError(
            f"{where}: shape {arr.shape}, but a measured max-abs is 2-D with one column: [[m]] "
            "per tensor, [[c0], [c1], ...] per channel (a scale file stores bare numbers: pass "
            "it to read_scales). Fix the nesting or measure again.")
    if np.any(arr < 0):
        raise MeasurementError(f"{where}: negative max-abs value {arr.min()}; max-abs is never "
                               "negative, so the file is corrupt. Measure again.")
    return arr


def _parse_node(name: str, entry: Any, path: Path) -> NodeMeasurement:
    entry = _node_dict(name, entry, str(path))
    at = f"{path}: node '{name}' key"
    inputs = [None if x is None else _measured(x, f"{at} 'inputs[{i}]'")
              for i, x in enumerate(entry["inputs"])]
    outputs = entry.get("outputs")
    if outputs is not None:
        outputs = [_measured(x, f"{at} 'outputs[{i}]'") for i, x in enumerate(outputs)]
    params = {}
    for k, v in (entry.get("params") or {}).items():
        if v is None:
            raise MeasurementError(f"{at} 'params.{k}': null value; measure again.")
        params[str(k)] = _measured(v, f"{at} 'params.{k}'")
    return NodeMeasurement(inputs=inputs, outputs=outputs, params=params)


def _observer_from_name(path: Path, default: str) -> str:
    stem = path.stem
    if "_hooks_" not in stem:
        return default
    tail = _WORKER_RE.sub("", stem.rsplit("_hooks_", 1)[1])
    return tail or default


# --------------------------------------------------------------------------------------------
# Measurements: write / read / merge
# --------------------------------------------------------------------------------------------
def _opt_int(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise MeasurementError(f"measurements to write: '{key}' must be an integer or None, got "
                               f"{value!r}; fix the Measurements object.")
    return int(value)


def _header(mode: str, global_rank: int | None, local_rank: int | None,
            num_samples: int | None) -> dict[str, Any]:
    num_samples = _opt_int(num_samples, "NumSamples")
    head: dict[str, Any] = {"NumSamples": num_samples} if num_samples else {}
    head.update({"GlobalRank": _opt_int(global_rank, "GlobalRank"),
                 "LocalRank": _opt_int(local_rank, "LocalRank"), "Mode": mode})
    return head


def _content_digest(doc: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the document without its write id (canonical JSON)."""
    body = _to_lists({k: v for k, v in doc.items() if k != WRITE_ID_KEY})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write_id(doc: Mapping[str, Any], path: Path) -> str | None:
    """The document's write id, None when it has none (INC's files); refuses a malformed one."""
    wid = doc.get(WRITE_ID_KEY)
    if wid is not None and not (isinstance(wid, str) and _WRITE_ID_RE.fullmatch(wid)):
        raise MeasurementError(f"{path}: malformed '{WRITE_ID_KEY}' {str(wid)[:60]!r} (fp8fx "
                               f"writes '<32 hex>-<16 hex>'); {_RERUN}.")
    return wid


def _write_files(files: Sequence[tuple[Path, Any]], what: str) -> None:
    """Write ``[(path, writer(tmp_path))]`` as one set (see :func:`fp8fx.fileio.atomic_paths`)."""
    paths = [p for p, _ in files]
    try:
        with atomic_paths(*paths) as tmps:
            for tmp, (_, write) in zip(tmps, files):
                write(tmp)
    except OSError as e:
        names = ", ".join(map(str, paths))
        raise MeasurementError(
            f"could not write the {what} {names} ({e}); the previous files, if any, are "
            "unchanged. Free disk space or fix the directory's permissions, then write again "
            "(fp8fx.finalize_calibration).") from e


def _params_to_write(params: Any) -> dict[str, Any]:
    if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and (isinstance(v, (str, int, float)) and not isinstance(v, bool))
            for k, v in params.items()):
        raise MeasurementError(f"measurements to write: 'observer_params' must map names to numbers or "
                               f"strings, got {params!r}; fix the Measurements object.")
    for k, v in params.items():
        if isinstance(v, float) and not np.isfinite(v):
            raise MeasurementError(f"measurements to write: 'observer_params.{k}' is {v}; give a finite number.")
    return dict(params)


def _same_layout(value: np.ndarray | None, amax: np.ndarray | None, where: str) -> None:
    """A clipped value and its maxabs: same shape, value never above the maxabs."""
    if (value is None) != (amax is None):
        raise MeasurementError(f"{where}: present in one of '{MAXABS_KEY}' and 'Nodes' only; regenerate the file.")
    if value is None:
        return
    if value.shape != amax.shape:
        raise MeasurementError(f"{where}: shape {amax.shape} in '{MAXABS_KEY}' but {value.shape} in 'Nodes'; "
                               "regenerate the file.")
    if np.any(value > amax * (1 + 1e-6)):
        raise MeasurementError(f"{where}: the value in 'Nodes' ({float(np.max(value))}) is above the maxabs in "
                               f"'{MAXABS_KEY}' ({float(np.max(amax))}); a clipped value never is: the file is "
                               "corrupt or edited, regenerate it.")


def _check_maxabs_nodes(maxabs: Mapping[str, NodeMeasurement], nodes: Mapping[str, NodeMeasurement],
                        where: str) -> None:
    for name, node in maxabs.items():
        if name not in nodes:
            raise MeasurementError(f"{where}: node '{name}' is in '{MAXABS_KEY}' but not in 'Nodes'; "
                                   "regenerate the file.")
        ref = nodes[name]
        at = f"{where}: node '{name}' key"
        if len(node.inputs) != len(ref.inputs) or (node.outputs is None) != (ref.outputs is None) or \
                len(node.outputs or []) != len(ref.outputs or []):
            raise MeasurementError(f"{at} '{MAXABS_KEY}': not the same inputs/outputs as in 'Nodes'; "
                                   "regenerate the file.")
        for i, (a, v) in enumerate(zip(node.inputs, ref.inputs)):
            _same_layout(v, a, f"{at} 'inputs[{i}]'")
        for i, (a, v) in enumerate(zip(node.outputs or [], ref.outputs or [])):
            _same_layout(v, a, f"{at} 'outputs[{i}]'")


def _extras_to_write(m: Measurements, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys besides INC's: ``ObserverParams`` and ``MaxAbs`` (when set)."""
    extra: dict[str, Any] = {}
    if m.observer_params is not None:
        extra[PARAMS_KEY] = _params_to_write(m.observer_params)
    if m.maxabs is not None:
        where = "measurements to write"
        _check_maxabs_nodes(m.maxabs, m.nodes, where)
        out = {}
        for name, node in m.maxabs.items():
            entry: dict[str, Any] = {"inputs": [None if x is None else _measured(x, f"{where}: node '{name}' key "
                                                                              f"'{MAXABS_KEY}.inputs[{i}]'")
                                                for i, x in enumerate(node.inputs)]}
            if node.outputs is not None:
                entry["outputs"] = [_measured(x, f"{where}: node '{name}' key '{MAXABS_KEY}.outputs[{i}]'")
                                    for i, x in enumerate(node.outputs)]
            out[str(name)] = entry
        extra[MAXABS_KEY] = out
    return extra


def _parse_extras(doc: Mapping[str, Any], nodes: Mapping[str, NodeMeasurement],
                  path: Path) -> tuple[dict[str, NodeMeasurement] | None, dict[str, Any] | None]:
    params = doc.get(PARAMS_KEY)
    if params is not None:
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
                for k, v in params.items()):
            raise MeasurementError(f"{path}: '{PARAMS_KEY}' must map parameter names to numbers or strings, "
                                   f"got {str(params)[:80]!r}; regenerate the file.")
        params = dict(params)
    raw = doc.get(MAXABS_KEY)
    if raw is None:
        return None, params
    if not isinstance(raw, dict):
        raise MeasurementError(f"{path}: '{MAXABS_KEY}' must map module names to entries, got "
                               f"{type(raw).__name__}; regenerate the file.")
    maxabs = {str(n): _parse_node(str(n), e, path) for n, e in raw.items()}
    _check_maxabs_nodes(maxabs, nodes, str(path))
    return maxabs, params


def _merge_maxabs(parts: Sequence[Measurements], label: list[str]) -> dict[str, NodeMeasurement] | None:
    have = [p.maxabs is not None for p in parts]
    if not any(have):
        return None
    if not all(have):
        raise MeasurementError(f"cannot merge: {label[have.index(False)]} has no '{MAXABS_KEY}' but "
                               f"{label[have.index(True)]} has; merge files measured with one observer.")
    out: dict[str, NodeMeasurement] = {}
    for name, node in parts[0].maxabs.items():
        ins, outs = list(node.inputs), None if node.outputs is None else list(node.outputs)
        for i, p in enumerate(parts[1:], 1):
            other = p.maxabs.get(name)
            where = f"node '{name}' ({label[0]} vs {label[i]}) key '{MAXABS_KEY}'"
            if other is None or len(other.inputs) != len(ins):
                raise MeasurementError(f"{where}: missing or with a different number of inputs.")
            ins = [_merge_arrays(a, b, f"{where}.inputs[{j}]") for j, (a, b) in enumerate(zip(ins, other.inputs))]
            if outs is not None:
                outs = [_merge_arrays(a, b, f"{where}.outputs[{j}]")
                        for j, (a, b) in enumerate(zip(outs, other.outputs or []))]
        out[name] = NodeMeasurement(inputs=ins, outputs=outs)
    return out


def write_measurements(m: Measurements, prefix: str | os.PathLike[str], *,
                       rank: int | None = None, world_size: int | None = None) -> list[Path]:
    """Write ``m`` as INC does: ``.json``, ``.npz`` and ``_mod_list.json``, as one set.

    The ``.json`` and ``.npz`` carry the same ``"WriteId"`` (see the module docstring); nothing
    is replaced until all three files are written. ``rank``/``world_size`` add INC's worker
    suffix; ``LocalRank`` is then ``rank``. Returns the three paths (json, npz, mod_list).
    """
    json_path, npz_path = measurement_file_paths(prefix, m.observer, rank, world_size)
    list_path = mod_list_path(prefix, m.observer, rank, world_size)
    arrays: dict[str, Any] = {}
    for name, node in m.nodes.items():
        where = f"measurements to write: node '{name}' key"
        if not isinstance(node, NodeMeasurement):
            raise MeasurementError(f"measurements to write: node '{name}' is a "
                                   f"{type(node).__name__}, not a NodeMeasurement.")
        ins = [None if x is None else _measured(x, f"{where} 'inputs[{i}]'")
               for i, x in enumerate(node.inputs)]
        a: dict[str, Any] = {"inputs": ins}
        if node.outputs is not None:
            a["outputs"] = [_measured(x, f"{where} 'outputs[{i}]'")
                            for i, x in enumerate(node.outputs)]
        if node.params:
            a["params"] = {k: _measured(v, f"{where} 'params.{k}'") for k, v in node.params.items()}
        arrays[str(name)] = a
    extra = _extras_to_write(m, arrays)
    local_rank = rank if rank is not None else m.local_rank
    head = _header(MEASURE_MODE, m.global_rank, local_rank, m.num_samples)
    head[WRITE_ID_KEY] = f"{uuid.uuid4().hex}-{_content_digest({**head, 'Nodes': arrays, **extra})}"
    json_text = json.dumps({**head, "Nodes": _to_lists(arrays), **_to_lists(extra)}, indent=4, allow_nan=False)
    list_text = json.dumps(list(arrays), indent=4)
    _write_files([(npz_path, lambda t: _save_npz(t, {**head, "Nodes": arrays, **extra})),
                  (json_path, lambda t: t.write_text(json_text, encoding="utf-8")),
                  (list_path, lambda t: t.write_text(list_text, encoding="utf-8"))],
                 "measurement files")
    return [json_path, npz_path, list_path]


def _to_lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _to_lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_lists(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    return x


def _check_pair(doc: dict[str, Any], npz_path: Path, json_path: Path) -> None:
    """Refuse a ``.npz`` and a ``.json`` beside it that do not come from one fp8fx write."""
    npz_id = _write_id(doc, npz_path)
    if not json_path.is_file():
        return
    try:
        other = _load_doc(json_path, MEASURE_MODE)
    except MeasurementError:
        if npz_id is None:
            return  # INC's files: the .json is not consulted, as INC does
        raise
    json_id = _write_id(other, json_path)
    if npz_id is None and json_id is None:
        return
    if npz_id != json_id:
        def show(wid: str | None) -> str:
            return wid or "none (not written by this fp8fx: INC, a script or an older fp8fx)"
        raise MeasurementError(
            f"{json_path} and {npz_path} come from different writes ({WRITE_ID_KEY} "
            f"{show(json_id)} vs {show(npz_id)}): a write of this measurement set was "
            "interrupted between two renames, or one file was rewritten by another tool, so "
            f"neither can be trusted. To fix: {_RERUN}; or, if you know which file is right, "
            "delete the other one.")
    digest = npz_id.rsplit("-", 1)[1]
    for path, d in ((json_path, other), (npz_path, doc)):
        if _content_digest(d) != digest:
            raise MeasurementError(
                f"{path}: its content no longer matches its {WRITE_ID_KEY} {npz_id} (it was "
                f"changed after fp8fx wrote it, e.g. edited by hand or by a script), so "
                f"{json_path.name} and {npz_path.name} disagree. To keep the edited file, read it "
                "alone (read_measurements(path)) and write the set again with "
                f"write_measurements; otherwise {_RERUN}.")


def _check_mod_list(list_path: Path, nodes: Mapping[str, Any], source: Path) -> None:
    """The module list of a stamped set must name exactly the measured nodes."""
    if not list_path.is_file():
        return
    try:
        names = json.loads(list_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise MeasurementError(f"{list_path}: unreadable module list ({type(e).__name__}: {e}) "
                               f"next to {source}; {_RERUN}.") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MeasurementError(f"{list_path}: a module list must be a JSON list of module names, "
                               f"got {type(names).__name__}; {_RERUN}.")
    measured = {str(n): None for n in nodes}
    listed = set(names)
    missing = [n for n in measured if n not in listed]
    extra = [n for n in names if n not in measured]
    if missing or extra:
        raise MeasurementError(
            f"{list_path} disagrees with {source}: measured but not listed: {missing[:5]}; "
            f"listed but not measured: {extra[:5]}. The files come from different writes; "
            f"{_RERUN}.")


def read_measurements(prefix_or_path: str | os.PathLike[str], *, observer: str = "maxabs",
                      rank: int | None = None, world_size: int | None = None) -> Measurements:
    """Read INC measurements from ``dump_stats_path`` or from an explicit ``.json``/``.npz``.

    Given a prefix, the file name is resolved like INC does (observer, worker suffix); the
    ``.npz`` is read when it exists (INC's QUANTIZE mode reads only that one), else the
    ``.json``, and the files of the set are checked against each other (write ids, see the
    module docstring). An explicit file is read alone. Raises :class:`MeasurementError`
    naming the file, node and key on any problem.
    """
    p = Path(prefix_or_path)
    if p.suffix in (".json", ".npz"):
        path = p
        observer = _observer_from_name(p, observer)
        doc = _load_doc(path, MEASURE_MODE)
    else:
        json_path, npz_path = measurement_file_paths(p, observer, rank, world_size)
        path = npz_path if npz_path.is_file() else json_path
        if not path.is_file():
            raise MeasurementError(
                f"no INC measurement file for dump_stats_path '{p}' (observer '{observer}', "
                f"rank {rank}, world_size {world_size}): neither {npz_path.name} nor "
                f"{json_path.name} exists. {_existing_with_prefix(p, rank is not None)} Run "
                "calibration (mode MEASURE) with this dump_stats_path, or point dump_stats_path "
                "at the existing files.")
        doc = _load_doc(path, MEASURE_MODE)
        if path == npz_path:
            _check_pair(doc, npz_path, json_path)
        if _write_id(doc, path) is not None:
            _check_mod_list(mod_list_path(p, observer, rank, world_size), doc["Nodes"], path)
    nodes = {str(name): _parse_node(str(name), entry, path) for name, entry in doc["Nodes"].items()}
    num = doc.get("NumSamples")
    maxabs, params = _parse_extras(doc, nodes, path)
    return Measurements(nodes=nodes, observer=observer, global_rank=doc.get("GlobalRank"),
                        local_rank=doc.get("LocalRank"), source=str(path),
                        num_samples=None if num is None else int(num), maxabs=maxabs, observer_params=params)


def _merge_arrays(a: np.ndarray | None, b: np.ndarray | None, where: str) -> np.ndarray | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise MeasurementError(f"{where}: measured in one part but not in the other; "
                               "measure every rank with the same config.")
    if a.shape != b.shape:
        raise MeasurementError(f"{where}: shapes differ ({a.shape} vs {b.shape}); parts measured "
                               "with different observers or sharding cannot be merged.")
    return np.maximum(a, b)


def merge_measurements(parts: Sequence[Measurements]) -> Measurements:
    """Elementwise max of several ranks' measurements (same nodes, same shapes)."""
    if not parts:
        raise MeasurementError("merge_measurements needs at least one Measurements object.")
    label = [p.source or f"part {i}" for i, p in enumerate(parts)]
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if p.observer_params != first.observer_params:
            raise MeasurementError(f"cannot merge {label[i]} (observer parameters {p.observer_params}) with "
                                   f"{label[0]} ({first.observer_params}); merge files measured with one config.")
        if p.observer != first.observer:
            raise MeasurementError(f"cannot merge observer '{p.observer}' ({label[i]}) with "
                                   f"'{first.observer}' ({label[0]}); merge files of one observer.")
        missing = [n for n in first.nodes if n not in p.nodes]
        extra = [n for n in p.nodes if n not in first.nodes]
        if missing or extra:
            raise MeasurementError(
                f"cannot merge {label[i]} with {label[0]}: node sets differ (missing in "
                f"{label[i]}: {missing[:5]}; only in {label[i]}: {extra[:5]}). Measure every rank "
                "with the same model and config.")
    nodes: dict[str, NodeMeasurement] = {}
    for name, node in first.nodes.items():
        ins = list(node.inputs)
        outs = None if node.outputs is None else list(node.outputs)
        params = dict(node.params)
        for i, p in enumerate(parts[1:], 1):
            other = p.nodes[name]
            where = f"node '{name}' ({label[0]} vs {label[i]})"
            if len(other.inputs) != len(ins):
                raise MeasurementError(f"{where}: {len(ins)} vs {len(other.inputs)} inputs.")
            ins = [_merge_arrays(a, b, f"{where} key 'inputs[{j}]'")
                   for j, (a, b) in enumerate(zip(ins, other.inputs))]
            if (outs is None) != (other.outputs is None) or (
                    outs is not None and len(outs) != len(other.outputs or [])):
                raise MeasurementError(f"{where} key 'outputs': measured in one part only or "
                                       "with a different count; use the same measure_exclude.")
            if outs is not None:
                outs = [_merge_arrays(a, b, f"{where} key 'outputs[{j}]'")
                        for j, (a, b) in enumerate(zip(outs, other.outputs or []))]
            if set(params) != set(other.params):
                raise MeasurementError(f"{where} key 'params': {sorted(params)} vs "
                                       f"{sorted(other.params)}.")
            params = {k: _merge_arrays(v, other.params[k], f"{where} key 'params.{k}'")
                      for k, v in params.items()}
        nodes[name] = NodeMeasurement(inputs=ins, outputs=outs, params=params)
    samples = {p.num_samples for p in parts}
    return Measurements(nodes=nodes, observer=first.observer,
                        source="merged(" + ", ".join(label) + ")",
                        num_samples=samples.pop() if len(samples) == 1 else None,
                        maxabs=_merge_maxabs(parts, label), observer_params=first.observer_params)


# --------------------------------------------------------------------------------------------
# Scales ("Mode": "Scale")
# --------------------------------------------------------------------------------------------
def _scale_value(value: Any, where: str) -> np.ndarray | dict[int, np.ndarray]:
    if isinstance(value, dict):  # per-channel weight: {0: out-channel scales, 1: in-channel}
        out: dict[int, np.ndarray] = {}
        for k, v in value.items():
            if not (isinstance(k, (int, np.integer)) or (isinstance(k, str) and k.isdigit())):
                raise MeasurementError(f"{where}: per-channel keys must be axis numbers "
                                       f"(0, 1), got {k!r}.")
            out[int(k)] = _float_array(v, f"{where}[{k}]")
        return out
    return _float_array(value, where)


def _parse_scales_entry(name: str, entry: Any, where: str) -> dict[str, Any]:
    entry = _node_dict(name, entry, where)
    at = f"{where}: node '{name}' key"
    res: dict[str, Any] = {
        "inputs": [None if x is None else _scale_value(x, f"{at} 'inputs[{i}]'")
                   for i, x in enumerate(entry["inputs"])]}
    if entry.get("outputs") is not None:
        res["outputs"] = [None if x is None else _scale_value(x, f"{at} 'outputs[{i}]'")
                          for i, x in enumerate(entry["outputs"])]
    params = {}
    for k, v in (entry.get("params") or {}).items():
        if v is None:
            raise MeasurementError(f"{at} 'params.{k}': null scale; recompute the scales.")
        params[str(k)] = _scale_value(v, f"{at} 'params.{k}'")
    res["params"] = params
    return res


def write_scales(scales: Mapping[str, Mapping[str, Any]], prefix: str | os.PathLike[str], *,
                 observer: str = "maxabs", scale_method: str, rank: int | None = None,
                 world_size: int | None = None) -> list[Path]:
    """Write INC's cached-scales files (``"Mode": "Scale"``); returns ``[json, npz]``.

    ``scales`` maps module names to ``{"inputs": [s_in, ...], "outputs": [s_out],
    "params": {"weight": s_w}}``; a value is a number, an array, a tensor, or (per-channel
    weight) ``{0: out-channel scales, 1: in-channel scales}``. INC's QUANTIZE mode loads the
    ``.npz`` when its name matches ``scale_method`` and then skips its own scale computation;
    for a Linear it expects ``outputs`` too (``s_in * s_w``).
    """
    json_path, npz_path = measurement_file_paths(prefix, observer, rank, world_size, scale_method)
    arrays = {str(n): _parse_scales_entry(str(n), dict(e) if isinstance(e, Mapping) else e,
                                          "scales to write") for n, e in scales.items()}
    head = _header(SCALE_MODE, None, rank, None)
    json_text = json.dumps({**head, "Nodes": _to_lists(arrays)}, indent=4, allow_nan=False)
    _write_files([(npz_path, lambda t: _save_npz(t, {**head, "Nodes": arrays})),
                  (json_path, lambda t: t.write_text(json_text, encoding="utf-8"))], "scale files")
    return [json_path, npz_path]


def read_scales(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read an INC scale file (``.json`` or ``.npz``) into ``{node: {"inputs", "outputs",
    "params"}}`` with float32 arrays (0-d for scalars); per-channel weights stay
    ``{0: array, 1: array}``. Find the name with ``measurement_file_paths(..., scale_method=)``.
    """
    p = Path(path)
    if p.suffix not in (".json", ".npz"):
        raise MeasurementError(f"{p}: read_scales needs the .json or .npz file itself; build "
                               "the name with measurement_file_paths(prefix, scale_method=...).")
    doc = _load_doc(p, SCALE_MODE)
    return {str(n): _parse_scales_entry(str(n), e, str(p)) for n, e in doc["Nodes"].items()}

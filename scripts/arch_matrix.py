"""The architecture matrix: what fp8fx matches and quantizes in thirteen transformers families.

Each family is built from its transformers config as a tiny random-weight model
(``tests/arch_zoo.py``: hidden 32, one layer, vocabulary 128; no network), then

1. prepare -> calibrate on three random token batches -> finalize_calibration -> convert,
   and the converted model's output is compared with the fp32 model (SQNR) and, for decoder
   LMs, it generates three greedy tokens;
2. a fresh copy runs through ``torch.compile(model, backend="fp8fx")`` with the measurement
   files of step 1 (Inductor only with ``--inductor``; the QUANTIZE graph runs eagerly
   otherwise); the FP8 ops in its graph are counted and its output compared with fp32, and a
   decoder LM generates through the compiled forward.

Counts come from ``fp8fx.explain`` (every match, with its decision), so kinds that become
quantizable later show up by rerunning this script. Prints JSON, then a markdown table;
``--write`` also regenerates ``docs/architectures.md`` (atomically).

    python scripts/arch_matrix.py                 # all architectures, JSON + table
    python scripts/arch_matrix.py --archs gpt2,mixtral
    python scripts/arch_matrix.py --write         # also rewrite docs/architectures.md
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fp8fx  # noqa: E402
from fp8fx.backends.dynamo import fp8fx_backend  # noqa: E402
from fp8fx.capture import capture, module_path_of  # noqa: E402
from fp8fx.numerics import sqnr_db  # noqa: E402
from fp8fx.passes.match import OpKind, find_matches  # noqa: E402

from arch_zoo import ARCHS, build, calibration_batches, eval_ids, main_output, prompt  # noqa: E402

DOC = ROOT / "docs" / "architectures.md"
KINDS = [k.value for k in OpKind]

# GEMM-like ops: the ones in a graph that no match covers are listed as "not matched"
_GEMM_FNS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm,
             torch.einsum, F.linear, torch._C._nn.linear, getattr(torch, "_grouped_mm", None)}
_GEMM_METHODS = {"matmul", "mm", "bmm", "baddbmm", "addmm", "__matmul__"}


def _gemm_name(node: torch.fx.Node) -> str | None:
    if node.op == "call_method" and node.target in _GEMM_METHODS:
        return str(node.target)
    if node.op != "call_function":
        return None
    try:
        if node.target in _GEMM_FNS:
            return getattr(node.target, "__name__", str(node.target))
    except TypeError:
        return None
    name = getattr(node.target, "_qualified_op_name", "")
    return name if "mm" in name else None


def unmatched_gemms(model: torch.nn.Module, ids: torch.Tensor) -> list[str]:
    """GEMM-like nodes of the model's graph that the matcher does not report, as
    ``"op in ModuleType xN"``."""
    seen: Counter = Counter()
    for cg in capture(model, (), {"input_ids": ids}):
        matched = {m.node for m in find_matches(cg)}
        for node in cg.gm.graph.nodes:
            op = _gemm_name(node)
            if op is not None and node.name not in matched:
                seen[(op, module_path_of(node)[1] or "model")] += 1
    return [f"{op} in {typ} x{n}" for (op, typ), n in sorted(seen.items())]


def _counts(rows) -> tuple[dict[str, int], dict[str, int]]:  # noqa: ANN001
    matched = Counter(d.match.kind.value for d in rows)
    quantized = Counter(d.match.kind.value for d in rows if d.quantize)
    return dict(matched), dict(quantized)


def _generate(model: torch.nn.Module) -> list[int]:
    ids = prompt()
    return model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:].tolist()


def run_arch(arch: str, workdir: Path, inductor: bool) -> dict:
    """Everything the matrix says about one architecture (errors are recorded, not raised)."""
    kind = ARCHS[arch][1]
    out: dict = {"arch": arch, "kind": kind, "error": None}
    t0 = time.perf_counter()
    try:
        reference, model = build(arch), build(arch)
        out["model_class"] = type(model).__name__
        ids = eval_ids()
        out["not_matched"] = unmatched_gemms(build(arch), ids)
        cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(workdir / arch / "m"))
        fp8fx.prepare(model, cfg)
        with torch.no_grad():
            for batch in calibration_batches():
                model(input_ids=batch)
        fp8fx.finalize_calibration(model)
        fp8fx.convert(model)
        rows = fp8fx.explain(model).rows
        out["matched"], out["quantized"] = _counts(rows)
        out["high_precision"] = [{"name": d.match.name, "kind": d.match.kind.value, "reason": d.reason}
                                 for d in rows if not d.quantize]
        with torch.no_grad():
            expected = main_output(reference(input_ids=ids))
            out["eager_sqnr_db"] = round(sqnr_db(expected, main_output(model(input_ids=ids))), 1)
        if kind == "causal_lm":
            out["eager_generate"] = _generate(model)
            out["fp32_generate"] = _generate(reference)
        out["compiled"] = run_compiled(arch, cfg.replace(mode="QUANTIZE"), ids, expected, inductor)
    except Exception as exc:  # the matrix reports a failing architecture instead of stopping
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        out["traceback"] = traceback.format_exc(limit=-6)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_compiled(arch: str, qcfg: fp8fx.FP8Config, ids: torch.Tensor, expected: torch.Tensor,
                 inductor: bool) -> dict:
    options = {"config": qcfg, "inductor": inductor}
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def keep_graph(gm, example_inputs):  # noqa: ANN001, ANN202 (the fp8fx backend, graph kept)
        compiled = fp8fx_backend(gm, example_inputs, options)
        graphs.append(gm)
        return compiled

    model = build(arch)
    with torch.no_grad():
        got = main_output(torch.compile(model, backend=keep_graph)(input_ids=ids))
    ops = Counter(n.target.name().split("::", 1)[1] for g in graphs for n in g.graph.nodes
                  if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fp8fx")
    res = {"inductor": inductor, "graphs": len(graphs), "fp8_ops": dict(sorted(ops.items())),
           "sqnr_db": round(sqnr_db(expected, got), 1)}
    if ARCHS[arch][1] == "causal_lm":
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="fp8fx", dynamic=True, options=options)
        res["generate"] = _generate(model)
    return res


# ----------------------------------------------------------------------------------- output
def _cell(r: dict, kind: str) -> str:
    m = r.get("matched", {}).get(kind, 0)
    return "·" if m == 0 else f"{r['quantized'].get(kind, 0)}/{m}"


def table(results: list[dict]) -> str:
    head = ["model", *KINDS, "SQNR eager / compiled (dB)", "FP8 ops in the compiled graph",
            "generate: tokens as fp32, eager / compiled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["error"]:
            lines.append(f"| {r['arch']} | " + " | ".join(["?"] * (len(head) - 2)) + f" | **error**: {r['error']} |")
            continue
        c = r["compiled"]
        ops = ", ".join(f"{k} x{v}" for k, v in c["fp8_ops"].items()) or "none"
        if r["kind"] == "causal_lm":
            same = [sum(a == b for a, b in zip(g, r["fp32_generate"])) for g in (r["eager_generate"], c["generate"])]
            gen = f"{same[0]}/{len(r['fp32_generate'])} / {same[1]}/{len(r['fp32_generate'])}"
        else:
            gen = "(encoder)"
        lines.append(f"| {r['arch']} (`{r['model_class']}`) | " + " | ".join(_cell(r, k) for k in KINDS)
                     + f" | {r['eager_sqnr_db']} / {c['sqnr_db']} | {ops} | {gen} |")
    return "\n".join(lines)


def notes(results: list[dict]) -> str:
    """Per architecture: what stays in high precision (reason) and what is not matched."""
    out = []
    for r in results:
        if r["error"]:
            out.append(f"* **{r['arch']}**: failed: `{r['error']}`")
            continue
        items = []
        by_reason: dict[str, list[str]] = {}
        for h in r["high_precision"]:
            by_reason.setdefault(h["reason"], []).append(f"`{h['name']}`")
        items += [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]
        items += [f"not matched: {g}" for g in r["not_matched"]]
        if items:
            out.append(f"* **{r['arch']}**\n" + "\n".join(f"  * {i}" for i in items))
        else:
            out.append(f"* **{r['arch']}**: every match quantized; no unmatched GEMM")
    return "\n".join(out)


_INTRO = """# Architecture matrix

Generated by `python scripts/arch_matrix.py --write`; do not edit by hand. The same runs are the
tests in `tests/test_architectures.py`.

Thirteen transformers families, each built from its config as a tiny random-weight model
(`tests/arch_zoo.py`: hidden size 32, one layer, vocabulary 128, fp32; no download). For each:
prepare with the default `FP8Config` (nothing block-listed, E4M3, target cpu, `maxabs_arbitrary` scales),
calibrate on three random token batches, `finalize_calibration`, `convert`; the converted
model runs forward and, for decoder LMs, `generate` (three greedy tokens). A fresh copy then
runs through `torch.compile(model, backend="fp8fx", options={"config": qcfg, "inductor": False})`
with the same measurement files: forward, and `generate` through the compiled `forward`.

Cells are *quantized/matched* nodes of each kind (`·`: none matched), from `fp8fx.explain`.
SQNR compares the model output (logits; BERT's last hidden state) with the fp32 model on held-out
random tokens: random weights make the numbers a check, not an accuracy claim. "FP8 ops in the
compiled graph" counts the `fp8fx::*` nodes of the backend's QUANTIZE graph (one forward).
"generate" says how many of the three greedy tokens equal the fp32 model's (a random model's
logits are close together, so FP8 noise may flip one; both forms must generate without error).
"""

_DESIGN = """## How the harder layers are handled

* **GPT-2 `Conv1D`** stores its weight `[in, out]` and runs `addmm(bias, x, W)`. The matcher
  marks it `weight_transposed`; measurement files hold its statistics as `[out, in]` (per-channel
  statistics follow the output channels), `convert` replaces it by an `Fp8Linear` holding the
  transposed FP8 weight `[out, in]`, and the compile backend rewrites the `addmm` into
  `fp8fx.linear` with the same transposed weight.
* **`FalconLinear`** computes `x @ self.weight.T` (then adds the bias): matched as a Linear on an
  `nn.Linear` subclass, replaced by an `Fp8Linear`.
* **Mixtral experts** (transformers 5: `MixtralExperts` holds every expert in two stacked
  parameters, `gate_up_proj [E, 2*I, H]` and `down_proj [E, H, I]`; the default `grouped_mm`
  implementation sorts tokens by expert and runs one grouped GEMM per projection, which traces as
  one graph: `torch._grouped_mm` in bf16, the opaque `transformers::grouped_mm_fallback` op in
  fp32). Each grouped GEMM is one `linear` match named after its stack
  (`model.layers.0.mlp.experts.gate_up_proj`). `convert` replaces the experts module by an
  `Fp8Experts`: float8 `[E, out, in]` stacks with one weight scale per expert and one input scale
  per projection (calibration sees all experts' tokens in one tensor), running the same routing
  with the `fp8fx::grouped_linear` op. The compile backend rewrites each grouped GEMM into that
  op. The `eager` experts implementation (a Python loop over the experts hit) breaks the graph
  and cannot be captured; `batched_mm` gathers weights per token and is not matched.
* **MoE routers** (`MixtralTopKRouter`, any module whose class name contains "Router", or a
  Linear named `gate`, `router` or `shared_expert_gate`) stay in high precision by default, with
  the reason "MoE router: ...": the layer is tiny and a small error can change the experts a
  token is sent to.
* **Attention**: SDPA models quantize the SDPA (q, k, v, probabilities, output) and the KV-cache
  writes; GPT-J and Bloom run `matmul`/`softmax` attention, quantized as INC's Matmul/Softmax
  (Bloom's `Q·Kᵀ` is a `baddbmm` with the ALiBi bias: its product runs in FP8, the bias add stays
  in high precision). See [attention.md](attention.md).
"""


def document(results: list[dict]) -> str:
    env = f"torch {torch.__version__}, transformers {__import__('transformers').__version__}"
    return "\n".join([_INTRO, f"Environment: {env}.", "", table(results), "",
                      "## What stays in high precision, and what is not matched", "", notes(results), "",
                      _DESIGN])


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)}")
    ap.add_argument("--inductor", action="store_true", help="compile the QUANTIZE graphs with Inductor (slow)")
    ap.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)} (needs every architecture)")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHS)}")
    if args.write and sorted(archs) != sorted(ARCHS):
        ap.error("--write publishes the whole matrix: run it without --archs")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_arch(a, Path(tmp), args.inductor) for a in archs]
    print(json.dumps({"torch": torch.__version__, "architectures": results}, indent=1))
    print()
    print(table(results))
    if args.write:
        write_atomically(DOC, document(results))
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

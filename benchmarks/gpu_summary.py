"""Summarize a ``benchmarks/gpu.sh`` output folder: one markdown report, plus ``summary.json``.

    python benchmarks/gpu_summary.py OUT_DIR      # prints markdown; writes OUT_DIR/summary.json

Reads what the steps left, finished or not (a step stopped by its timeout keeps the rows it
wrote): ``steps.jsonl`` (rc and seconds per step), ``machine.txt``, ``tests.xml`` (JUnit),
``linear_*.jsonl`` (``linear.py`` rows), ``schemes.jsonl`` (``linear_schemes_cuda.py``: FP8_DYNAMIC
and FP8_BLOCK against bf16) and the model step's JSON rows (``model.jsonl`` when
it finished, else the lines of ``model.log``). Model ratios are recomputed here against
``bf16_compiled`` of the same round, so a run cut short still gets them.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _json_lines(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _tests(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"ran": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"ran": False, "error": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"ran": True, **counts, "failed": failed}


def _model_rows(out: Path) -> list[dict]:
    src = out / "model.jsonl"
    rows = [r for r in _json_lines(src if src.is_file() else out / "model.log")
            if "variant" in r and "round" in r and not r.get("summary")]
    for rnd in {r["round"] for r in rows}:
        done = [r for r in rows if r["round"] == rnd]
        ref = next((r for r in done if r["variant"] == "bf16_compiled" and "prefill_s" in r), None)
        for r in done:
            if ref and "prefill_s" in r:
                r["prefill_vs_bf16_compiled"] = r["prefill_s"] / ref["prefill_s"]
                r["decode_vs_bf16_compiled"] = r["decode_s_per_token"] / ref["decode_s_per_token"]
    return rows


def _schemes_table(rows: list[dict]) -> list[str]:
    """One line per (shape, M): ms of every candidate, the schemes' ratio to bf16 eager, the GEMM
    their compiled code called and their SQNR against the op's definition."""
    cands = []
    for r in rows:
        if r["candidate"] not in cands:
            cands.append(r["candidate"])
    head = "| shape | M | " + " | ".join(f"{c} ms" for c in cands) + " | " + \
        " | ".join(f"{c} (x bf16, gemm, SQNR dB)" for c in cands if c.startswith("fp8")) + " |"
    out = [head, "|" + "---|" * (2 + len(cands) + sum(c.startswith("fp8") for c in cands))]
    keys = []
    for r in rows:
        key = (tuple(r["shape"]), r["m"])
        if key not in keys:
            keys.append(key)
    for shape, m in keys:
        cell = {r["candidate"]: r for r in rows if tuple(r["shape"]) == shape and r["m"] == m}
        ms = [f"{cell[c]['ms']:.4f}" if "ms" in cell.get(c, {}) else ("error" if "error" in cell.get(c, {}) else "")
              for c in cands]
        extra = [f"{cell[c]['vs_bf16']:.2f}, {cell[c].get('gemm')}, {cell[c].get('sqnr_db')}" if "ms" in cell.get(c, {})
                 else cell.get(c, {}).get("error", "")[:80] for c in cands if c.startswith("fp8")]
        out.append(f"| {shape[0]}x{shape[1]} | {m} | " + " | ".join(ms + extra) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    steps = _json_lines(out / "steps.jsonl")
    tests = _tests(out / "tests.xml")
    linear_rows, linear_summaries = [], []
    for f in sorted(out.glob("linear_*.jsonl")):
        objs = _json_lines(f)
        linear_rows += [o for o in objs if o.get("kind") == "row"]
        linear_summaries += [{"file": f.name, **o} for o in objs if o.get("kind") == "summary"]
    model_rows = _model_rows(out)
    scheme_objs = _json_lines(out / "schemes.jsonl")
    scheme_rows = [o for o in scheme_objs if o.get("kind") == "row"]
    scheme_summary = next((o for o in scheme_objs if o.get("kind") == "summary"), None)

    lines = [f"# GPU run: {out}", ""]
    machine = out / "machine.txt"
    if machine.is_file():
        lines += ["```", machine.read_text(encoding="utf-8", errors="replace").strip(), "```", ""]
    lines += ["## Steps", "", "| step | rc | seconds | timeout s | timed out |", "|---|---:|---:|---:|---|"]
    lines += [f"| {s.get('step')} | {s.get('rc')} | {s.get('seconds')} | {s.get('timeout_s')} | "
              f"{'yes' if s.get('timed_out') else 'no'} |" for s in steps]
    lines += ["", "## Tests (-k cuda)", ""]
    if tests.get("ran"):
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"{passed} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped of {tests['tests']}")
        lines += [f"- FAILED {name}" for name in tests["failed"]]
    else:
        lines.append("no tests.xml (the step did not finish)")
    lines += ["", "## linear_schemes_cuda.py (FP8_DYNAMIC / FP8_BLOCK compiled vs bf16; median ms per call)", ""]
    if scheme_rows:
        lines += _schemes_table(scheme_rows)
        lines.append(f"\nwall {scheme_summary.get('wall_s')} s; torch {scheme_summary.get('torch')}" if scheme_summary
                     else "\nnot finished (no summary line)")
    else:
        lines.append("no rows")
    lines += ["", "## linear.py (median ms per call, ratio to bf16 eager)", ""]
    if linear_rows:
        from linear import tables

        lines.append(tables(linear_rows))
        for s in linear_summaries:
            lines.append(f"\n{s['file']}: wall {s.get('wall_s')} s; conversions bit-exact: "
                         f"{all(v for k, v in s.items() if k.endswith('bit_exact_256'))}")
        unfinished = [f.name for f in sorted(out.glob("linear_*.jsonl"))
                      if f.name not in {s["file"] for s in linear_summaries}]
        if unfinished:
            lines.append(f"\nnot finished (no summary line): {', '.join(unfinished)}")
    else:
        lines.append("no rows")
    lines += ["", "## model.py (Llama-3-8B-shaped, random weights; ratios to bf16_compiled)", ""]
    if model_rows:
        from model import summarize, table

        info = next((r for r in _json_lines(out / "model.log") if "machine" in r), None)
        if info:
            lines.append(f"model: {info['machine'].get('model')}; gpu: {info['machine'].get('gpu')}\n")
        lines += ["```", table(summarize(model_rows)), "```"]
    else:
        lines.append("no rows")
    print("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({
        "steps": steps, "tests": tests, "linear_rows": len(linear_rows), "schemes": scheme_rows,
        "schemes_summary": scheme_summary,
        "linear_summaries": linear_summaries,
        "model": summarize(model_rows) if model_rows else []}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

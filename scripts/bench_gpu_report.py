#!/usr/bin/env python3
"""The report of scripts/bench-gpu.sh: OUT/NAME.json and OUT/NAME.md from its work folder.
Standard library only.

The work folder holds, as bench-gpu.sh writes them:
  plan.tsv       one row per streamppl step: id, name, model (7b|smollm2), strategy, engine,
                 block size, dtype, tokens, extra eval arguments
  steps.tsv      one row per step run: id, status (ok|failed|timeout|skipped), exit code, wall
                 seconds, peak and idle GPU MiB, time limit, reason if skipped
  runs/ID/*/run.json          streamppl's record of step ID
  env.json, reference.json    bench_gpu_reference.py's outputs
  gpu.csv, loadavg, streamppl-version, streamppl-sha256, logs/ID.err
The targets pick their rows by model, name, strategy and dtype (the reference's by id).
"""

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

MODELS = {"7b": "7B", "smollm2": "SmolLM2"}
SEVEN_B = (
    "Llama-2-7B shape (32 layers, hidden 4096, 32 heads, MLP 11008), random weights "
    "(seed 0, std 0.02), bf16 safetensors, SmolLM2's tokenizer (49,152)"
)
SINK = "sink:4+1020"
LOOP = "transformers token loop (reference-style)"
DENSE_REF = "transformers dense forward"
# The table's order within a model (the CPU bench's first).
ROW_ORDER = [
    "block engine",
    "dense prefill",
    "token engine",
    "flat memory, short",
    "flat memory, long",
    LOOP,
    DENSE_REF,
]
FLAT_TOLERANCE = 1.10  # long-run over short-run peak GPU memory that still counts as flat
GPU_MEMORY = "nvidia-smi memory.used every 100 ms during the step, peak minus the idle GPU before it"
NOTES = [
    "The reference loop is reference-style (the StreamingLLM paper's eval_long_ppl.py): one token "
    "per forward pass with a DynamicCache, the NLL read back every step, then eviction to 4 sinks + "
    "1020 recent by slicing; positions follow the cache index. Timed after warm-up from a full "
    "1024-entry cache. Its token ids are random (seed 0): streamppl's tokenizer is not available to "
    "python, and ids do not change speed.",
    "The recompute figure is extrapolated x16 from a 1/16 sample (`--score-every 16`: 4096 of the "
    "65,536 tokens, each its own 1025-token window; windows are independent).",
]


def read_tsv(path, fields):
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [dict(zip(fields, row, strict=False)) for row in csv.reader(f, delimiter="\t") if row]


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def number(text, kind=float):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def machine(work):
    gpu = [part.strip() for part in read_text(work / "gpu.csv").split(",")] + ["", "", ""]
    cpuinfo = read_text(Path("/proc/cpuinfo")).splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "unknown")
    meminfo = read_text(Path("/proc/meminfo")).splitlines()
    mem_kb = next((number(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal:")), None)
    return {
        "gpu": gpu[0] or "unknown",
        "gpu_driver": gpu[1] or None,
        "gpu_memory_mib": number(gpu[2].split(" ")[0], int),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_kb / 2**20 if mem_kb else None,
        "load_average_at_start": number(read_text(work / "loadavg").split(" ")[0]),
    }


def step_table(work):
    fields = ["id", "status", "exit_code", "wall", "peak", "idle", "limit", "reason"]
    steps = {}
    for row in read_tsv(work / "steps.tsv", fields):
        step = {
            "id": row["id"],
            "status": row["status"],
            "exit_code": number(row["exit_code"], int),
            "wall_seconds": number(row["wall"]),
            "peak_gpu_mib": number(row["peak"], int),
            "idle_gpu_mib": number(row["idle"], int),
            "limit_seconds": number(row["limit"], int),
            "reason": row["reason"] or None,
        }
        step["error"] = step_error(work, step)
        steps[row["id"]] = step
    return steps


def step_error(work, step):
    """What stopped a failed or timed-out step: its last line on stderr."""
    if step["status"] not in ("failed", "timeout"):
        return None
    lines = [ln.strip() for ln in read_text(work / "logs" / f"{step['id']}.err").splitlines() if ln.strip()]
    last = lines[-1][:300] if lines else None
    if step["status"] == "timeout":
        return f"timed out after {step['limit_seconds']} s" + (f"; last said: {last}" if last else "")
    return last or f"exit code {step['exit_code']}"


def why_not(step, fallback):
    return (step or {}).get("error") or (step or {}).get("reason") or fallback


def gpu_mib_used_by(step):
    """Peak GPU memory of a step over the idle GPU before it (a timed-out step's too: its
    samples up to the end count)."""
    if not step or step["peak_gpu_mib"] is None or step["status"] == "skipped":
        return None
    return step["peak_gpu_mib"] - (step["idle_gpu_mib"] or 0)


def the_run(work, step_id):
    found = sorted((work / "runs" / step_id).glob("*/run.json"))
    return read_json(found[0]) if found else None


def streamppl_row(work, plan, step):
    run = the_run(work, plan["id"]) or {}
    details = (run.get("model") or {}).get("details") or {}
    asked = number(plan["tokens"], int)
    row = {
        "id": plan["id"],
        "name": plan["name"],
        "model": plan["model"],
        "strategy": run.get("strategy", plan["strategy"]),
        "engine": run.get("engine", plan["engine"]),
        "block_size": run["block_size"] if run else number(plan["block"], int),
        "dtype": details.get("dtype", plan["dtype"]),
        "device": details.get("device"),
        "eval_args": plan.get("extra") or None,
        "tokens": run.get("tokens_scored"),
        "tokens_asked": asked,
        "score_every": run.get("score_every"),
        "tokens_per_second": run.get("tokens_per_second"),
        "wall_seconds": run.get("wall_seconds"),
        "process_wall_seconds": (step or {}).get("wall_seconds"),
        "peak_gpu_mib": gpu_mib_used_by(step),
        "ppl": run.get("ppl"),
        "status": step["status"] if step else "not run",
        "error": why_not(step, None),
        "notes": [],
    }
    if row["status"] == "ok" and not run:
        row["status"], row["error"] = "failed", "no run.json"
    if details.get("dtype") not in (None, plan["dtype"]):
        row["notes"].append(f"asked for {plan['dtype']}, ran in {details['dtype']}")
    sampled = (row["score_every"] or 1) > 1
    if run and asked and not sampled and run["tokens_scored"] < asked:
        row["notes"].append(f"the corpus ends at {run['tokens_scored']:,} of {asked:,} tokens")
    return row


def reference_rows(reference, step):
    base = {"model": "7b", "dtype": (reference or {}).get("dtype", "bf16")}
    if not reference:
        status = step["status"] if step else "not run"
        error = why_not(step, "no reference.json")
        return [{**base, "id": "reference", "name": LOOP, "strategy": SINK, "engine": "transformers",
                 "status": status, "error": error}]  # fmt: skip
    loop = reference["token_loop"]
    rows = [
        {
            **base,
            "id": "reference",
            "name": LOOP,
            "strategy": SINK,
            "engine": "transformers, one token per pass",
            "block_size": 1,
            "tokens": loop["timed_steps"],
            "tokens_per_second": loop["tokens_per_second"],
            "wall_seconds": loop["seconds"],
            "ppl": math.exp(loop["mean_nll"]),
            "status": "ok",
        }
    ]
    attention = reference.get("attn_implementation") or "?"
    for dense in reference.get("dense_forward", []):
        rows.append(
            {
                **base,
                "id": f"reference-dense-{dense['tokens']}",
                "name": DENSE_REF,
                "strategy": "dense",
                "engine": f"transformers {attention}, one pass",
                "block_size": dense["tokens"],
                "tokens": dense["tokens"],
                "tokens_per_second": dense.get("tokens_per_second"),
                "wall_seconds": dense.get("seconds"),
                "ppl": math.exp(dense["mean_nll"]) if dense.get("mean_nll") is not None else None,
                "status": "failed" if "error" in dense else "ok",
                "error": dense.get("error"),
            }
        )
    return rows


def fastest(rows, **match):
    """The fastest passing row whose fields equal `match`."""
    found = [
        r
        for r in rows
        if r["status"] == "ok" and r.get("tokens_per_second") and all(r.get(k) == v for k, v in match.items())
    ]
    return max(found, key=lambda r: r["tokens_per_second"]) if found else None


def first(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def tps(row):
    return row["tokens_per_second"] if row else None


def ratio(a, b):
    return a / b if a is not None and b else None


def target(text, measured, threshold, at_least, unit, detail=None):
    passed = None if measured is None else (measured >= threshold if at_least else measured <= threshold)
    return {
        "target": text,
        "threshold": threshold,
        "measured": measured,
        "unit": unit,
        "pass": passed,
        "detail": detail,
    }


def block_label(row):
    return f"B={row['block_size']}" if row and row.get("block_size") else None


def targets_and_ratios(rows):
    block_7b = fastest(rows, model="7b", name="block engine", dtype="bf16", strategy=SINK)
    loop = fastest(rows, id="reference")
    dense_ref = fastest(rows, id="reference-dense-4096")
    block_smol = fastest(rows, model="smollm2", name="block engine", dtype="bf16", strategy=SINK)
    bf16_2048 = fastest(rows, model="smollm2", name="block engine", dtype="bf16", block_size=2048)
    f32_2048 = fastest(rows, model="smollm2", name="block engine", dtype="f32", block_size=2048)
    short = first(rows, model="smollm2", name="flat memory, short")
    long = first(rows, model="smollm2", name="flat memory, long")
    memory = ratio((long or {}).get("peak_gpu_mib"), (short or {}).get("peak_gpu_mib"))
    ratios = {
        "block_7b_over_reference_loop": ratio(tps(block_7b), tps(loop)),
        "block_7b_over_transformers_dense_4096": ratio(tps(block_7b), tps(dense_ref)),
        "dense_prefill_7b_over_transformers_dense_4096": ratio(
            tps(fastest(rows, model="7b", name="dense prefill")), tps(dense_ref)
        ),
        "block_over_token_engine_7b": ratio(
            tps(block_7b), tps(fastest(rows, model="7b", name="token engine"))
        ),
        "block_over_token_engine_smollm2": ratio(
            tps(block_smol), tps(fastest(rows, model="smollm2", name="token engine"))
        ),
        "f32_over_bf16_smollm2_b2048": ratio(tps(f32_2048), tps(bf16_2048)),
        "gpu_memory_long_over_short_smollm2": memory,
    }
    targets = [
        target(f"7B `{SINK}` block engine, bf16: >= 20,000 tok/s", tps(block_7b), 20000, True, "tok/s",
               block_label(block_7b)),
        target("7B block engine >= 500x the reference-style transformers token loop",
               ratios["block_7b_over_reference_loop"], 500, True, "x",
               f"loop {tps(loop):,.1f} tok/s" if loop else None),
        target("7B block engine >= 60% of transformers' one-shot dense forward (4096 tokens)",
               ratios["block_7b_over_transformers_dense_4096"], 0.60, True, "x",
               f"dense forward {tps(dense_ref):,.0f} tok/s" if dense_ref else None),
        target(f"SmolLM2 `{SINK}` block engine, bf16: >= 150,000 tok/s", tps(block_smol), 150000, True,
               "tok/s", block_label(block_smol)),
        flat_memory_target(short, long, memory),
        recompute_target(first(rows, model="smollm2", strategy="recompute:1024")),
    ]  # fmt: skip
    return targets, ratios


def flat_memory_target(short, long, memory_ratio):
    text = f"SmolLM2 peak GPU memory flat from 16K to 1M tokens (long/short <= {FLAT_TOLERANCE:.2f})"
    detail = None
    if memory_ratio is not None:
        reached = f"{long['tokens']:,} tokens" if long.get("tokens") else f"{long['status']} before its end"
        detail = (
            f"{short['peak_gpu_mib']:,} MiB at {short.get('tokens') or short['tokens_asked']:,} tokens, "
            f"{long['peak_gpu_mib']:,} MiB at {reached}"
        )
    return target(text, memory_ratio, FLAT_TOLERANCE, False, "x", detail)


def recompute_target(row):
    """The full run's time from the 1/k sample: its windows are independent, so k times the
    sample's (model load excluded)."""
    text = "exact `recompute:1024` over 65,536 tokens on SmolLM2 < 10 min (1/16 sample, x16)"
    if not row:
        return target(text, None, 600, False, "s")
    k = row.get("score_every") or 16
    if row["status"] == "timeout":
        # A lower bound only (the timed-out seconds include the model load): a fail once it
        # passes 10 min, else unknown (the budget may have cut the time limit short).
        bound = k * (row.get("process_wall_seconds") or 0)
        detail = f"the sample timed out: over about {bound:,.0f} s, model load included"
        return {**target(text, None, 600, False, "s", detail), "pass": False if bound > 600 else None}
    if row["status"] != "ok" or row.get("wall_seconds") is None:
        return target(text, None, 600, False, "s", row.get("error"))
    detail = f"{row['tokens']:,} windows in {row['wall_seconds']:.1f} s, x{k}"
    return target(text, row["wall_seconds"] * k, 600, False, "s", detail)


def row_order(row):
    """7B first; in each model ROW_ORDER, bf16 before f32, small blocks first."""
    model = list(MODELS).index(row["model"]) if row["model"] in MODELS else len(MODELS)
    name = ROW_ORDER.index(row["name"]) if row["name"] in ROW_ORDER else len(ROW_ORDER)
    return (model, name, row.get("dtype") != "bf16", row.get("block_size") or 0)


def build_report(args):
    work = args.work
    reference = read_json(work / "reference.json")
    steps = step_table(work)
    plan_fields = ["id", "name", "model", "strategy", "engine", "block", "dtype", "tokens", "extra"]
    rows = [streamppl_row(work, p, steps.get(p["id"])) for p in read_tsv(work / "plan.tsv", plan_fields)]
    rows += reference_rows(reference, steps.get("reference"))
    rows.sort(key=row_order)
    targets, ratios = targets_and_ratios(rows)
    return {
        "name": args.name,
        "machine": machine(work),
        "runs_per_figure": 1,
        "models": {
            "7b": {"description": SEVEN_B, "parameters": (reference or {}).get("parameters")},
            "smollm2": {"path": str(args.smollm2)},
        },
        "corpus": str(args.corpus),
        "software": {
            "streamppl": read_text(work / "streamppl-version") or None,
            "streamppl_binary": str(args.streamppl),
            "streamppl_sha256": read_text(work / "streamppl-sha256") or None,
            **(read_json(work / "env.json") or {}),
        },
        "gpu_memory": GPU_MEMORY,
        "measurements": rows,
        "reference": reference,
        "targets": targets,
        "ratios": ratios,
        "notes": NOTES,
        "steps": list(steps.values()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fmt(value, spec=",.1f", suffix=""):
    return "—" if value is None else format(value, spec) + suffix


def engine_cell(row):
    engine = row.get("engine") or ""
    return f"block (B={row['block_size']})" if engine == "block" and row.get("block_size") else engine


def tokens_cell(row):
    tokens, every = row.get("tokens"), row.get("score_every")
    if tokens is None:
        return fmt(row.get("tokens_asked"), ",d")
    return f"{tokens:,} (1/{every})" if every and every > 1 else f"{tokens:,}"


def wall_cell(row):
    run, process = row.get("wall_seconds"), row.get("process_wall_seconds")
    return fmt(run, ".1f") if process is None else f"{fmt(run, '.1f')} / {process:.1f}"


def measurement_line(row):
    status = "" if row["status"] == "ok" else f" **{row['status']}**"
    cells = [
        row["name"] + status,
        MODELS.get(row["model"], row["model"]),
        f"`{row['strategy']}`",
        engine_cell(row),
        row.get("dtype") or "—",
        tokens_cell(row),
        fmt(row.get("tokens_per_second")),
        wall_cell(row),
        fmt(row.get("peak_gpu_mib"), ",d"),
        fmt(row.get("ppl"), ",.3f"),
    ]
    return "| " + " | ".join(cells) + " |"


def target_line(t):
    small_ratio = t["unit"] == "x" and t["measured"] is not None and t["measured"] < 10
    spec = {"tok/s": ",.1f", "s": ",.1f", "x": ".3f" if small_ratio else ",.0f"}[t["unit"]]
    suffix = {"tok/s": " tok/s", "s": " s", "x": "x"}[t["unit"]]
    measured = fmt(t["measured"], spec, suffix) if t["measured"] is not None else "not measured"
    if t.get("detail"):
        measured += f" ({t['detail']})"
    verdict = {True: "pass", False: "**FAIL**", None: "—"}[t["pass"]]
    return f"| {t['target']} | {measured} | {verdict} |"


def header(report):
    m, sw = report["machine"], report["software"]
    sdpa = sw.get("sdpa_backends_enabled") or {}
    enabled = ", ".join(k for k, v in sdpa.items() if v) or "unknown"
    cudnn_sdpa = {True: "on", False: "off"}.get(sdpa.get("cudnn"), "unknown")
    return [
        f"Bench `{report['name']}`: {m['gpu']} ({fmt(m['gpu_memory_mib'], ',d')} MiB, driver "
        f"{m['gpu_driver']}), {m['cpu']} ({m['cores']} cores, {fmt(m['memory_gib'], '.0f')} GiB), load "
        f"average {fmt(m['load_average_at_start'], '.2f')} at start, one run per figure, "
        f"{report['finished_at']}.",
        "",
        f"Software: {sw.get('streamppl') or 'streamppl ?'} (binary sha256 "
        f"{(sw.get('streamppl_sha256') or '?')[:12]}), torch {sw.get('torch', '?')} (CUDA "
        f"{sw.get('torch_cuda', '?')}, cuDNN {sw.get('cudnn', '?')}), transformers "
        f"{sw.get('transformers', '?')}; cuDNN SDPA {cudnn_sdpa} (SDPA back ends enabled: {enabled}).",
        "",
        f"7B: {report['models']['7b']['description']}. SmolLM2: "
        f"`{Path(report['models']['smollm2']['path']).name}`. Corpus: `{Path(report['corpus']).name}`.",
    ]


def ratios_line(r):
    return (
        "Ratios: 7B block engine over the reference loop "
        f"{fmt(r['block_7b_over_reference_loop'], ',.0f', 'x')}, "
        f"over transformers' dense forward {fmt(r['block_7b_over_transformers_dense_4096'], '.2f', 'x')}; "
        "7B dense prefill over transformers' dense forward "
        f"{fmt(r['dense_prefill_7b_over_transformers_dense_4096'], '.2f', 'x')}; block over token engine: "
        f"7B {fmt(r['block_over_token_engine_7b'], ',.1f', 'x')}, "
        f"SmolLM2 {fmt(r['block_over_token_engine_smollm2'], ',.1f', 'x')}; "
        f"SmolLM2 f32 over bf16 at B=2048 {fmt(r['f32_over_bf16_smollm2_b2048'], '.2f', 'x')}; "
        f"SmolLM2 peak GPU memory, long over short {fmt(r['gpu_memory_long_over_short_smollm2'], '.3f')}."
    )


def markdown(report):
    lines = [
        *header(report),
        "",
        "| measurement | model | strategy | engine | dtype | tokens | tokens/s | wall (s): run / process "
        "| peak GPU (MiB) | PPL |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [measurement_line(r) for r in report["measurements"]]
    lines += [
        "",
        "tokens/s is the engine's own figure (scored tokens over the run's time); wall: the run, then "
        f"the whole process with model load and tokenizing. Peak GPU: {report['gpu_memory']}.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [target_line(t) for t in report["targets"]]
    lines += ["", ratios_line(report["ratios"]), "", "Notes:"]
    lines += [f"- {note}" for note in report["notes"]]
    for row in report["measurements"]:
        lines += [f"- {row['name']} ({row['id']}): {note}." for note in row.get("notes") or []]
    bad = [s for s in report["steps"] if s["status"] != "ok"]
    if bad:
        lines += ["", "Steps that did not pass:"]
        lines += [
            f"- `{s['id']}`: {s['status']}" + (f" ({why_not(s, '')})" if why_not(s, "") else "") for s in bad
        ]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="bench-gpu.sh's work folder")
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smollm2", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--streamppl", type=Path, required=True, help="the binary benched")
    args = p.parse_args()
    report = build_report(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))


if __name__ == "__main__":
    main()

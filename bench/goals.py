"""The numbers' goals (quality, QAT overhead, decode) against what the result files hold.

python bench/goals.py     # reads bench/results/{quality,qat_overhead,decode}.json, rewrites the goals
                          # section of BENCHMARKS.md

Nothing here is measured or typed in: every number comes from the result files the other bench
scripts wrote, and a goal is "met" only when its inequality holds on them. A missed goal shows by
how much; the why and the measured next step are in MISSES.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, update_section  # noqa: E402

# what was measured about each goal that is still missed (shown only while it is missed)
MISSES = {
    "W4 g64": "Budget-bound: 40 steps x 4 x 256 (~41k tokens, the 30-minute cap per row on 2 "
              "cores) at the recipe's lr 2e-5 move almost no weight across a rounding boundary "
              "(the KD loss barely moves); published QAT recoveries use 10^7-10^8 tokens. Next: "
              "start from AWQ with lr 1e-4 (what met the W3 goal, below), then more steps in "
              "resumable chunks (README: long budgets in chunks).",
    "W3 g64": "Next: more steps in resumable chunks.",
    "block-wise W3 g64": "From the GPTQ (act-order) start the block stage moves little: on the "
                         "first 3 blocks its held-out output error goes 0.0650 -> 0.0626, where "
                         "from RTN it halves (0.176 -> 0.087) but ends worse; end-to-end KD of "
                         "the weights after it gains more (18.807 -> 18.192 with 60 steps) yet "
                         "stays above end-to-end KD alone from AWQ (17.415 in the same 36 min). "
                         "Next: the block stage from the AWQ start with a W3 learning-rate sweep, "
                         "then end-to-end weights for the remaining time.",
    "W2 g64": "Budget-bound: the KD loss is still falling steeply at step 40 (below). Next: the "
              "AWQ start (the best PTQ here by far, below) and more steps in resumable chunks.",
    "QAT overhead (CPU)": "Within the noise of the method (the quartiles of the paired ratios "
                          "straddle 1.03; see qat_parts_ms in the QAT overhead section for what "
                          "each piece costs). Next: fold min/max and qparams into the fake-quant "
                          "pass, and w_hat + mask into one backward pass.",
    "QAT overhead (GPU)": "No device machine in any session so far: bench/gpu.sh has the "
                          "measurement ready.",
    "Decode": "see the decode section.",
    "recipe W4 g64": "Measured 2026-12-08 (asymmetric grid, 256 x 3 blocks, 150 scales-only KD "
                     "steps under bf16 autocast, 41 min on a Xeon with AMX): 1.026x, 0.058 ppl "
                     "under the bar, where the same block stage lands 0.08 apart on two CPUs "
                     "(float rounding): a rerun on another CPU can miss by that much. In float32 "
                     "for 90 steps (row recipe_w4g64_asym) 1.034x; symmetric (recipe_w4g64_sym) "
                     "1.040x. Next: more end-to-end steps (validation 14.051 -> 14.028 from 90 to "
                     "150) and data.generated_share for Shakespeare (1.099x, at its bar).",
    "recipe W3 g64": "Measured 2026-12-07 (128 x 6 blocks, 120 scales-only KD steps at scale lr "
                     "2e-4, 51 of its 60 minutes): 1.143x wiki (validation 1.147x), 1.369x "
                     "Shakespeare. The end-to-end settings were chosen on validation ppl: scale "
                     "lr 1e-4 gave 15.844 (wiki 1.156x, row recipe_w3g64_slr1e-4), 2e-4 15.663; "
                     "training the weights too (optim.trainable=all, lr 1e-4, 60 steps) 16.816 "
                     "against 16.040 for scales only: not taken. Next: out of domain (1.369x) is "
                     "the larger gap; a scale lr above 2e-4 is untried.",
    "recipe W2 g64": "Measured 2026-12-07 night (128 x 6 blocks, 140 KD steps training weights "
                     "and scales under bf16 autocast, 51 min): 1.751x (validation 1.773x); in "
                     "float32 only 90 steps fit (row recipe_w2g64_fp32: 1.846x, validation "
                     "25.414 against 24.219), so on a CPU without native bf16 the bar needs the "
                     "time found elsewhere. Out of domain it is 3.57x. ParetoQ's stretched 2-bit "
                     "levels need a half-integer zero point, which pack-quantized's int32 zero "
                     "points cannot store: not exportable, not built.",
}


def _load(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else []


def _best(rows: list[dict], bits: int) -> dict | None:
    """The best QAT + KD row at `bits` (any start or learning rate; not the pruned one)."""
    kd = [r for r in rows if r.get("bits") == bits and str(r.get("method", "")).startswith("qat_kd")]
    return min(kd, key=lambda r: r["ppl"]) if kd else None


def _evidence(rows: list[dict], bits: int) -> str:
    """What the quality table measured at `bits`: the best PTQ and every QAT + KD row's loss."""
    ptq = [r for r in rows if r.get("bits") == bits and r.get("method") in ("gptq", "awq")]
    parts = [f"best PTQ {min(ptq, key=lambda r: r['ppl'])['method']} "
             f"{min(r['ppl'] for r in ptq):.3f}"] if ptq else []
    for r in rows:
        if r.get("bits") == bits and str(r.get("method", "")).startswith("qat_kd"):
            loss = (f", KD loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}"
                    if r.get("first_loss") is not None else "")
            parts.append(f"{r['name']} {r['ppl']:.3f} ({r.get('steps')} steps{loss})")
    return "Measured: " + "; ".join(parts) + "." if parts else ""


def _recovered(rows: dict[str, dict], name: str, bits: int, fp: float) -> float | None:
    rtn, row = rows.get(f"rtn_w{bits}g64"), rows.get(name)
    return (rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - fp) if rtn and row else None


def quality_goals(rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows}
    fp = next((r["fp_ppl"] for r in rows if r.get("fp_ppl")), None)
    out = []
    w4, w3, w2 = _best(rows, 4), _best(rows, 3), _best(rows, 2)
    if w4 and fp:
        out.append({"goal": "W4 g64", "target": "QAT + KD ppl within 2% of float",
                    "measured": f"{w4['ppl']:.3f} vs float {fp:.3f}: "
                                f"{100 * (w4['ppl'] / fp - 1):+.1f}% ({w4['name']})",
                    "met": w4["ppl"] <= 1.02 * fp, "evidence": _evidence(rows, 4)})
        gptq_start = _recovered(by_name, "qat_kd_w3g64", 3, fp)
        awq_start = _recovered(by_name, "qat_kd_w3g64_awq_lr1e-4", 3, fp)
        if gptq_start is not None and awq_start is not None:
            out[-1]["evidence"] += (f" At W3 the same 40 steps recovered {100 * gptq_start:.0f}% of "
                                    f"the RTN gap from GPTQ at lr 5e-5 and {100 * awq_start:.0f}% "
                                    "from AWQ at lr 1e-4.")
    gptq3, rtn3 = by_name.get("gptq_w3g64"), by_name.get("rtn_w3g64")
    if w3 and fp and gptq3 and rtn3:
        recovered = (rtn3["ppl"] - w3["ppl"]) / (rtn3["ppl"] - fp)
        out.append({"goal": "W3 g64", "target": "QAT + KD better than GPTQ, >= 80% of the RTN gap",
                    "measured": f"{w3['ppl']:.3f} vs GPTQ {gptq3['ppl']:.3f}; recovered "
                                f"{100 * recovered:.0f}% ({w3['name']})",
                    "met": w3["ppl"] < gptq3["ppl"] and recovered >= 0.8,
                    "evidence": _evidence(rows, 3)})
    gptq2 = by_name.get("gptq_w2g64")
    if w2 and fp and gptq2:
        out.append({"goal": "W2 g64", "target": "QAT + KD better than GPTQ, ppl <= 2x float",
                    "measured": f"{w2['ppl']:.1f} vs GPTQ {gptq2['ppl']:.1f}; "
                                f"{w2['ppl'] / fp:.1f}x float ({w2['name']})",
                    "met": w2["ppl"] < gptq2["ppl"] and w2["ppl"] <= 2 * fp,
                    "evidence": _evidence(rows, 2)})
    return out


BLOCK_BARS = {4: (1.08, True), 3: (1.25, False), 2: (5.0, True)}  # issue 15: x float, below best PTQ
BLOCK_MINUTES = 60


def block_goals(rows: list[dict]) -> list[dict]:
    """Issue 15: the best block_qat_kd row per width against its bar, under 60 minutes on 2 cores."""
    fp = next((r["fp_ppl"] for r in rows if r.get("fp_ppl")), None)
    out = []
    for bits, (ratio, below_ptq) in BLOCK_BARS.items():
        block = [r for r in rows if r.get("bits") == bits
                 and str(r.get("method", "")).startswith("block_qat_kd")]
        if not block or not fp:
            continue
        best = min(block, key=lambda r: r["ppl"])
        # PTQ results: the table's PTQ rows and the starts the block rows measured (ptq_ppl)
        ptq = [r["ppl"] for r in rows if r.get("bits") == bits and r.get("method") in ("gptq", "awq")]
        ptq += [r["ptq_ppl"] for r in block if r.get("ptq_ppl")]
        minutes = best["seconds"] / 60
        met = best["ppl"] <= ratio * fp and minutes < BLOCK_MINUTES
        if below_ptq:
            met = met and best["ppl"] < min(ptq)
        e2e = [r for r in rows if r.get("bits") == bits and str(r.get("method", "")).startswith(
            ("qat_kd", "kd_same_time"))]
        alone = min(e2e, key=lambda r: r["ppl"]) if e2e else None
        out.append({"goal": f"block-wise W{bits} g64",
                    "target": f"<= {ratio}x float" + (", below the best PTQ" if below_ptq else "")
                              + f", < {BLOCK_MINUTES} min",
                    "measured": f"{best['ppl']:.3f} = {best['ppl'] / fp:.3f}x float, best PTQ "
                                f"{min(ptq):.3f}, {minutes:.0f} min ({best['name']})"
                                + (f"; end-to-end alone best {alone['ppl']:.3f} ({alone['name']}, "
                                   f"{alone['seconds'] / 60:.0f} min)" if alone else ""),
                    "met": met})
    return out


# issue 34: each recipe's own row (bench/quality.py recipe_w*g64) against its bar, wiki and
# Shakespeare perplexity over float (None: reported, no bar), under 60 minutes alone on 2 cores
RECIPE_BARS = {4: (1.03, 1.10), 3: (1.15, None), 2: (1.8, None)}


def recipe_goals(rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows}
    out = []
    for bits, (wiki, shakespeare) in RECIPE_BARS.items():
        target = (f"<= {wiki}x float" + (f", Shakespeare <= {shakespeare}x" if shakespeare else "")
                  + f", < {BLOCK_MINUTES} min alone")
        goal = {"goal": f"recipe W{bits} g64", "target": target, "measured": "not measured",
                "met": None}
        r = by_name.get(f"recipe_w{bits}g64")
        if r is not None:
            ratio, ood = r["ppl"] / r["fp_ppl"], r["shakespeare_ppl"] / r["fp_shakespeare_ppl"]
            load = max(r.get("load_average", [0.0]))
            goal["measured"] = (f"{r['ppl']:.3f} = {ratio:.3f}x float; Shakespeare "
                                f"{r['shakespeare_ppl']:.3f} = {ood:.3f}x; validation "
                                f"{r['val_ppl']:.3f} (float {r['fp_val_ppl']:.3f}); "
                                f"{r['seconds'] / 60:.0f} min, load average <= {load:.1f}"
                                + (f", {r['machine'].split(',')[0]}" if r.get("machine") else ""))
            goal["met"] = (ratio <= wiki and (shakespeare is None or ood <= shakespeare)
                           and r["seconds"] < 60 * BLOCK_MINUTES and load < 2.5)
        out.append(goal)
    return out


def overhead_goals(rows: list[dict]) -> list[dict]:
    out = []
    cpu = next((r for r in rows if "time_ratio" in r), None)
    if cpu:
        from qat_overhead import pair_ratios

        q1, _, q3 = pair_ratios(cpu) or (None, None, None)
        spread = f"; pair ratios {q1}-{q3} (quartiles)" if q1 else ""
        if "qat_parts_share" in cpu:
            spread += (f"; the work QAT adds, timed alone, is {100 * cpu['qat_parts_share']:.1f}% "
                       "of a float step")
        out.append({"goal": "QAT overhead (CPU)", "target": "<= 1.03x step time, <= 1.05x peak memory",
                    "measured": f"{cpu['time_ratio']:.3f}x time, {cpu['memory_ratio']:.3f}x "
                                f"peak RSS ({cpu['steps']} steps each{spread})",
                    "met": cpu["time_ratio"] <= 1.03 and cpu["memory_ratio"] <= 1.05})
    gpu = _load("gpu_qat_overhead")
    out.append({"goal": "QAT overhead (GPU)", "target": "<= 1.15x step time on the device machine",
                "measured": f"{gpu[0]['time_ratio']:.3f}x" if gpu else "not measured",
                "met": gpu[0]["time_ratio"] <= 1.15 if gpu else None})
    return out


def decode_goals(rows: list[dict]) -> list[dict]:
    if not rows:
        return []
    base = rows[0]
    best = max(rows[1:], key=lambda r: r["lean_tokens_per_s"], default=None)
    if best is None:
        return []
    same_loop = best["lean_tokens_per_s"] / base["lean_tokens_per_s"]
    vs_generate = best["lean_tokens_per_s"] / base["tokens_per_s"]
    return [{"goal": "Decode", "target": ">= 2x bf16 tokens/s at <= 0.4x weight memory",
             "measured": f"{best['lean_tokens_per_s']:.1f} tok/s ({best['weights']}): "
                         f"{same_loop:.2f}x bf16 in the same lean loop, {vs_generate:.2f}x bf16 "
                         f"with generate; {best['memory_ratio']:.3f}x memory",
             "met": same_loop >= 2 and best["memory_ratio"] <= 0.4}]


def goals() -> list[dict]:
    """Every goal with its status, recomputed from the result files."""
    out = (recipe_goals(_load("quality")) + block_goals(_load("quality"))
           + quality_goals(_load("quality"))
           + overhead_goals(_load("qat_overhead")) + decode_goals(_load("decode")))
    for g in out:
        g["status"] = {True: "met", False: "missed", None: "not measured"}[g["met"]]
        g["why missed, next step"] = "" if g["met"] else " ".join(
            filter(None, [MISSES.get(g["goal"], ""), g.get("evidence", "")]))
    return out


def goals_section(rows: list[dict]) -> str:
    """The goals section of BENCHMARKS.md (tests/test_goals.py: it must equal what is written)."""
    return ("## Goals (issues 8, 15 and 34) against the result files\n\n"
            "`python bench/goals.py`: each line is recomputed from bench/results/*.json; "
            "recipe rows: each *_kd recipe's own command (issue 34, bench/quality.py "
            "recipe_w*g64, with the Shakespeare set and validation windows on), met only "
            "where it also ran alone (load average below 2.5 on 2 cores); "
            "block-wise rows: the best block_qat_kd row per width (issue 15); QAT + KD rows: "
            "the best end-to-end row per width, whatever its start or learning rate "
            "(issue 8).\n\n"
            + markdown_table(rows, ["goal", "target", "measured", "status",
                                    "why missed, next step"]))


def main() -> None:
    rows = goals()
    update_section("goals", goals_section(rows))
    for g in rows:
        print(f"{g['goal']}: {g['status']} ({g['measured']})")


if __name__ == "__main__":
    main()

"""The quality table: float, RTN, GPTQ, AWQ, QAT (CE) and QAT + KD at W8 / W4 / W3 / W2 g64.

python bench/quality.py                 # run every missing row (hours on 2 cores), then the table
python bench/quality.py --table         # only rebuild the table from bench/results/quality.json
python bench/quality.py qat_kd_w4g64    # run (or rerun) named rows

Every row is one `python train.py ...` run on the default model and eval protocol (its command is
in the table). PTQ rows are `trainer.max_steps=0`; QAT rows state their budget (steps x batch x
sequence length) and wall time. Rows already measured by bench/recipes.py with the same command
are reused, not rerun. recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float) with RTN as the PTQ
reference (torchao's definition).
"""
from __future__ import annotations

import fcntl
import json
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, machine, markdown_table, previous_stamp, update_section,  # noqa: E402
                    write_json)
from recipes import RESULT_FILE as RECIPE_RESULTS  # noqa: E402
from recipes import run_row  # noqa: E402

QAT_STEPS = 40  # 40 x 4 x 256 = 41k tokens: ~15 min per KD run on 2 cores
BASE = {8: "w8", 4: "w4g64", 3: "w3g64", 2: "w2g64"}
METHODS = ("rtn", "gptq", "awq", "qat", "qat_kd")


# the end-to-end KD rows measured before the *_kd recipes gained the block stage and scale-only
# training (2026-12-02): these overrides keep their commands reproducing what ran
PRE_BLOCK_KD = ["blockwise=none", "optim.trainable=weights", "optim.scale_lr=1e-3"]


def overrides(method: str, bits: int) -> list[str]:
    recipe = BASE[bits]
    if method == "rtn":
        return [f"recipe={recipe}", "trainer.max_steps=0"]
    if method in ("gptq", "awq"):
        return [f"recipe={recipe}", "trainer.max_steps=0", f"quant.init={method}"]
    kd = "_kd" if method == "qat_kd" else ""
    # QAT starts where the best cheap PTQ ends (GPTQ, ~5 min of calibration), as EfficientQAT and
    # ModelOpt do: 40 steps cannot undo round-to-nearest's damage at 3 and 2 bits. At 8 bits
    # round-to-nearest is already within 0.1% of float, so those rows start from it.
    init = [] if bits == 8 else ["quant.init=gptq"]
    return [f"recipe={recipe}{kd}", f"trainer.max_steps={QAT_STEPS}", *init,
            *(PRE_BLOCK_KD if kd and bits != 8 else [])]


def _name(method: str, bits: int) -> str:
    return f"{method}_{BASE[bits].replace('w8', 'w8ch')}"


ROWS = {_name(m, b): (m, b, overrides(m, b)) for b in (4, 3, 2, 8) for m in METHODS}
# optim.scale_lr: w4g64_kd's when the row ran (the recipe's is 1e-4 since issue 34)
ROWS["prune2of4_qat_kd_w4g64"] = ("2:4 + qat_kd", 4, ["recipe=prune2of4_w4g64_kd",
                                                       f"trainer.max_steps={QAT_STEPS}",
                                                       "quant.init=gptq", "optim.scale_lr=1e-3"])
# next steps for the missed goals, measured on the same budget: start from AWQ (the best PTQ here
# at every width) with a learning rate large enough to flip roundings within 40 steps (at 2e-5 to
# 5e-5 Adam moves a weight less than half a grid step in the whole run)
for _bits in (3, 4):
    ROWS[f"qat_kd_w{_bits}g64_awq_lr1e-4"] = (
        "qat_kd (awq start, lr 1e-4)", _bits,
        [f"recipe=w{_bits}g64_kd", f"trainer.max_steps={QAT_STEPS}", "quant.init=awq",
         "optim.lr=1e-4", *PRE_BLOCK_KD])
# block-wise QAT (issue 15): the *_kd recipes (start, block stage, end-to-end KD of the scales) at
# a larger budget than the default run's; `block_qat` rows are the same runs' ppl after the block
# stage (metrics.json blockwise.ppl, measured before their end-to-end stage), with the wall time up
# to there; `kd_same_time` rows are end-to-end KD alone from the same start with as many steps as
# fit the block_qat_kd row's wall time (the ablation)
# (block lr 3e-4: the default when these rows ran; 1e-3 since the sweep of 2026-12-02 evening)
BLOCK_BUDGET = ["blockwise.samples=128", "blockwise.epochs=4", "trainer.max_steps=20",
                "blockwise.lr=3e-4"]
# end-to-end KD alone trains the weights at lr 1e-4 (the best end-to-end setting measured:
# qat_kd_w3g64_awq_lr1e-4), as many steps as fit the block_qat_kd row's wall time
# W4: 1936 s of block_qat_kd_w4g64 at 11.75 s a step; W2: 1919 s less AWQ (190 s) and the evals
KD_SAME_TIME_STEPS = {4: 150, 3: 100, 2: 140}
# the W3 rows before block_qat_kd_w3g64_awq ran the w3g64_kd recipe's earlier GPTQ start, pinned
# here so that their commands still reproduce them
W3_GPTQ_START = ["quant.init=gptq"]
# the w3g64_kd and w2g64_kd recipes' end-to-end scale lr before 2026-12-07 (2e-4 since), pinned in
# the rows measured before so that their commands still reproduce them
SCALE_LR_BEFORE = ["optim.scale_lr=1e-4"]
# the w2g64_kd recipe's end-to-end stage trained the scales alone before 2026-12-07 evening
W2_SCALES_BEFORE = ["optim.trainable=scales"]
# rows calibrated by GPTQ before act order became its default (2026-12-02) pin it off
NO_ACT_ORDER = ["ptq.act_order=false"]
for _row in ("gptq_w2g64", "gptq_w8ch", *(f"{m}_w{b}g64" for m in ("qat", "qat_kd") for b in (4, 3, 2)),
               "prune2of4_qat_kd_w4g64"):
    ROWS[_row][2].extend(NO_ACT_ORDER)
for _bits in (4, 3, 2):
    ROWS[f"block_qat_kd_w{_bits}g64"] = ("block_qat_kd", _bits,
                                         [f"recipe=w{_bits}g64_kd", *BLOCK_BUDGET]
                                         + (W3_GPTQ_START if _bits == 3 else [])
                                         + (SCALE_LR_BEFORE if _bits < 4 else [])
                                         + (W2_SCALES_BEFORE if _bits == 2 else []))
    ROWS[f"block_qat_w{_bits}g64"] = ("block_qat", _bits, ROWS[f"block_qat_kd_w{_bits}g64"][2])
    ROWS[f"kd_same_time_w{_bits}g64"] = (
        "kd_same_time", _bits, [f"recipe=w{_bits}g64_kd", "blockwise=none",
                                f"trainer.max_steps={KD_SAME_TIME_STEPS[_bits]}",
                                "optim.trainable=weights", "optim.lr=1e-4",
                                *(SCALE_LR_BEFORE if _bits < 4 else [])])
# W3: after the block stage, end-to-end KD of the weights (not only the scales), 60 steps
for _what in ("weights", "all"):
    ROWS[f"block_qat_kd_w3g64_{_what}"] = (
        f"block_qat_kd (e2e {_what}, lr 1e-4)", 3,
        ["recipe=w3g64_kd", *BLOCK_BUDGET[:2], "trainer.max_steps=60", f"optim.trainable={_what}",
         "optim.lr=1e-4", *W3_GPTQ_START, "blockwise.lr=3e-4", *SCALE_LR_BEFORE])
# W3 from the AWQ start with a higher block learning rate and more epochs (best in
# bench/block_sweep.py: 0.0526 vs 0.0626 for the GPTQ start at the defaults), 32 samples (the
# default then): the w3g64_kd recipe's settings since it measured best (its overrides spell them out)
ROWS["block_qat_kd_w3g64_awq"] = ("block_qat_kd (awq start, block lr 1e-3 x 6 epochs)", 3,
                                  ["recipe=w3g64_kd", "quant.init=awq", "blockwise.lr=1e-3",
                                   "blockwise.epochs=6", "trainer.max_steps=20",
                                   "blockwise.samples=32", *SCALE_LR_BEFORE])
# W2 at the block lr the sweep found best (1e-3, the default since): the same budget otherwise
ROWS["block_qat_kd_w2g64_lr1e-3"] = ("block_qat_kd (block lr 1e-3)", 2,
                                     ["recipe=w2g64_kd", *BLOCK_BUDGET[:3], *SCALE_LR_BEFORE,
                                      *W2_SCALES_BEFORE])
# W4 at the block lr the sweep found best (1e-3, the default since): the w4g64_kd recipe with the
# row budget (bench/block_sweep.py: 0.0144 vs 0.0160 at 3e-4 on the first 3 blocks)
ROWS["block_qat_kd_w4g64_lr1e-3"] = ("block_qat_kd (block lr 1e-3)", 4,
                                     ["recipe=w4g64_kd", *BLOCK_BUDGET[:3]])
# issue 34: each *_kd recipe as the command in its header runs it (its quality settings) with the
# measurement flags: the Shakespeare set (never trained or calibrated on) and 32 validation windows
# cut from the end of the training split, the score settings are chosen on (never the reported
# windows; they leave the run 16k of its ~1.1M training tokens fewer). bench/goals.py: the bars
MEASURE = ["data.ood=shakespeare", "data.val_windows=32"]
for _bits in (4, 3, 2):
    ROWS[f"recipe_w{_bits}g64"] = (f"recipe w{_bits}g64_kd", _bits,
                                   [f"recipe=w{_bits}g64_kd", *MEASURE])
# W4 before its block stage doubled its samples (128 x 4 -> 256 x 3, 60 -> 90 end-to-end steps;
# chosen on validation ppl, 14.276 -> 14.188); recipe_w4g64 ran as `recipe=w4g64_kd
# blockwise.samples=256 blockwise.epochs=3 trainer.max_steps=90` before the recipe took those values
# (its `ran_as`), and these rows as the recipe before (their `ran_as`): the same composed configs
W4_128X4 = ["recipe=w4g64_kd", "blockwise.samples=128", "blockwise.epochs=4"]
ROWS["recipe_w4g64_b128x4"] = ("recipe w4g64_kd, blocks 128 x 4, 60 steps", 4,
                               [*W4_128X4, "trainer.max_steps=60", *MEASURE])
# W4 at 128 x 4 with its end-to-end stage training the weights too (optim.trainable=all, lr 5e-5)
# for twice the steps, the rest of the 60 minutes: not taken (validation ppl equal, KL worse)
ROWS["recipe_w4g64_e2e_all"] = ("recipe w4g64_kd, e2e all at lr 5e-5 x 120 steps", 4,
                                [*W4_128X4, "optim.trainable=all", "optim.lr=5e-5",
                                 "trainer.max_steps=120", *MEASURE])
# W3: the recipe before its end-to-end scale step doubled (optim.scale_lr 1e-4 -> 2e-4, chosen on
# validation ppl, 15.844 -> 15.663); recipe_w3g64 ran as `recipe=w3g64_kd optim.scale_lr=2e-4`
# before the recipe took that value (the same composed config: its `ran_as`)
ROWS["recipe_w3g64_slr1e-4"] = ("recipe w3g64_kd, e2e scale lr 1e-4", 3,
                                ["recipe=w3g64_kd", "optim.scale_lr=1e-4", *MEASURE])
# W4 at 128 x 4 and the W3 recipe's end-to-end scale step (optim.scale_lr 2e-4): validation 14.269
# against 14.276, KL 0.0943 against 0.0898: a tie, not taken
ROWS["recipe_w4g64_slr2e-4"] = ("recipe w4g64_kd, e2e scale lr 2e-4", 4,
                                [*W4_128X4, "trainer.max_steps=60", "optim.scale_lr=2e-4",
                                 *MEASURE])
# W2 before its end-to-end stage grew (40 -> 90 steps, scale lr 1e-4 -> 2e-4, chosen on validation
# ppl, 29.930 -> 26.958); recipe_w2g64_scales ran as `recipe=w2g64_kd optim.scale_lr=2e-4
# trainer.max_steps=90` before the recipe took those values (its `ran_as`)
ROWS["recipe_w2g64_e2e40"] = ("recipe w2g64_kd, 40 steps at scale lr 1e-4", 2,
                              ["recipe=w2g64_kd", "optim.trainable=scales", "optim.scale_lr=1e-4",
                               "trainer.max_steps=40", *MEASURE])
# W2 before its end-to-end stage trained the weights too (optim.trainable scales -> all, chosen on
# validation ppl, 26.958 -> 25.414); recipe_w2g64 ran as `recipe=w2g64_kd optim.trainable=all`
ROWS["recipe_w2g64_scales"] = ("recipe w2g64_kd, e2e scales only", 2,
                               ["recipe=w2g64_kd", "optim.trainable=scales", *MEASURE])
# W2 before its end-to-end stage ran under bf16 autocast (trainer.precision auto, bf16-mixed on this
# AVX-512 BF16 CPU: 1.5x faster a step) and spent the time saved on steps (90 -> 140; chosen on
# validation ppl, 25.414 -> 24.219); recipe_w2g64 ran as `recipe=w2g64_kd
# trainer.precision=bf16-mixed trainer.max_steps=140` (its `ran_as`)
ROWS["recipe_w2g64_fp32"] = ("recipe w2g64_kd, e2e float32, 90 steps", 2,
                             ["recipe=w2g64_kd", *MEASURE])
# W4 on the asymmetric grid (integer zero points: 4.3125 stored bits per weight against 4.25; the
# first 3 blocks' held-out error 0.0112 against 0.0134 at 256 x 3, bench/block_sweep.py): better on
# validation (14.051 against 14.188), wiki and Shakespeare, in float32 for 90 steps
ROWS["recipe_w4g64_asym"] = ("recipe w4g64_kd, asymmetric, e2e float32 x 90 steps", 4,
                             ["recipe=w4g64_kd", "quant.weight.symmetric=false", *MEASURE])
# W4 before the w4g64_kd recipe went asymmetric and its end-to-end stage ran under bf16 autocast
# for 150 steps (chosen on validation ppl, 14.188 -> 14.051 -> 14.028); recipe_w4g64 ran as
# `recipe=w4g64_kd quant.weight.symmetric=false trainer.precision=auto trainer.max_steps=150` (its
# `ran_as`); these two rows pin the recipe as it was (W4_BEFORE, below)
ROWS["recipe_w4g64_sym"] = ("recipe w4g64_kd, symmetric, e2e float32 x 90 steps", 4,
                            ["recipe=w4g64_kd", *MEASURE])
# mixed precision (issue 34): per-block widths chosen by sensitivity under a stored-bits budget,
# the W2 recipe's schedule; the budget halfway between the uniform W2 and W3 rows' stored bits
UNIFORM = [f"recipe_w{b}g64" for b in (2, 3, 4)]
MIXED = {"mixed_w2w3_2.789": ("recipe w2g64_kd, widths 2|3 at 2.789 bits", 2,
                              ["recipe=w2g64_kd", "quant.budget_bits=2.789",
                               "quant.budget_choices=[2,3]", *MEASURE])}
ROWS.update(MIXED)

def pin_before(recipe: str, current: str, before: dict[str, str]) -> None:
    """Rows of `recipe` measured before its defaults moved (all but `current`, the recipe's own row)
    get each `before` value they do not set themselves, so their commands still reproduce them."""
    seen: set[int] = set()
    for row, (_, _, ov) in ROWS.items():
        if f"recipe={recipe}" in ov and row != current and id(ov) not in seen:
            seen.add(id(ov))  # block_qat_* shares block_qat_kd_*'s list
            ov.extend(f"{key}={value}" for key, value in before.items()
                      if not any(o.startswith(f"{key}=") for o in ov))


# the w2g64_kd recipe's end-to-end stage ran in float32 for 90 steps before 2026-12-07 night
# (trainer.precision=auto and 140 steps since)
pin_before("w2g64_kd", "recipe_w2g64", {"trainer.precision": "32-true", "trainer.max_steps": "90"})
# the w4g64_kd recipe trained the symmetric grid in float32 for 90 end-to-end steps before
# 2026-12-08 (asymmetric, trainer.precision=auto and 150 steps since)
pin_before("w4g64_kd", "recipe_w4g64", {"quant.weight.symmetric": "true",
                                        "trainer.precision": "32-true", "trainer.max_steps": "90"})
DERIVED = {f"block_qat_w{b}g64": f"block_qat_kd_w{b}g64" for b in (4, 3, 2)}
# rows measured by resuming another row's finished block stage (the same config, so the same
# blocks: the resume test checks that to tolerance 0); their wall time adds that row's block part
RESUMED = {"block_qat_kd_w3g64_weights": "block_qat_kd_w3g64",
           "block_qat_kd_w3g64_all": "block_qat_kd_w3g64"}
# cheapest first, then the rows the goals are about
ORDER = ([n for n in ROWS if n.startswith("rtn")] + ["gptq_w3g64", "qat_kd_w3g64", "qat_kd_w4g64",
         "qat_kd_w2g64", "gptq_w4g64", "gptq_w2g64"]
         + [n for n in ROWS if n.startswith(("awq", "qat_w", "gptq_w8", "qat_kd_w8"))]
         + ["prune2of4_qat_kd_w4g64", "qat_kd_w3g64_awq_lr1e-4", "qat_kd_w4g64_awq_lr1e-4"]
         + [f"{m}_w{b}g64" for b in (4, 3, 2) for m in ("block_qat_kd", "kd_same_time")]
         + [n for n in ROWS if n.startswith("recipe_")] + list(MIXED))
RESULT_FILE = RESULTS / "quality.json"
BITS_PLOT = RESULTS / "quality_bits.png"
QUICK_EVAL = RESULTS / "quick_eval.json"  # bench/quick_eval.py: KL, top-1, cloze of the exports


def block_stage_row(name: str, full: dict) -> dict:
    """The `block_qat` row inside a `block_qat_kd` run: its ppl after the block stage and the wall
    time up to there (calibration, the PTQ-start eval and the block stage)."""
    section = full["blockwise"]
    seconds = full.get("ptq_seconds", 0) + section["seconds"]
    return {"name": name, "command": full["command"] + "  (ppl after its block stage)",
            "ppl": section["ppl"], "fp_ppl": full.get("fp_ppl"), "scheme": full.get("scheme"),
            "ptq_ppl": full.get("ptq_ppl"), "blockwise": section, "seconds": round(seconds),
            "block_seconds": section["seconds"], "steps": 0, "train_seconds": 0,
            "derived_from": full["name"]}


def _known() -> dict[str, dict]:
    """Rows of this table, plus runs of bench/recipes.py with an identical command."""
    rows = {r["name"]: r for r in json.loads(RESULT_FILE.read_text())} if RESULT_FILE.exists() else {}
    for name, source in DERIVED.items():
        if source in rows and rows[source].get("blockwise"):
            rows[name] = block_stage_row(name, rows[source])
    if RECIPE_RESULTS.exists():
        by_command = {r["command"]: r for r in json.loads(RECIPE_RESULTS.read_text())}
        for name, (_, _, ov) in ROWS.items():
            found = by_command.get("python train.py " + " ".join(ov))
            if name not in rows and found:
                rows[name] = dict(found, name=name)
    return rows


def stored_bits(row: dict) -> float | None:
    """Stored bits per quantized weight: the run's own (metrics since issue 34), else the uniform
    width's: one bf16 scale per 64 weights (per output row for W8), a packed zero point if asym."""
    if row.get("bits_per_weight"):
        return row["bits_per_weight"]
    if row.get("bits") is None:
        return None
    if row["bits"] == 8:
        return 8.023  # one bf16 scale per row of 576 (1536 for down_proj) inputs
    from qat.eval.footprint import estimated_bits_per_weight
    from qat.eval.report import parse_scheme

    spec = parse_scheme(row.get("scheme", "")) or parse_scheme(f"W{row['bits']} g64 sym")
    return estimated_bits_per_weight(spec)


def _bpw(row: dict) -> str:
    bits = stored_bits(row)
    return "" if bits is None else f"{bits:.3f}"


def uniform_line(points: list[tuple[float, float]], bits: float) -> float | None:
    """The ppl of the straight line between the two uniform widths around `bits` (None outside
    them): the bar a mixed-precision point has to beat to count."""
    for (lo, lo_ppl), (hi, hi_ppl) in zip(points, points[1:]):
        if lo <= bits <= hi:
            return lo_ppl + (hi_ppl - lo_ppl) * (bits - lo) / (hi - lo)
    return None


def bits_section(rows: dict[str, dict]) -> str:
    """Quality against stored bits per weight: the recipe rows (one width each) and the mixed
    rows, each judged against the uniform line; the same points drawn in BITS_PLOT."""
    uniform = sorted((stored_bits(rows[n]), rows[n]["ppl"]) for n in UNIFORM if n in rows)
    out = []
    for name in [*UNIFORM, *MIXED]:
        r = rows.get(name)
        if r is None:
            continue
        bits, fp = stored_bits(r), r.get("fp_ppl")
        line = uniform_line(uniform, bits) if name in MIXED else None
        verdict = "" if name not in MIXED else "outside the uniform range" if line is None else \
            f"{'beats' if r['ppl'] < line else 'misses'} the line by {100 * abs(1 - r['ppl'] / line):.1f}%"
        shakespeare = r.get("shakespeare_ppl"), r.get("fp_shakespeare_ppl")
        out.append({"row": name, "scheme": r.get("scheme", ""), "bits/weight": f"{bits:.3f}",
                    "ppl": f"{r['ppl']:.3f}", "x float": f"{r['ppl'] / fp:.3f}" if fp else "",
                    "Shakespeare x float": f"{shakespeare[0] / shakespeare[1]:.3f}"
                    if all(shakespeare) else "",
                    "uniform line": f"{line:.3f}" if line else "", "verdict": verdict,
                    "command": f"`{r['command']}`"})
    if not out:
        return ""
    _plot_bits(rows, uniform)
    return ("## Quality against stored bits per weight (issue 34)\n\n"
            "Stored bits per quantized weight count the codes, the bf16 scales and the packed zero "
            "points (what `quant.budget_bits` holds a mixed run to). A mixed-precision row counts "
            "only where it beats the straight line between the uniform recipe rows around it "
            f"(`uniform line`). Plot: `{BITS_PLOT.relative_to(RESULTS.parent.parent)}`.\n\n"
            + markdown_table(out, ["row", "scheme", "bits/weight", "ppl", "x float",
                                   "Shakespeare x float", "uniform line", "verdict", "command"]))


def _plot_bits(rows: dict[str, dict], uniform: list[tuple[float, float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*uniform), "o-", color="tab:blue", label="uniform width (recipe rows)")
    mixed = [(stored_bits(rows[n]), rows[n]["ppl"], n) for n in MIXED if n in rows]
    if mixed:
        ax.plot([m[0] for m in mixed], [m[1] for m in mixed], "s", color="tab:orange",
                label="mixed precision")
    for bits, ppl, name in mixed:
        ax.annotate(name, (bits, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    fp = next((r["fp_ppl"] for r in rows.values() if r.get("fp_ppl")), None)
    if fp:
        ax.axhline(fp, color="black", linestyle=":", label=f"float ({fp:.2f})")
    ax.set_xlabel("stored bits per quantized weight (scales and zero points counted)")
    ax.set_ylabel("wiki perplexity (lower is better)")
    ax.set_title("SmolLM2-135M: quality against stored bits")
    ax.legend()
    temporary = BITS_PLOT.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(temporary, metadata={"Software": None})
    temporary.replace(BITS_PLOT)


def table(rows: dict[str, dict]) -> str:
    fp = next((r["fp_ppl"] for r in rows.values() if r.get("fp_ppl")), None)
    out = [{"method": "float", "bits": 16, "ppl": f"{fp:.3f}" if fp else "", "command":
            "(fp_ppl of every run)"}]
    order = list(ROWS)  # by width as the table reads, each width's rows in ROWS order, 2:4 last
    for name in sorted(ROWS, key=lambda n: (n.startswith("prune"), (4, 3, 2, 8).index(ROWS[n][1]),
                                            order.index(n))):
        r = rows.get(name)
        if r is None:
            continue
        method, bits, _ = ROWS[name]
        rtn = rows.get(_name("rtn", bits))
        recovered = ""
        # no gap to recover where RTN is within 1% of float (W8): the ratio would be noise
        # and none for 2:4, whose loss is mostly the pruning, not the grid RTN is a baseline of
        if rtn and method != "rtn" and not name.startswith("prune") and fp and rtn["ppl"] > 1.01 * fp:
            recovered = f"{100 * (rtn['ppl'] - r['ppl']) / (rtn['ppl'] - fp):.0f}%"
        budget = (f"{r['steps']} x 4 x 256, {r['train_seconds'] / 60:.0f} min"
                  if r.get("steps") else "calibration only" if method in ("gptq", "awq") else "-")
        if r.get("blockwise"):
            b = r["blockwise"]
            budget = (f"block stage {b['samples']} x {b['tokens'] // b['samples']}, "
                      f"{b['seconds'] / 60:.0f} min" + (f"; e2e {budget}" if r.get("steps") else ""))
        if r.get("seconds"):
            budget += f"; wall {r['seconds'] / 60:.0f} min"
        out.append({"method": method, "bits": bits, "scheme": r.get("scheme", ""),
                    "bits/weight": _bpw(dict(r, bits=bits)), "ppl": f"{r['ppl']:.3f}",
                    "vs float": f"{100 * (r['ppl'] / fp - 1):+.1f}%" if fp else "",
                    "recovered vs RTN": recovered, **quality_cells(name, r), "budget": budget,
                    "command": f"`{r['command']}`"})
    return markdown_table(out, ["method", "bits", "scheme", "bits/weight", "ppl", "vs float",
                                "recovered vs RTN", "KL mean", "top-1", "cloze", "budget",
                                "command"])


def quality_cells(name: str, row: dict) -> dict:
    """KL to the float model, top-1 agreement and cloze accuracy on the wiki protocol: the
    run's own final evaluation (metrics.json, runs since issue 33), else bench/quick_eval.py's
    evaluation of the same command's export."""
    found = {k: row[k] for k in ("kl_mean", "top1", "cloze_acc") if row.get(k) is not None}
    if not found and QUICK_EVAL.exists():
        quick = {r["name"]: r for r in json.loads(QUICK_EVAL.read_text())}
        if name in quick:
            found = quick[name]["eval"]["results"]["eval"]
    return {"KL mean": f"{found['kl_mean']:.4f}" if "kl_mean" in found else "",
            "top-1": f"{100 * found['top1']:.1f}%" if "top1" in found else "",
            "cloze": f"{100 * found['cloze_acc']:.1f}%" if "cloze_acc" in found else ""}


def record_resumed(name: str, run_dir: str, seconds: int) -> None:
    """A RESUMED row from its run dir; wall = this run's + the whole source row's (an upper
    bound: the source's own end-to-end stage and final evaluations are counted too)."""
    source = _known()[RESUMED[name]]
    method, bits, ov = ROWS[name]
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    row = dict(metrics, name=name, command="python train.py " + " ".join(ov), method=method,
               bits=bits, seconds=seconds + source["seconds"], resumed_from=source["name"],
               resumed_seconds=seconds, resumed_blockwise=metrics.get("blockwise"),
               blockwise=source["blockwise"])  # the block stage that trained these blocks
    with _locked():
        _write(dict(_known(), **{name: row}))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--record"]:  # --record NAME RUN_DIR SECONDS
        record_resumed(argv[1], argv[2], int(argv[3]))
        return
    global STAMP
    if argv != ["--table"]:
        STAMP = machine()
        known = _known()
        todo = argv or [n for n in ORDER if n not in known]
        for name in todo:
            if name in DERIVED or name in RESUMED:
                continue  # comes with its block_qat_kd run / is recorded with --record
            method, bits, ov = ROWS[name]
            print(f"== {name}: python train.py {' '.join(ov)}", flush=True)
            row = dict(run_row(name, ov), method=method, bits=bits)
            if "data.ood=shakespeare" in ov:  # the names issue 34's rows are read by
                row.update(shakespeare_ppl=row["ood_ppl"], fp_shakespeare_ppl=row["fp_ood_ppl"])
            print(f"   ppl {row['ppl']:.3f} ({row['seconds']} s)", flush=True)
            with _locked():  # rows may finish in other processes meanwhile: merge, never drop
                _write(dict(_known(), **{name: row}))
    with _locked():
        _write(_known())


@contextmanager
def _locked():
    """An exclusive lock around reading and rewriting the results, for processes running rows side
    by side (python bench/quality.py ROW in two shells)."""
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULT_FILE.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


STAMP = previous_stamp("quality")


def _write(rows: dict[str, dict]) -> None:
    for name, r in rows.items():
        r.setdefault("method", ROWS[name][0])
        r.setdefault("bits", ROWS[name][1])
    write_json(RESULT_FILE, [rows[n] for n in ROWS if n in rows])
    update_section("quality", "## Quality table\n\n"
                   f"`python bench/quality.py` on {STAMP or machine()}. Default model "
                   "(SmolLM2-135M), eval "
                   "protocol of `../shared/reference/eval-protocol.md` (wiki, 64 windows of 512); "
                   "QAT budget = optimizer steps x batch x sequence length and the training wall "
                   "time (the GPTQ start adds ~5 min of calibration, more while other jobs "
                   "share the 2 cores). QAT rows start from GPTQ (`quant.init=gptq`; W8 from "
                   "round-to-nearest, already within 0.1% of float) with each recipe's "
                   "learning rate (W8 and W4 2e-5, W3 5e-5, W2 1e-4 with LSQ scales), except "
                   "the rows marked (awq start, lr 1e-4); recovered = (RTN - ppl) / (RTN - float). "
                   "QAT (CE) trains on the corpus's train split, so it also adapts the model to "
                   "the eval domain (W8 QAT ends below the untouched float model); QAT + KD "
                   "matches the float teacher instead. Some rows of 2026-11-29 ran beside another "
                   "row or the test suite: their wall times are upper bounds. Block-wise rows (issue 15, "
                   "2026-12-02): `block_qat_kd` = the *_kd recipe (start, block stage, end-to-end "
                   "KD of the scales) at the budget in its command; `block_qat` = the same run's "
                   "ppl after its block stage; the W4 row ran beside the test suite for ~5 of its "
                   "32 minutes, the W3 row beside architecture probes and the test suite (load "
                   "average 3-5 for most of its 36 minutes), the W2 row partly beside the test "
                   "suite (load 2-5): wall times are upper bounds. `block_qat_kd (e2e weights)` "
                   "resumed the W3 row's finished block stage (same config, so the same blocks) "
                   "and trained the weights end to end for 60 steps; its wall time adds the whole "
                   "W3 row's (an upper bound). `kd_same_time` = end-to-end KD alone (weights at lr "
                   "1e-4, from the recipe's start) for the steps that fit the block_qat_kd row's "
                   "wall time; at W3 `qat_kd (awq start, lr 1e-4)` (36 min) is that ablation. "
                   "The W3, W2, e2e-weights and kd_same_time rows ran on a 2-core Intel Xeon "
                   "(AVX-512) machine, the rows before them on a 2-core AMD EPYC. GPTQ "
                   "rows dated before 2026-12-02 ran with ptq.act_order=false "
                   "(the default since then is true). The W4 `block_qat_kd (block lr 1e-3)` row "
                   "(2026-12-03) ran alone (load average 0.0 at its start). KL mean (nats per "
                   "token, to the float model), top-1 agreement and cloze accuracy (wiki): the "
                   "run's final evaluation, else bench/quick_eval.py's evaluation of an export "
                   "of the same command, trained again (section \"Distance to the float model\", "
                   "where its own ppl is: for the GPTQ and AWQ rows that is today's GPTQ "
                   "(act order) and AWQ, lower than the older ppl here); blank where neither "
                   "measured it.\n\n" + table(rows))
    update_section("quality_bits", bits_section(rows))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A sweep's runs side by side: report.md (a table) and report.png (perplexity against size).

A sweep is any directory holding run directories with metrics.json (Hydra multirun: 0_w4g64/,
1_w3g64/, ...), found recursively. Sizes are measured where the run exported (the tensor bytes of
export/model.safetensors, else metrics' export_bytes, the whole export dir) and predicted otherwise
from the layer shapes of the run's model (its .hydra/config.yaml, else the model name in
metrics.json) and the scheme of each layer in quant_report.json.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qat.eval.footprint import (ModelShapes, estimated_bits_per_weight, layer_bytes,
                                model_bytes, model_shapes, safetensors_bytes)
from qat.eval.tables import markdown_table
from qat.quant.spec import WeightSpec

MB = 1e6
SCHEME = re.compile(r"W(\d+) (?:g(\d+)|(per-channel)|(per-tensor)) (sym|asym)")


@dataclass
class RunRow:
    """One run of the sweep, as the table and the plot show it."""

    run: str  # path relative to the sweep dir
    recipe: str
    scheme: str
    ppl: float
    fp_ppl: float | None = None
    ptq_ppl: float | None = None
    bits_per_weight: float | None = None  # over the quantized Linears, scales and zero points in
    size_bytes: float | None = None
    size_source: str = "-"  # export (safetensors tensors) | export dir | predicted | -
    # the distance to the float model and the cloze task (the run's final evaluation, else a
    # qat-eval of the run or its export): None where not measured
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    cloze_acc: float | None = None
    fp_cloze_acc: float | None = None

    def metric(self, name: str) -> float | None:
        return getattr(self, name)

    @property
    def vs_float(self) -> float | None:
        return None if not self.fp_ppl else 100.0 * (self.ppl / self.fp_ppl - 1.0)

    @property
    def recovered(self) -> float | None:
        """Fraction of the PTQ gap closed by training: (ptq - ppl) / (ptq - fp)."""
        if self.ptq_ppl is None or self.fp_ppl is None or self.ptq_ppl == self.fp_ppl:
            return None
        return (self.ptq_ppl - self.ppl) / (self.ptq_ppl - self.fp_ppl)


def parse_scheme(text: str) -> WeightSpec | None:
    """WeightSpec of a scheme string such as 'W4 g64 asym' (WeightSpec.describe's format)."""
    m = SCHEME.search(text)
    if m is None:
        return None
    bits, group, channel, _, sym = m.groups()
    gran = "group" if group else "channel" if channel else "tensor"
    return WeightSpec(bits=int(bits), granularity=gran, group_size=int(group) if group else None,
                      symmetric=sym == "sym")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories (holding metrics.json) under `sweep_dir`, in natural order (2 before 10)."""
    def natural(path: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]
    return sorted((p.parent for p in sweep_dir.rglob("metrics.json")), key=natural)


def _model_source(run_dir: Path, metrics: dict[str, Any]):
    """The run's ModelSpec from .hydra/config.yaml (widths of model=tiny included), else its name."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        from qat.models import ModelSpec

        model = OmegaConf.to_container(OmegaConf.load(config), resolve=True).get("model") or {}
        return ModelSpec(**{k: v for k, v in model.items() if k != "_target_"})
    return metrics.get("model")


class _Shapes:
    """Model shapes per model source, computed once per sweep (a meta-device build each)."""

    def __init__(self) -> None:
        self.cache: dict[str, ModelShapes | None] = {}

    def get(self, source) -> ModelShapes | None:
        key = repr(source)
        if key not in self.cache:
            try:
                self.cache[key] = model_shapes(source) if source else None
            except Exception:  # unknown or unreachable model: fall back to scheme-only estimates
                self.cache[key] = None
        return self.cache[key]


def _layer_specs(run_dir: Path) -> dict[str, WeightSpec]:
    path = run_dir / "quant_report.json"
    if not path.is_file():
        return {}
    layers = json.loads(path.read_text()).get("layers", {})
    return {name: spec for name, text in layers.items() if (spec := parse_scheme(text))}


def _bits_per_weight(specs: dict[str, WeightSpec], shapes: ModelShapes | None) -> float | None:
    if not specs:
        return None
    known = {l.name: l for l in shapes.linears} if shapes else {}
    if known and all(name in known for name in specs):
        stored = sum(b["weight_packed"] + b["weight_scale"] + b["weight_zero_point"]
                     for b in (layer_bytes(known[n], s) for n, s in specs.items()))
        weights = sum(known[n].out_features * known[n].in_features for n in specs)
        return 8.0 * stored / weights
    return statistics.mean(estimated_bits_per_weight(s) for s in specs.values())  # no shapes


def _size(run_dir: Path, metrics: dict, specs: dict[str, WeightSpec],
          shapes: ModelShapes | None) -> tuple[float | None, str]:
    export = Path(metrics.get("export_dir") or run_dir / "export") / "model.safetensors"
    if not export.is_absolute():
        export = run_dir / export
    if export.is_file():
        return float(safetensors_bytes(export)["total"]), "export"
    if metrics.get("export_bytes"):
        return float(metrics["export_bytes"]), "export dir"
    if shapes is None:
        return None, "-"
    if not specs:  # a float run: served in bf16
        return float(shapes.total_params * 2), "predicted (bf16)"
    if any(n not in {l.name for l in shapes.linears} for n in specs):
        return None, "-"  # a layer outside the decoder Linears: shapes unknown here
    return float(model_bytes(shapes, specs)["total"]), "predicted"


# what qat-report can plot against size: the metric, its axis label, whether higher is better
METRICS = {
    "ppl": ("perplexity on the eval set (lower is better)", False),
    "kl_mean": ("mean KL to the float model, nats per token (lower is better)", False),
    "kl_p99": ("99th percentile of the KL to the float model (lower is better)", False),
    "top1": ("top-1 agreement with the float model (higher is better)", True),
    "cloze_acc": ("cloze accuracy, last word of held-out sentences (higher is better)", True),
}
QUALITY = ("kl_mean", "kl_p99", "top1", "cloze_acc")


def quality_of(run_dir: Path, metrics: dict[str, Any]) -> dict[str, float]:
    """The run's KL, top-1 and cloze numbers: its metrics.json's, else those of a qat-eval of
    the run or its export (eval.json, the in-domain set), with the reference's cloze."""
    found = {k: metrics[k] for k in (*QUALITY, "fp_cloze_acc") if metrics.get(k) is not None}
    for path in (run_dir / "eval.json", run_dir / "export" / "eval.json"):
        if len(found) > len(QUALITY) or not path.is_file():
            continue
        evaluated = json.loads(path.read_text())
        result = evaluated.get("results", {}).get("eval", {})
        reference = evaluated.get("reference", {}).get("results", {}).get("eval", {})
        found = {**{k: result[k] for k in QUALITY if k in result},
                 **({"fp_cloze_acc": reference["cloze_acc"]} if "cloze_acc" in reference else {}),
                 **found}
    return found


def run_row(run_dir: Path, sweep_dir: Path, shapes_cache: _Shapes) -> RunRow:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    specs = _layer_specs(run_dir)
    shapes = shapes_cache.get(_model_source(run_dir, metrics))
    size, source = _size(run_dir, metrics, specs, shapes)
    bits = _bits_per_weight(specs, shapes) if specs else (16.0 if metrics.get("scheme") == "float"
                                                          else None)
    return RunRow(run=run_dir.relative_to(sweep_dir).as_posix() or ".",
                  recipe=str(metrics.get("recipe", "?")), scheme=str(metrics.get("scheme", "?")),
                  ppl=float(metrics["ppl"]), fp_ppl=metrics.get("fp_ppl"),
                  ptq_ppl=metrics.get("ptq_ppl"), bits_per_weight=bits, size_bytes=size,
                  size_source=source, **quality_of(run_dir, metrics))


def float_baseline(rows: list[RunRow], shapes: ModelShapes | None) -> dict[str, float | None]:
    """The float model's ppl (median of the runs' fp_ppl, else a float run's ppl) and bf16 size."""
    values = [r.fp_ppl for r in rows if r.fp_ppl] or [r.ppl for r in rows if r.scheme == "float"]
    cloze = [r.fp_cloze_acc for r in rows if r.fp_cloze_acc is not None]
    return {"ppl": statistics.median(values) if values else None,
            "bf16_bytes": float(shapes.total_params * 2) if shapes else None,
            # the float model against itself: KL 0, agreement 1 (where any run measured them)
            "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0,
            "cloze_acc": statistics.median(cloze) if cloze else None}


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _fmt_ppl(value: float | None) -> str:
    """Three decimals, except for the ruined runs (W2 PTQ: millions), which get four digits."""
    return "-" if value is None else format(value, ".3f" if value < 1e4 else ".3e")


def plot_name(metric: str) -> str:
    return "report.png" if metric == "ppl" else f"report_{metric}.png"


def markdown(rows: list[RunRow], baseline: dict, sweep_dir: Path, metric: str = "ppl") -> str:
    headers = ("run", "recipe", "scheme", "bits/weight", "size (MB)", "size from", "ppl",
               "vs float", "PTQ ppl", "PTQ gap recovered")
    quality = [k for k in QUALITY if any(r.metric(k) is not None for r in rows)]
    headers += tuple({"kl_mean": "KL mean", "kl_p99": "KL p99", "top1": "top-1",
                      "cloze_acc": "cloze"}[k] for k in quality)
    table = [(r.run, r.recipe, r.scheme, _fmt(r.bits_per_weight, ".3f"),
              _fmt(None if r.size_bytes is None else r.size_bytes / MB, ",.2f"), r.size_source,
              _fmt_ppl(r.ppl), _fmt(r.vs_float, "+.1f") + ("%" if r.vs_float is not None else ""),
              _fmt_ppl(r.ptq_ppl), _fmt(r.recovered, ".0%"),
              *(_fmt(r.metric(k), ".4f" if k.startswith("kl") else ".1%") for k in quality))
             for r in rows]
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"Float model: ppl {_fmt(baseline['ppl'], '.3f')}, bf16 size "
             f"{_fmt(None if baseline['bf16_bytes'] is None else baseline['bf16_bytes'] / MB, ',.2f')}"
             " MB. MB = 10^6 bytes. bits/weight counts the quantized Linears with their scales and "
             "zero points; size is the whole model (embeddings, lm_head and norms in bf16). "
             "PTQ gap recovered = (PTQ ppl - ppl) / (PTQ ppl - float ppl).", "",
             markdown_table(headers, table), "", f"![{metric} vs size]({plot_name(metric)})", ""]
    return "\n".join(lines)


def build_report(sweep_dir: str | Path) -> tuple[list[RunRow], dict]:
    """Rows for every run under `sweep_dir` and the float baseline.

    Raises:
        FileNotFoundError: no metrics.json anywhere under `sweep_dir`.
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no metrics.json found; is it a sweep (multirun) dir?")
    cache = _Shapes()
    rows = [run_row(r, sweep_dir, cache) for r in runs]
    shapes = next((s for s in cache.cache.values() if s is not None), None)
    return rows, float_baseline(rows, shapes)


def write_report(sweep_dir: str | Path, metric: str = "ppl") -> tuple[Path, Path]:
    """Write report.md, the plot of `metric` against size (report.png for ppl, else
    report_<metric>.png) and report.json into `sweep_dir`; returns (md, png) paths.

    Raises ValueError naming --metric for one it cannot plot, or that no run measured."""
    from qat.eval.plot import plot_sweep
    from qat.io import write_json, write_text

    if metric not in METRICS:
        raise ValueError(f"--metric {metric}: one of {', '.join(METRICS)}")
    sweep_dir = Path(sweep_dir)
    rows, baseline = build_report(sweep_dir)
    if not any(r.metric(metric) is not None for r in rows):
        raise ValueError(f"--metric {metric}: no run under {sweep_dir} measured it (a run's final "
                         "evaluation with eval.kl / eval.cloze_items, or qat-eval RUN_DIR)")
    md, png = sweep_dir / "report.md", sweep_dir / plot_name(metric)
    write_text(md, markdown(rows, baseline, sweep_dir, metric))
    label, _ = METRICS[metric]
    plot_sweep(rows, baseline, png, title=f"{label.split(' (')[0].capitalize()} vs weight size: "
               f"{sweep_dir.name}", metric=metric, ylabel=label)
    write_json(sweep_dir / "report.json", {"baseline": baseline, "runs": [
        {**asdict(r), "vs_float_pct": r.vs_float, "recovered": r.recovered} for r in rows]})
    return md, png

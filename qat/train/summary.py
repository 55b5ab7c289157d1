"""What a run says about itself: the facts at the head of metrics.json and the closing summary."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qat.quant import PrepareReport


def run_facts(cfg: DictConfig, specs, report: PrepareReport | None, measured: dict[str, Any],
              stage_metrics: dict[str, Any], block_report) -> dict[str, Any]:
    """recipe, model, scheme, command, then what was measured before end-to-end training."""
    out: dict[str, Any] = {"recipe": recipe_name(cfg), "model": specs.model.path or specs.model.name,
                           "scheme": scheme(report)}
    if command := command_line():
        out["command"] = command
    out.update({k: v for k, v in measured.items() if k.startswith("fp_")})
    out.update({k: v for k, v in stage_metrics.items() if k in ("ptq_ppl", "block_ppl")})
    if block_report is not None:
        out["blockwise"] = dict(block_report.summary(), ppl=stage_metrics.get("block_ppl"))
    return out


# the eval sets beside the in-domain windows: metrics.json prefix, label
OTHER_SETS = (("ood_", "out-of-domain"), ("val_", "validation"))


def summary(metrics: dict[str, Any], run_dir: Path) -> str:
    rows = [("model", metrics["model"]), ("recipe", metrics["recipe"]),
            ("scheme", metrics["scheme"]), ("steps", metrics["steps"]),
            ("train time", f"{metrics['train_seconds']:.0f} s")]
    staged = "blockwise" in metrics
    for key, label in (("fp_ppl", "float ppl"),
                       ("ptq_ppl", "ppl after quant.init" if staged
                        else "quantized ppl before training"),
                       ("block_ppl", "ppl after block stage"),
                       ("ppl", "ppl after end-to-end" if staged and metrics["steps"]
                        else "ppl after block stage" if staged else "ppl after training"),
                       ("export_ppl", "exported model ppl")):
        if key in metrics:
            rows.append((label, f"{metrics[key]:.3f}"))
    if "fp_ppl" in metrics:
        rows.append(("vs float", f"{100 * (metrics['ppl'] / metrics['fp_ppl'] - 1):+.1f}%"))
    for prefix, label in OTHER_SETS:
        if f"{prefix}ppl" in metrics:
            ppl, fp = metrics[f"{prefix}ppl"], metrics.get(f"fp_{prefix}ppl")
            rows.append((f"{label} ppl", f"{ppl:.3f}" + (
                f" (float {fp:.3f}, {100 * (ppl / fp - 1):+.1f}%)" if fp else "")))
    if "kl_mean" in metrics:
        rows.append(("KL to float", f"{metrics['kl_mean']:.4f} nats/token mean, "
                     f"{metrics['kl_p99']:.3f} p99, {metrics['kl_max']:.2f} max"))
        rows.append(("top-1 vs float", f"{100 * metrics['top1']:.1f}% of tokens"))
    for prefix, label in OTHER_SETS:
        if f"{prefix}kl_mean" in metrics:
            rows.append((label, f"KL {metrics[prefix + 'kl_mean']:.4f} mean, "
                         f"{metrics[prefix + 'kl_p99']:.3f} p99; "
                         f"top-1 {100 * metrics[prefix + 'top1']:.1f}%"))
    if "cloze_acc" in metrics:
        rows.append(("cloze accuracy", (f"{100 * metrics['fp_cloze_acc']:.1f}% float -> "
                                        if "fp_cloze_acc" in metrics else "")
                     + f"{100 * metrics['cloze_acc']:.1f}% ({metrics['cloze_items']} items)"))
    if "sparsity" in metrics:
        rows.append(("sparsity", f"{100 * metrics['sparsity']:.1f}% of pruned layers' weights"
                     + (", N:M kept in export" if metrics.get("export_nm_ok") else "")))
    rows.append(("run dir", str(run_dir)))
    for label, path in (("checkpoint", run_dir / "checkpoints" / "last.ckpt"),
                        ("metrics", run_dir / "metrics.json")):
        rows.append((label, str(path)))
    if metrics.get("export_dir"):
        rows.append(("export", metrics["export_dir"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "== qat summary =="] + [f"{k:<{width}}  {v}" for k, v in rows])


def scheme(report: PrepareReport | None) -> str:
    if report is None:
        return "float"
    return ", ".join(f"{n} x {s}" for s, n in report.schemes().items())


def recipe_name(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices.get("recipe") or "none"
    except Exception:  # composed without Hydra's runtime (tests, notebooks)
        return cfg.get("recipe_name", "none")


def command_line() -> str | None:
    """The command line that made this run (None when composed without Hydra's runtime)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return " ".join(["python train.py", *HydraConfig.get().overrides.task])
    except Exception:  # tests, notebooks
        return None

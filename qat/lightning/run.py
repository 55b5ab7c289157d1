"""`train(cfg)`: the whole run, from a composed Hydra config to checkpoint and metrics.json.

Order matters: everything that can be wrong with the input (config values, paths, patterns, group
sizes, data size) is checked before the first optimizer step, and a run that fails there leaves no
run directory behind.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qat.io import atomic_path, write_json
from qat.lightning.data import DataSpec, TextDataModule
from qat.lightning.module import OptimSpec, QATModule
from qat.models import ModelSpec, load_model
from qat.quant import PrepareReport, QuantConfig, plan, prepare, set_fake_quant_enabled


class ConfigError(ValueError):
    """Bad input found before training started; the message names the field."""


@dataclass
class Specs:
    model: ModelSpec
    data: DataSpec
    quant: QuantConfig
    optim: OptimSpec


def build_specs(cfg: DictConfig) -> Specs:
    """Instantiate and validate every spec; raise ConfigError naming the bad field."""
    specs = {}
    for key in ("model", "data", "quant", "optim"):
        try:
            specs[key] = instantiate(cfg[key])
        except InstantiationException as err:
            cause = err.__cause__ or err
            raise ConfigError(str(cause)) from err
        except MissingMandatoryValue as err:
            raise ConfigError(f"{err.full_key} is required (it is ??? in the config): set "
                              f"{err.full_key}=VALUE on the command line") from err
    max_steps = cfg.trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be an integer >= 0")
    return Specs(**specs)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one QAT job; returns the metrics also written to `<run_dir>/metrics.json`."""
    run_dir = Path(run_dir or _hydra_run_dir())
    try:
        specs = build_specs(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model, tokenizer = load_model(specs.model)
        report = plan(model, specs.quant) if specs.quant.weight is not None else None
        data = TextDataModule(specs.data, tokenizer,
                              max_positions=getattr(model.config, "max_position_embeddings", None))
        data.setup("fit")
        if report is not None:
            _check_serving(report, strict=cfg.export.strict)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        _remove_run_dir(run_dir)
        raise ConfigError(str(err)) from err

    if report is not None:
        prepare(model, specs.quant)
        print(report)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = QATModule(model, specs.optim, specs.quant.start_step, run_config)
    trainer = _build_trainer(cfg, run_dir)

    metrics: dict[str, Any] = {"recipe": _recipe_name(cfg), "model": _model_name(specs.model),
                               "scheme": _scheme(report)}
    if cfg.eval.fp_ppl:
        metrics["fp_ppl"] = _float_ppl(trainer, module, data, cached=cfg.eval.cache_fp_ppl)
    if cfg.eval.quantized_before and report is not None:
        metrics["ptq_ppl"] = _evaluate(trainer, module, data, "ptq", quantized=True)
    set_fake_quant_enabled(model, specs.quant.start_step == 0)

    start = time.perf_counter()
    if cfg.trainer.max_steps > 0:
        trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - start
    metrics["ppl"] = _evaluate(trainer, module, data, "val", quantized=report is not None)
    steps = trainer.global_step
    metrics.update(steps=steps, tokens=steps * specs.data.batch_size * specs.data.block_size
                   * cfg.trainer.get("accumulate_grad_batches", 1),
                   train_seconds=round(train_seconds, 1),
                   first_loss=module.loss_history[0] if module.loss_history else None,
                   last_loss=module.loss_history[-1] if module.loss_history else None)

    _save_checkpoint(trainer, module, run_dir / "checkpoints" / "last.ckpt")
    if report is not None:
        write_json(run_dir / "quant_report.json", report.to_dict())
    if cfg.export.enabled and report is not None:
        metrics.update(_export(model, tokenizer, data, run_dir / "export", cfg.export))
    write_json(run_dir / "metrics.json", metrics)
    print(summary(metrics, run_dir))
    return metrics


def _check_serving(report: PrepareReport, strict: bool) -> None:
    from qat.export.compressed_tensors import describe_serving_issues, serving_issues

    issues = serving_issues(report.layers)
    if not issues:
        return
    message = describe_serving_issues(issues)
    if strict:
        raise ValueError(message + "\n(export.strict=true; set it false to export anyway)")
    print("warning: " + message)


def _export(model, tokenizer, data: TextDataModule, out_dir: Path, options) -> dict[str, Any]:
    """Write the export, reload it with the fused kernels and measure what it weighs and scores."""
    from qat.eval.perplexity import perplexity
    from qat.export.load import load_quantized, weight_bytes
    from qat.export.writer import export_model

    dtype = getattr(torch, options.dtype)
    export_model(model, tokenizer, out_dir, dtype=dtype)
    result: dict[str, Any] = {"export_dir": str(out_dir),
                              "export_bytes": sum(f.stat().st_size for f in out_dir.iterdir())}
    result["export_weight_bytes"] = weight_bytes(load_quantized(out_dir, dtype=dtype))["total"]
    if options.evaluate:
        # Stored tensors upcast exactly to float32 for the non-quantized layers: CPUs without
        # native bf16 run a bf16 lm_head many times slower. Quantized layers use their kernels.
        served = load_quantized(out_dir, dtype=torch.float32)
        spec = data.spec
        result["export_ppl"] = perplexity(served, data.eval_ids, window=spec.eval_window,
                                          max_windows=spec.eval_windows,
                                          batch_size=spec.eval_batch_size).ppl
    return result


def _fingerprint(model: torch.nn.Module, eval_blocks: torch.Tensor) -> str:
    """Digest of the float weights, the eval tokens and the software that computes on them."""
    import hashlib

    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "fake_quant" in name:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(eval_blocks.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _float_ppl(trainer: L.Trainer, module: QATModule, data: TextDataModule, cached: bool) -> float:
    """The float model's protocol perplexity; remembered per (weights, eval tokens), since the
    default run would otherwise spend two minutes re-measuring the same number every time."""
    import json

    from qat.assets import cache_dir

    path = cache_dir() / "fp_ppl" / f"{_fingerprint(module.model, data.eval_blocks)}.json"
    if cached and path.is_file():
        return float(json.loads(path.read_text())["fp_ppl"])
    value = _evaluate(trainer, module, data, "fp", quantized=False)
    if cached:
        write_json(path, {"fp_ppl": value})
    return value


def _evaluate(trainer: L.Trainer, module: QATModule, data: TextDataModule, prefix: str,
              quantized: bool) -> float:
    """Protocol perplexity of the model as it is now (fake quantization on or off)."""
    set_fake_quant_enabled(module.model, quantized)
    module.val_prefix = prefix
    trainer.validate(module, datamodule=data, verbose=False)
    module.val_prefix = "val"
    return float(trainer.callback_metrics[f"{prefix}/ppl"])


def _build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    logger = False
    if cfg.get("logger") and cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir))
    callbacks = []
    every = cfg.checkpoint.every_n_steps
    if every:
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=every,
                                         save_last=True, save_top_k=-1))
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                       default_root_dir=str(run_dir),
                       enable_checkpointing=bool(every))


def _save_checkpoint(trainer: L.Trainer, module: QATModule, path: Path) -> None:
    with atomic_path(path) as tmp:
        if trainer.global_step > 0:
            trainer.save_checkpoint(tmp, weights_only=False)
        else:  # nothing was fitted: weights and config are all there is to keep
            torch.save({"state_dict": module.state_dict(), "global_step": 0,
                        "qat": {"config": module.run_config}}, tmp)


def summary(metrics: dict[str, Any], run_dir: Path) -> str:
    rows = [("model", metrics["model"]), ("recipe", metrics["recipe"]),
            ("scheme", metrics["scheme"]), ("steps", metrics["steps"]),
            ("train time", f"{metrics['train_seconds']:.0f} s")]
    for key, label in (("fp_ppl", "float ppl"), ("ptq_ppl", "quantized ppl before training"),
                       ("ppl", "ppl after training"), ("export_ppl", "exported model ppl")):
        if key in metrics:
            rows.append((label, f"{metrics[key]:.3f}"))
    if "fp_ppl" in metrics:
        rows.append(("vs float", f"{100 * (metrics['ppl'] / metrics['fp_ppl'] - 1):+.1f}%"))
    rows.append(("run dir", str(run_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "== qat summary =="] + [f"{k:<{width}}  {v}" for k, v in rows])


def _scheme(report: PrepareReport | None) -> str:
    if report is None:
        return "float"
    return ", ".join(f"{n} x {s}" for s, n in report.schemes().items())


def _recipe_name(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices.get("recipe") or "none"
    except Exception:  # composed without Hydra's runtime (tests, notebooks)
        return cfg.get("recipe_name", "none")


def _model_name(spec: ModelSpec) -> str:
    return spec.path or spec.name


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().runtime.output_dir


def _remove_run_dir(run_dir: Path) -> None:
    """A run that failed validation leaves nothing: drop the directory Hydra made for it."""
    if run_dir.exists() and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        if parent.name != "outputs" and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()

"""`train(cfg)`: the whole run, from a composed Hydra config to checkpoint and metrics.json.

Order matters: everything that can be wrong with the input (config values, paths, patterns, group
sizes, data size) is checked before the first optimizer step, and a run that fails there leaves no
run directory behind.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qat.data import DataSpec
from qat.distill import DistillSpec, Distiller, build_teacher
from qat.io import check_writable, write_json
from qat.lightning import stages
from qat.lightning.checkpointing import (AtomicCheckpointIO, check_resume_config,
                                         last_good_checkpoint, resolve_ckpt_path)
from qat.lightning.data import TextDataModule
from qat.lightning.keys import UnknownKeyError, check_keys
from qat.lightning.module import DivergenceError, OptimSpec, QATModule
from qat.models import ModelSpec, load_model
from qat.prune.spec import PruneSpec
from qat.quant import PrepareReport, QuantConfig, plan, prepare, set_fake_quant_enabled


class ConfigError(ValueError):
    """Bad input found before training started; the message names the field."""


@dataclass
class Specs:
    model: ModelSpec
    data: DataSpec
    quant: QuantConfig
    optim: OptimSpec
    distill: DistillSpec
    prune: PruneSpec
    ptq: Any
    blockwise: Any


def _default_ptq():
    from qat.ptq import PTQSpec
    return PTQSpec()


def _default_blockwise():
    from qat.blockwise import BlockwiseSpec
    return BlockwiseSpec()


def build_specs(cfg: DictConfig) -> Specs:
    """Instantiate and validate every spec; raise ConfigError naming the bad field."""
    try:
        check_keys(cfg)
    except UnknownKeyError as err:
        raise ConfigError(str(err)) from err
    specs = {}
    defaults = {"distill": DistillSpec, "prune": PruneSpec, "ptq": _default_ptq,
                "blockwise": _default_blockwise}
    for key in ("model", "data", "quant", "optim", "distill", "prune", "ptq", "blockwise"):
        if key in defaults and cfg.get(key) is None:
            specs[key] = defaults[key]()  # configs written before these groups existed
            continue
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
    export_dtypes = ("bfloat16", "float16", "float32")
    if cfg.export.dtype not in export_dtypes:
        raise ConfigError(f"export.dtype={cfg.export.dtype!r} is not one of {export_dtypes}")
    backends = ("reference", "auto")
    if cfg.export.get("eval_backend", "reference") not in backends:
        raise ConfigError(f"export.eval_backend={cfg.export.eval_backend!r} is not one of {backends}")
    if specs["blockwise"].enabled:
        if specs["quant"].weight is None:
            raise ConfigError("blockwise.enabled=true needs quant.weight (a recipe that quantizes)")
        if specs["prune"].enabled:
            raise ConfigError(f"blockwise.enabled=true with prune.pattern="
                              f"{specs['prune'].pattern!r} is not supported yet (block training "
                              "would move pruned weights off zero): use blockwise=none with prune")
    if specs["optim"].trainable != "weights" and specs["quant"].weight is None:
        raise ConfigError(f"optim.trainable={specs['optim'].trainable!r} needs quant.weight")
    return Specs(**specs)


@dataclass
class Run:
    """What one run holds between its steps (build -> compress -> fit -> evaluate -> write)."""

    cfg: DictConfig
    specs: Specs
    run_dir: Path
    model: Any
    tokenizer: Any
    data: TextDataModule
    ckpt_path: Path | None = None  # resuming end-to-end training from this checkpoint
    resume_blocks: bool = False  # resuming the block stage
    teacher: Any = None
    float_model: Any = None  # the block stage's target
    pruner: Any = None
    shrunk: dict | None = None
    report: PrepareReport | None = None  # which layer got which scheme; None: float run
    callbacks: list = field(default_factory=list)  # the user's (callbacks group)
    ptq_report: Any = None
    block_report: Any = None
    module: QATModule | None = None
    trainer: L.Trainer | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one QAT job; returns the metrics also written to `<run_dir>/metrics.json`."""
    run = build(cfg, Path(run_dir or _hydra_run_dir()))
    compress(run)
    fit(run)
    evaluate(run)
    return write(run)


def build(cfg: DictConfig, run_dir: Path) -> Run:
    """Everything that can be wrong with the input is found here, before any training: config
    values and keys, paths, patterns, group sizes, data size, the serving target. A failure raises
    ConfigError and leaves no run directory behind."""
    try:
        specs = build_specs(cfg)
        callbacks = _user_callbacks(cfg)
        check_writable(run_dir, "the run directory (hydra.run.dir)")
        ckpt_path, resume_blocks = _resume_target(cfg, specs, run_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model, tokenizer = _load_model(specs.model)
        plan(model, specs.quant) if specs.quant.weight is not None else None  # patterns, groups
        stages.check_architecture(model, specs)
        data = TextDataModule(specs.data, tokenizer,
                              max_positions=getattr(model.config, "max_position_embeddings", None))
        data.setup("fit")
        run = Run(cfg, specs, run_dir, model, tokenizer, data, ckpt_path, resume_blocks,
                  callbacks=callbacks)
        # the float model, frozen before pruning and fake quantization touch it
        run.teacher = build_teacher(specs.distill.teacher, model, tokenizer) \
            if specs.distill.enabled else None
        run.float_model = _float_reference(model, run.teacher, specs) \
            if specs.blockwise.enabled and ckpt_path is None else None
        if specs.data.generated_samples:
            stages.use_teacher_text(data, run.teacher, model, tokenizer, specs.data)
        # pruning and PTQ change the float weights: the baseline is measured before either
        if cfg.eval.fp_ppl:
            run.metrics["fp_ppl"] = stages.float_ppl(model, data, cached=cfg.eval.cache_fp_ppl)
        if specs.prune.enabled:
            run.pruner, run.shrunk = stages.start_pruning(model, specs.prune, data)
        run.report = _plan_precision(run) if specs.quant.weight is not None else None
        if run.report is not None:
            stages.check_serving(run.report, target=cfg.export.target)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        _remove_run_dir(run_dir)
        raise ConfigError(str(err)) from err
    return run


def _plan_precision(run: Run) -> PrepareReport:
    """The final scheme of every layer: outlier protection and the bit budget may change specs."""
    specs, model = run.specs, run.model
    report = plan(model, specs.quant)
    outliers = stages.outliers(model, specs, run.data, run.run_dir) \
        if specs.ptq.outliers != "off" else None
    if outliers and specs.ptq.outliers == "protect":
        from dataclasses import replace

        from qat.ptq import protection_overrides
        specs.quant = replace(specs.quant, overrides={**protection_overrides(outliers),
                                                      **specs.quant.overrides})
        report = plan(model, specs.quant)
    if specs.quant.budget_bits is not None:
        specs.quant = stages.mixed_precision(model, specs.quant, specs.ptq, run.data, report)
        report = plan(model, specs.quant)
    return report


def compress(run: Run) -> None:
    """Fake quantization in, quant.init (PTQ), the block stage; then the LightningModule and the
    Trainer that will train end to end."""
    cfg, specs, model = run.cfg, run.specs, run.model
    run_config = OmegaConf.to_container(cfg, resolve=True)
    stage_metrics: dict[str, Any] = {}
    store = stages.block_store(run.run_dir, run_config) if specs.blockwise.enabled else None
    if run.report is not None:
        prepare(model, specs.quant)
        if stages.is_rank_zero():
            print(run.report)
        if store is not None and run.ckpt_path is None and not run.resume_blocks:
            store.clear()  # a new run: blocks of an earlier run in this directory do not count
        if specs.quant.init is not None and run.ckpt_path is None:
            if store is not None and store.has_init():
                store.load_init(_blocks(model))
                print(f"quant.init={specs.quant.init}: loaded from {store.directory} (resumed)")
            else:
                run.ptq_report = stages.post_training_quantize(model, specs, run.data)
        elif specs.quant.init is not None and stages.is_rank_zero():
            # the checkpoint holds what calibration wrote (weights, grids, folded norm scales)
            print(f"quant.init={specs.quant.init}: skipped, resuming from {run.ckpt_path}")
        if store is not None and run.ckpt_path is None:
            stage_metrics, run.block_report = _block_stage(model, run.float_model, specs, run.data,
                                                           store, cfg, run.ptq_report is not None)
            run.float_model = None
        elif store is not None and store.exists():  # resumed after the block stage
            run.block_report = store.report()
            stage_metrics = dict(store.init_info() or {})
        stages.set_trainable(model, specs.optim.trainable)
    if run.shrunk:  # the checkpoint rebuilds the smaller model from these config changes
        run_config["model_shrink"] = run.shrunk["config"]
    distiller = Distiller(specs.distill, run.teacher) if run.teacher is not None else None
    run.module = QATModule(model, specs.optim, specs.quant.start_step, run_config, distiller,
                           skip_nonfinite=bool(cfg.get("guard", {}).get("skip_nonfinite", False)))
    callbacks = [run.pruner] if run.pruner is not None else []
    if run.report is not None:
        from qat.eval.callbacks import SQNRCallback

        callbacks.append(SQNRCallback(run.run_dir))
    run.trainer = _build_trainer(cfg, run.run_dir, callbacks + run.callbacks)

    fp_ppl = run.metrics.pop("fp_ppl", None)
    run.metrics.update({"recipe": _recipe_name(cfg), "model": _model_name(specs.model),
                        "scheme": _scheme(run.report)})
    if command := _command():
        run.metrics["command"] = command
    if fp_ppl is not None:
        run.metrics["fp_ppl"] = fp_ppl
    run.metrics.update({k: v for k, v in stage_metrics.items() if k in ("ptq_ppl", "block_ppl")})
    if run.block_report is not None:
        run.metrics["blockwise"] = dict(run.block_report.summary(),
                                        ppl=stage_metrics.get("block_ppl"))


def fit(run: Run) -> None:
    """End-to-end training (trainer.max_steps optimizer steps), resumed from run.ckpt_path."""
    cfg, metrics = run.cfg, run.metrics
    if cfg.eval.quantized_before and run.report is not None and run.ckpt_path is None:
        metrics["ptq_ppl"] = _evaluate(run.trainer, run.module, run.data, "ptq", quantized=True)
    set_fake_quant_enabled(run.model, run.specs.quant.start_step == 0)
    start = time.perf_counter()
    if cfg.trainer.max_steps > 0:
        _fit(run.trainer, run.module, run.data, run.ckpt_path, run.run_dir)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)


def evaluate(run: Run) -> None:
    """The final perplexity, of the model as deployed: everything but the packed weights in
    export.dtype; and what training cost."""
    cfg, specs, trainer, module, metrics = run.cfg, run.specs, run.trainer, run.module, run.metrics
    if run.report is not None:
        from qat.export.compressed_tensors import as_exported

        with as_exported(run.model, getattr(torch, cfg.export.dtype)):
            metrics["ppl"] = _evaluate(trainer, module, run.data, "val", quantized=True)
    else:
        metrics["ppl"] = _evaluate(trainer, module, run.data, "val", quantized=False)
    steps = trainer.global_step
    metrics.update(steps=steps, tokens=steps * specs.data.batch_size * specs.data.block_size
                   * cfg.trainer.get("accumulate_grad_batches", 1) * trainer.world_size,
                   train_seconds=metrics.pop("train_seconds"),
                   first_loss=module.loss_history[0] if module.loss_history else None,
                   last_loss=module.loss_history[-1] if module.loss_history else None)
    if run.ckpt_path is not None:
        metrics["resumed_from"] = str(run.ckpt_path)
    if module.skipped_steps:
        metrics["skipped_steps"] = module.skipped_steps


def write(run: Run) -> dict[str, Any]:
    """The final checkpoint, the reports, the export (export.enabled) and metrics.json."""
    cfg, specs, trainer, metrics, run_dir = run.cfg, run.specs, run.trainer, run.metrics, run.run_dir
    _save_checkpoint(trainer, run.module, run_dir / "checkpoints" / "last.ckpt")
    if not trainer.is_global_zero:  # reports, export and metrics are rank zero's to write
        return metrics
    if run.report is not None:
        write_json(run_dir / "quant_report.json", run.report.to_dict())
    if run.ptq_report is not None:
        write_json(run_dir / "ptq_report.json", run.ptq_report.to_dict())
        metrics["ptq_seconds"] = round(run.ptq_report.seconds, 1)
    if run.block_report is not None:
        write_json(run_dir / "blockwise_report.json", run.block_report.to_dict())
    if specs.quant.budget_bits is not None:
        metrics["budget_bits"] = specs.quant.budget_bits
    if specs.prune.enabled:
        metrics.update(stages.prune_report(run.model, specs.prune, run.shrunk, run_dir))
    if cfg.export.enabled and run.report is not None:
        source = run_dir / "checkpoints" / "last.ckpt" if _sharded(trainer) else None
        card = {"base_model": metrics["model"], "recipe": metrics["recipe"],
                "command": metrics.get("command"), "fp_ppl": metrics.get("fp_ppl"),
                "ppl": metrics["ppl"], "eval": _eval_protocol(specs.data)}
        metrics.update(stages.export(run.model, run.tokenizer, run.data, run_dir / "export",
                                     cfg.export, source, run=card))
        if specs.prune.nm:
            metrics["export_nm_ok"] = stages.check_export_nm(run_dir / "export", specs.prune)
    write_json(run_dir / "metrics.json", metrics)
    print(summary(metrics, run_dir))
    return metrics


def _user_callbacks(cfg: DictConfig) -> list:
    """The callbacks group's entries, instantiated (a bad class or argument fails here)."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        try:
            out.append(instantiate(node))
        except InstantiationException as err:
            raise ConfigError(f"callbacks.{name}: {err.__cause__ or err}") from err
    return out


def _resume_target(cfg: DictConfig, specs: Specs, run_dir: Path) -> tuple[Path | None, bool]:
    """(Lightning checkpoint to resume, whether to resume the block stage instead).

    `ckpt_path=last` in a run killed during the block stage (no last.ckpt yet, but block files)
    resumes the block stage at its next untrained block."""
    value = cfg.get("ckpt_path")
    config = OmegaConf.to_container(cfg, resolve=True)
    if specs.blockwise.enabled and str(value) == "last" \
            and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        store = stages.block_store(run_dir, config)
        if store.exists():
            store.completed()  # raises now, naming the field, when the config differs
            return None, True
    ckpt_path = resolve_ckpt_path(value, run_dir)
    if ckpt_path is not None:
        check_resume_config(ckpt_path, config)
    return ckpt_path, False


def _float_reference(model, teacher, specs: Specs):
    """The float model the block stage targets: the teacher when it is this model's own float
    copy in the same dtype, otherwise a frozen copy of its own."""
    if teacher is not None and specs.distill.teacher.is_self \
            and next(teacher.parameters()).dtype == next(model.parameters()).dtype:
        return teacher
    from qat.distill import freeze
    import copy
    return freeze(copy.deepcopy(model))


def _blocks(model):
    from qat.ptq import decoder_blocks
    return decoder_blocks(model)[1]


def _block_stage(model, float_model, specs: Specs, data: TextDataModule, store, cfg: DictConfig,
                 calibrated: bool) -> tuple[dict[str, Any], Any]:
    """quant.init's result saved (resume does not calibrate again), its ppl, the block stage,
    the ppl after it. Returns (metrics, BlockwiseReport)."""
    info = store.init_info()
    if info is None:
        info = {}
        if cfg.eval.get("stage_ppl", True):
            info["ptq_ppl"] = stages.quantized_ppl(model, data, cfg.export.dtype, "ppl after init")
            print(f"ppl after quant.init={specs.quant.init or 'none (min/max grid)'}: "
                  f"{info['ptq_ppl']:.3f}")
        if stages.is_rank_zero():
            store.save_init(_blocks(model) if calibrated else None, info)
    report = stages.block_stage(model, float_model, specs, data, store, cfg.seed)
    out = dict(info)
    if cfg.eval.get("stage_ppl", True) and cfg.trainer.max_steps > 0:
        out["block_ppl"] = stages.quantized_ppl(model, data, cfg.export.dtype,
                                                "ppl after blocks")
        print(f"ppl after the block stage: {out['block_ppl']:.3f}")
        if stages.is_rank_zero():
            store.update_info({"block_ppl": out["block_ppl"]})
    return out, report


def _fit(trainer: L.Trainer, module: QATModule, data: TextDataModule, ckpt_path: Path | None,
         run_dir: Path) -> None:
    """trainer.fit, resuming from `ckpt_path`; a diverged loss names the last good checkpoint."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except DivergenceError as err:
        good = last_good_checkpoint(run_dir)
        where = (f"the last good checkpoint is {good[0]} (step {good[1]}): resume with "
                 f"ckpt_path={good[0]} and a smaller optim.lr, or skip such steps with "
                 f"guard.skip_nonfinite=true" if good else
                 "no checkpoint was written yet (set checkpoint.every_n_steps=N to keep some)")
        raise DivergenceError(f"{err}; the run stopped. {where}") from err


def _load_model(spec: ModelSpec):
    """load_model, with damaged files (truncated weights, bad JSON) reported as model.path's."""
    try:
        model, tokenizer = load_model(spec)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors, tokenizers and json raise their own types
        if spec.path is None:
            raise
        raise ValueError(f"model.path={spec.path!r}: cannot be loaded "
                         f"({type(err).__name__}: {err})") from err
    check_finite(model, _model_name(spec))
    return model, tokenizer


def check_finite(model: torch.nn.Module, where: str) -> None:
    """NaN or infinite weights would train into NaN losses: refuse them before training."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"model {where!r}: tensor {name!r} has {bad} NaN or infinite "
                             f"value(s); the weights are damaged")


def _sharded(trainer: L.Trainer) -> bool:
    """True when parameters are split across ranks (FSDP): export from the gathered checkpoint."""
    return "fsdp" in type(trainer.strategy).__name__.lower() \
        or "modelparallel" in type(trainer.strategy).__name__.lower()


def _evaluate(trainer: L.Trainer, module: QATModule, data: TextDataModule, prefix: str,
              quantized: bool) -> float:
    """Protocol perplexity of the model as it is now (fake quantization on or off)."""
    set_fake_quant_enabled(module.model, quantized)
    module.val_prefix = prefix
    trainer.validate(module, datamodule=data, verbose=False)
    module.val_prefix = "val"
    return float(trainer.callback_metrics[f"{prefix}/ppl"])


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line: an advert, not run information."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def _quiet_lightning() -> None:
    import warnings

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())
    # Lightning 2.6's own use of a torch API that torch 2.13 deprecates: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            module="lightning")


def _build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list | None = None) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer`, with atomic checkpoint writes and our data order."""
    _quiet_lightning()
    logger = False
    if cfg.get("logger") and cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir))
    callbacks = list(callbacks or [])
    if cfg.trainer.get("enable_progress_bar", True):
        from qat.lightning.progress import StepProgressBar

        callbacks.append(StepProgressBar())
    every = cfg.checkpoint.every_n_steps
    if every:
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=every,
                                         save_last=True, save_top_k=-1))
    # the DataModule shards each global batch itself (same order for 1 or N processes)
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                       default_root_dir=str(run_dir), enable_checkpointing=bool(every),
                       plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


def _save_checkpoint(trainer: L.Trainer, module: QATModule, path: Path) -> None:
    """The final checkpoint; every rank calls it (FSDP gathers), rank zero writes, atomically."""
    if trainer.global_step > 0:
        trainer.save_checkpoint(path, weights_only=False)
    elif trainer.is_global_zero:  # nothing was fitted: weights and config are all there is to keep
        AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "global_step": 0,
                                              "qat": {"config": module.run_config}}, path)


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


def _command() -> str | None:
    """The command line that made this run (None when composed without Hydra's runtime)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return " ".join(["python train.py", *HydraConfig.get().overrides.task])
    except Exception:  # tests, notebooks
        return None


def _eval_protocol(spec) -> str:
    return f"{spec.path or spec.name}, {spec.eval_windows} x {spec.eval_window}-token windows"


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

"""The pieces of `train(cfg)` that join stages: resuming, checks before any work, the precision
plan, the final perplexity, the reports and the export of a run."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qat.blockwise import BlockStore
from qat.data.tokens import calibration_ids
from qat.io import is_rank_zero, release_memory, write_json
from qat.lightning.checkpointing import check_resume_config, resolve_ckpt_path
from qat.models import ModelSpec, load_model, placement
from qat.models.structure import check_causal
from qat.quant import PrepareReport, plan
from qat.quant.ste import release_scratch
from qat.train.specs import ConfigError, Specs


def hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().runtime.output_dir


log = logging.getLogger("qat.train")


def stage(name: str) -> None:
    """Mark where the run is (a debug record of logger "qat.train"): bench/memory.py takes each
    stage's peak memory at these marks; `hydra.verbose=qat.train` prints them."""
    release_scratch()  # the frozen-codes Linears' buffers, sized for the last stage's layers
    release_memory()  # what the last stage freed goes back to the kernel
    log.debug("stage: %s", name)


def fast_float32_matmuls() -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later): tensor cores at a
    10-bit mantissa instead of float32's CUDA cores. The CPU path is untouched."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def checkpoint_activations(model) -> None:
    """model.gradient_checkpointing: each decoder block recomputed in backward (transformers'
    activation checkpointing, non-reentrant: frozen embeddings need no input gradients)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.25; earlier releases know only the older name
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def user_callbacks(cfg: DictConfig) -> list:
    """The callbacks group's entries, instantiated (a bad class or argument fails here)."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        try:
            out.append(instantiate(node))
        except InstantiationException as err:
            raise ConfigError(f"callbacks.{name}: {err.__cause__ or err}") from err
    return out


def resume_target(cfg: DictConfig, specs: Specs, run_dir: Path) -> tuple[Path | None, bool]:
    """(Lightning checkpoint to resume, whether to resume the block stage instead).

    `ckpt_path=last` in a run killed during the block stage (no last.ckpt yet, but block files)
    resumes the block stage at its next untrained block."""
    value = cfg.get("ckpt_path")
    config = OmegaConf.to_container(cfg, resolve=True)
    if specs.blockwise.enabled and str(value) == "last" \
            and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        store = BlockStore.of_run(run_dir, config)
        if store.exists():
            store.completed()  # raises now, naming the field, when the config differs
            return None, True
    ckpt_path = resolve_ckpt_path(value, run_dir)
    if ckpt_path is not None:
        check_resume_config(ckpt_path, config)
    return ckpt_path, False


def load_checked(spec: ModelSpec):
    """load_model, with damaged files (truncated weights, bad JSON) reported as model.path's and
    NaN or infinite weights refused."""
    try:
        model, tokenizer = load_model(spec)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors, tokenizers and json raise their own types
        if spec.path is None:
            raise
        raise ValueError(f"model.path={spec.path!r}: cannot be loaded "
                         f"({type(err).__name__}: {err})") from err
    check_finite(model, spec.path or spec.name)
    check_causal(model, spec.where)
    return model, tokenizer


def check_finite(model: torch.nn.Module, where: str) -> None:
    """NaN or infinite weights would train into NaN losses: refuse them before training."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"model {where!r}: tensor {name!r} has {bad} NaN or infinite "
                             f"value(s); the weights are damaged")


def check_architecture(model, specs: Specs) -> None:
    """Features that depend on the block layout refuse here, before any work, naming the
    architecture (what works where: README, "Architectures")."""
    if specs.quant.init in ("awq", "smoothquant"):
        from qat.ptq.fold import check_foldable

        check_foldable(model, specs.quant.init)
    if specs.prune.enabled and specs.prune.pattern in ("heads", "channels"):
        from qat.prune.structured import check_structured

        check_structured(model, specs.prune.pattern)


def stage_device(specs: Specs, cfg: DictConfig) -> torch.device:
    """model.device resolved (auto: the trainer's accelerator; ValueError naming it when it
    names a device this machine lacks), and model.dtype=auto with it (replaced in `specs`)."""
    device = placement.stage_device(specs.model.device, cfg.trainer.get("accelerator", "auto"))
    specs.model = specs.model.for_device(
        device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    return device


def check_teacher_cache(specs: Specs, cfg: DictConfig) -> None:
    """distill.cache_top_k is built by one process for one process: refused under DDP/FSDP."""
    from qat.train.ranks import distributed

    if specs.distill.enabled and specs.distill.cache_top_k and distributed(cfg):
        trainer = cfg.trainer
        raise ValueError(f"distill.cache_top_k={specs.distill.cache_top_k} works in one process "
                         f"for now (trainer.devices={trainer.get('devices', 1)}, "
                         f"trainer.num_nodes={trainer.get('num_nodes', 1)}); set "
                         "distill.cache_top_k=0 to run the teacher on every rank")


MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's autocast precisions


def teacher_cache(teacher, specs: Specs, cfg: DictConfig, train_blocks: torch.Tensor,
                  run_dir: Path, device):
    """The teacher's top-k over the training blocks the end-to-end stage will read
    (qat.distill.cache), made on `device` once per run directory; a resumed run reuses it."""
    from qat.distill.cache import build_cache
    from qat.eval.stage import fingerprint
    from qat.lightning.data import GlobalBatchSampler
    from qat.lightning.trainer import trainer_precision

    spec = specs.distill
    steps = cfg.trainer.max_steps * cfg.trainer.get("accumulate_grad_batches", 1)
    rows = GlobalBatchSampler(train_blocks.shape[0], specs.data.batch_size, specs.data.seed) \
        .visited(steps) if steps > 0 else None
    # the live teacher runs inside the steps' autocast: the cache computes as it would there
    precision = trainer_precision(cfg.trainer)
    autocast = torch.autocast(torch.device(device).type, dtype=MIXED.get(precision, torch.bfloat16),
                              enabled=precision in MIXED)
    with placement.computing_on(teacher, device), autocast:
        cache = build_cache(teacher, train_blocks, spec.cache_top_k, spec.temperature,
                            run_dir / "teacher_cache", rows=rows,
                            teacher_id=f"{fingerprint(teacher, train_blocks[:1])} {precision}",
                            batch_size=specs.data.batch_size, chunk_size=spec.chunk_size or 1024,
                            progress=is_rank_zero())
    if is_rank_zero():
        print(f"teacher cache: top-{spec.cache_top_k} of the {len(cache.kept)} training blocks "
              f"the run reads, {cache.bytes / 2**20:.1f} MiB in {cache.directory}")
    return cache


def float_reference(model, teacher, specs: Specs):
    """The float model the block stage targets: the teacher when it is this model's own float
    model in the same dtype, else the model's files onloaded block by block, else (no files:
    model.name=tiny) a frozen copy."""
    if teacher is not None and specs.distill.teacher.is_self \
            and next(teacher.parameters()).dtype == next(model.parameters()).dtype:
        return teacher
    from qat.models.load import model_dir
    from qat.models.onload import onloaded_model

    directory = model_dir(specs.model)
    reference = onloaded_model(
        directory, next(model.parameters()).dtype, trust_remote_code=specs.model.trust_remote_code,
        attn_implementation=getattr(model.config, "_attn_implementation", None)) \
        if directory is not None else None
    if reference is not None:
        return reference
    import copy

    from qat.distill import freeze
    return freeze(copy.deepcopy(model))


def plan_precision(model, specs: Specs, train_blocks: torch.Tensor, run_dir: Path,
                   device: torch.device | None = None) -> PrepareReport:
    """The final scheme of every layer: outlier protection and the bit budget may change
    specs.quant (replaced in `specs`); the calibration forwards run on `device`."""
    from dataclasses import replace

    report = plan(model, specs.quant)
    ptq = specs.ptq
    if ptq.outliers != "off":
        from qat.ptq import protection_overrides
        from qat.ptq.outliers import find_outliers

        with placement.computing_on(model, device or "cpu"):
            found = find_outliers(model, calibration_ids(
                train_blocks, min(ptq.calibration_samples, 32), ptq.seq_len),
                ptq.outlier_threshold)
        if is_rank_zero():
            write_json(run_dir / "outliers.json", found)
        if found and ptq.outliers == "protect":
            specs.quant = replace(specs.quant, overrides={**protection_overrides(found),
                                                          **specs.quant.overrides})
            report = plan(model, specs.quant)
    if specs.quant.budget_bits is not None:
        from qat.ptq.sensitivity import mixed_precision

        ids = calibration_ids(train_blocks, ptq.sensitivity_samples, ptq.seq_len)
        with placement.computing_on(model, device or "cpu"):
            specs.quant = mixed_precision(model, specs.quant, ids, report)
        report = plan(model, specs.quant)
    return report


def final_ppl(trainer, module, data, specs: Specs, quantized: bool) -> float:
    """The perplexity of the model as deployed: everything but the packed weights in
    export.dtype (what the export's reloaded perplexity equals)."""
    from qat.lightning.trainer import validate_ppl

    if not quantized:
        return validate_ppl(trainer, module, data, "val", quantized=False)
    from qat.export.compressed_tensors import as_exported

    with as_exported(module.model, getattr(torch, specs.export.dtype)):
        return validate_ppl(trainer, module, data, "val", quantized=True)


def final_quality(model, tokenizer, baseline, specs: Specs, trainer, device) -> dict[str, Any]:
    """The trained model's KL to the float model, top-1 agreement and cloze accuracy, as
    exported (`qat.eval.stage.final_quality`), on rank zero; a sharded (FSDP2) model is not
    whole on any rank: skipped, said."""
    from qat.eval.stage import final_quality as measure
    from qat.lightning.trainer import is_sharded

    if is_sharded(trainer):
        print("distance to float: not measured under FSDP2 (no rank holds the model whole); "
              "qat-eval RUN_DIR/export --reference MODEL measures it")
        return {}
    with placement.computing_on(model, device):
        return measure(model, tokenizer, baseline, specs.export.dtype, specs.data.eval_batch_size)


def training_facts(cfg: DictConfig, specs: Specs, trainer, module, train_seconds: float,
                   ckpt_path: Path | None) -> dict[str, Any]:
    """What end-to-end training did and cost."""
    steps = trainer.global_step
    out = dict(steps=steps, tokens=steps * specs.data.batch_size * specs.data.block_size
               * cfg.trainer.get("accumulate_grad_batches", 1) * trainer.world_size,
               train_seconds=train_seconds, precision=str(trainer.precision),
               first_loss=module.loss_history[0] if module.loss_history else None,
               last_loss=module.loss_history[-1] if module.loss_history else None)
    if ckpt_path is not None:
        out["resumed_from"] = str(ckpt_path)
    if module.skipped_steps:
        out["skipped_steps"] = module.skipped_steps
    return out


def drop_optimizer(trainer) -> None:
    """Once the last checkpoint is written, AdamW's moments (twice the trained tensors) and its
    hold on the trained tensors are dead weight: freed before the export converts the model."""
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["params"] = []


def stored_bits_per_weight(layers) -> float:
    """Mean stored bits per quantized weight, scales and zero points counted (the measure a
    mixed-precision budget is held to): what quality is plotted against across widths."""
    from qat.eval.footprint import estimated_bits_per_weight

    numel = [layer.in_features * layer.out_features for layer in layers]
    stored = sum(n * estimated_bits_per_weight(layer.spec, layer.in_features)
                 for n, layer in zip(numel, layers))
    return stored / sum(numel)


def write_reports(run_dir: Path, specs: Specs, model, report, ptq_report, block_report,
                  shrunk) -> dict[str, Any]:
    """quant_report.json, ptq_report.json, blockwise_report.json, prune_report.json; returns
    the metrics they add."""
    out: dict[str, Any] = {}
    if report is not None:
        write_json(run_dir / "quant_report.json", report.to_dict())
        if quantized := [layer for layer in report.layers if layer.spec is not None]:
            out["bits_per_weight"] = stored_bits_per_weight(quantized)
    if ptq_report is not None:
        write_json(run_dir / "ptq_report.json", ptq_report.to_dict())
        out["ptq_seconds"] = round(ptq_report.seconds, 1)
    if block_report is not None:
        write_json(run_dir / "blockwise_report.json", block_report.to_dict())
    if specs.quant.budget_bits is not None:
        out["budget_bits"] = specs.quant.budget_bits
    if specs.prune.enabled:
        from qat.prune.pruner import prune_report

        written, metrics = prune_report(model, specs.prune, shrunk)
        write_json(run_dir / "prune_report.json", written)
        out.update(metrics)
    return out


# what the model card reports of the distance to the float model (qat.eval.stage.final_quality)
QUALITY_KEYS = ("kl_mean", "kl_p99", "top1", "fp_cloze_acc", "cloze_acc", "cloze_items")


def export_run(model, tokenizer, eval_ids: torch.Tensor, run_dir: Path, specs: Specs, trainer,
               metrics: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The export stage on the trained model (FSDP2: rebuilt from the checkpoint, a block at a
    time: no rank holds the whole float model), its
    perplexity on the protocol (the reloaded export computing on `device`), and the N:M check of
    what it stores."""
    from qat.eval.stage import protocol_ppl
    from qat.export.stage import export
    from qat.lightning.trainer import is_sharded

    def measure(served) -> float:
        with placement.computing_on(served, device or "cpu"):
            return protocol_ppl(served, eval_ids, data, "export ppl")

    if is_sharded(trainer):  # converted a block at a time from the ranks' shards on disk
        from qat.export.convert import served_from_checkpoint

        model, tokenizer, _ = served_from_checkpoint(run_dir / "checkpoints" / "last.ckpt",
                                                     getattr(torch, specs.export.dtype))
    data = specs.data
    card = {"base_model": metrics["model"], "recipe": metrics["recipe"],
            "command": metrics.get("command"), "fp_ppl": metrics.get("fp_ppl"),
            "ppl": metrics["ppl"],
            "eval": f"{data.path or data.name}, {data.eval_windows} x {data.eval_window}-token windows",
            **{k: metrics[k] for k in QUALITY_KEYS if k in metrics}}
    # the run's last use of its model: converted in place, no copy
    out = export(model, tokenizer, run_dir / "export", specs.export, card,
                 measure=measure,
                 inplace=True)
    if specs.prune.nm:
        out["export_nm_ok"] = check_export_nm(run_dir / "export", specs.prune)
    return out


def check_export_nm(out_dir: Path, spec) -> bool:
    """Read the export back and check every pruned layer's stored weights keep the N:M pattern."""
    from qat.export.load import load_quantized
    from qat.kernels import QuantizedLinear
    from qat.prune import check_nm
    from qat.quant.swap import include_patterns, matches

    served = load_quantized(out_dir, dtype=torch.float32, backend="reference")
    include = include_patterns(served, spec.include)
    bad = []
    with torch.no_grad():
        for name, layer in served.named_modules():
            if not isinstance(layer, QuantizedLinear) or not any(matches(name, p) for p in include) \
                    or any(matches(name, p) for p in spec.exclude):
                continue
            out = layer(torch.eye(layer.in_features))  # row j: W[:, j] + bias, exactly as served
            weight = (out - layer.bias if layer.bias is not None else out).T
            if not check_nm(weight, *spec.nm):
                bad.append(name)
    if bad:
        raise RuntimeError(f"export {out_dir}: layers {bad[:4]} lost the {spec.pattern} pattern")
    return True


def remove_run_dir(run_dir: Path) -> None:
    """A run that failed validation leaves nothing: drop the directory Hydra made for it."""
    if run_dir.exists() and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        if parent.name != "outputs" and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()

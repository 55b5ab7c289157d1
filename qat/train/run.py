"""`train(cfg)`: a whole run, from a composed Hydra config to checkpoint, export and metrics.json,
read as the list of its stages in order.

Everything that can be wrong with the input (config values, paths, patterns, group sizes, data
size, the serving target) is checked before the first stage changes anything; a run that fails
there raises ConfigError and leaves no run directory behind. Each stage is a function of its own
package that takes the model (or its blocks), plain tensors and its spec; only the end-to-end stage
is Lightning's.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from qat.blockwise import BlockStore, train_blocks
from qat.data.tokens import calibration_ids, check_positions, load_tokens
from qat.distill import Distiller, build_teacher
from qat.eval.stage import float_baseline, quantized_ppl
from qat.io import check_writable, is_rank_zero, write_json
from qat.lightning.callbacks import SQNRCallback, start_pruning
from qat.lightning.data import TextDataModule
from qat.lightning.module import QATModule
from qat.lightning.trainer import build_trainer, fit, save_checkpoint, validate_ppl
from qat.models.load import load_skeleton, model_dir
from qat.models.placement import computing_on
from qat.models.structure import decoder_blocks
from qat.prune.pruner import prune_structured
from qat.prune.spec import STRUCTURED
from qat.ptq import quantize_model
from qat.quant import keeps_codes_only, plan, prepare, set_fake_quant_enabled, set_trainable
from qat.train import ranks, steps, streamed
from qat.train.specs import ConfigError, build_specs
from qat.train.summary import run_facts, summary


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one QAT job; returns the metrics also written to `<run_dir>/metrics.json`."""
    run_dir = Path(run_dir or steps.hydra_run_dir())
    metrics: dict[str, Any] = {}
    steps.fast_float32_matmuls()
    steps.stage("load")
    # 1. check the input, load the model and the tokens, freeze the float model (teacher)
    try:
        specs = build_specs(cfg)
        device = steps.stage_device(specs, cfg)
        steps.check_teacher_cache(specs, cfg)
        callbacks = steps.user_callbacks(cfg)
        check_writable(run_dir, "the run directory (hydra.run.dir)")
        ckpt_path, resume_blocks = steps.resume_target(cfg, specs, run_dir)
        ranks.begin(cfg, run_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        directory = streamed.streamed_dir(specs, cfg.trainer.max_steps)
        # several processes: this one takes rank 0's calibrated model instead of the stages
        follower = ranks.follows(cfg) and ckpt_path is None
        # FSDP2: ranks that run no stage on the weights hold only their shards, filled from
        # rank 0 (or the checkpoint) once sharded; a follower of a streamed run (the model
        # larger than memory) builds it on meta too, for rank 0's state to fill
        lean = ranks.lean(cfg, specs)
        meta = follower and (lean or directory is not None) or lean and ckpt_path is not None
        loaded = streamed.load_student(specs.model, directory) \
            if directory is not None and not meta else None
        model, tokenizer = load_skeleton(specs.model) if meta else loaded if loaded is not None \
            else steps.load_checked(specs.model)
        plan(model, specs.quant) if specs.quant.weight is not None else None  # patterns, groups
        steps.check_architecture(model, specs)
        check_positions(specs.data, getattr(model.config, "max_position_embeddings", None))
        tokens = load_tokens(specs.data, tokenizer)
        teacher = build_teacher(specs.distill.teacher, model, tokenizer, model_dir(specs.model)) \
            if specs.distill.enabled else None
        float_model = steps.float_reference(model, teacher, specs) \
            if specs.blockwise.enabled and ckpt_path is None and not follower else None
        if specs.data.generated_samples:
            from qat.data.tokens import mix_blocks
            from qat.distill.teacher_text import teacher_written

            tokens.train_blocks = mix_blocks(tokens.train_blocks, teacher_written(
                teacher, model, tokenizer, specs.data), specs.data.generated_share)
        # 2. the float baseline, before pruning and PTQ change the weights
        baseline = None
        if specs.eval.fp_ppl and not follower:
            steps.stage("float ppl")
            with computing_on(model, device):
                baseline = float_baseline(model, tokenizer, tokens, specs.data, specs.eval)
            metrics.update(baseline.metrics())
        # 3. pruning due at step 0 (structured: the model shrinks once, here)
        pruner = shrunk = None
        if specs.prune.enabled:
            from qat.models.structure import linearize

            steps.stage("prune")
            linearize(model)  # masks follow (out, in) rows: GPT-2's Conv1D become Linears
            calibration = tokens.train_blocks[: specs.prune.calibration_samples] \
                if specs.prune.method == "wanda" else None
            if specs.prune.pattern in STRUCTURED:
                shrunk = prune_structured(model, specs.prune, calibration)
            else:
                pruner = start_pruning(model, specs.prune, calibration)
        # 4. each layer's final scheme (outlier protection, bit budget) and who can serve it
        steps.stage("plan")
        report = steps.plan_precision(model, specs, tokens.train_blocks, run_dir, device) \
            if specs.quant.weight is not None else None
        if report is not None:
            from qat.export.serving import check_serving

            check_serving(report.layers, target=specs.export.target)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        steps.remove_run_dir(run_dir)
        raise ConfigError(str(err)) from err

    run_config = OmegaConf.to_container(cfg, resolve=True)
    store = BlockStore.of_run(run_dir, run_config) if specs.blockwise.enabled else None
    ptq_report = block_report = None
    stage_metrics: dict[str, Any] = {}
    if report is not None:
        # 5. fake quantization in; 6. quant.init (PTQ) onto the grid; 7. the block stage
        steps.stage("prepare")
        prepare(model, specs.quant)
        if is_rank_zero():
            print(report)
        if store is not None and ckpt_path is None and not resume_blocks and not follower:
            store.clear()  # a new run: blocks of an earlier run in this directory do not count
        if follower and lean:  # its shards are sent by rank 0 once sharded
            steps.stage("rank 0's calibrated model, own shards")
            ranks.wait(run_dir, specs.launch.stage_wait_minutes)
        elif follower:
            steps.stage("rank 0's calibrated model")
            ranks.take(model, run_dir, specs.launch.stage_wait_minutes)
        elif loaded is not None:  # the blocks come from the files one at a time, held as codes
            steps.stage("ptq")
            ptq_report = streamed.init_blocks(
                model, specs, store, resume_blocks, device, calibration_ids(
                    tokens.train_blocks, specs.ptq.calibration_samples, specs.ptq.seq_len)
                if specs.quant.init in streamed.CALIBRATED else None)
            if ptq_report is not None:
                print(ptq_report)
        elif specs.quant.init is not None and ckpt_path is None:
            if store is not None and store.has_init():
                store.load_init(decoder_blocks(model)[1])
                print(f"quant.init={specs.quant.init}: loaded from {store.directory} (resumed)")
            else:
                steps.stage("ptq")
                ptq = replace(specs.ptq, method=specs.quant.init)
                ptq_report = quantize_model(model, ptq, calibration_ids(
                    tokens.train_blocks, ptq.calibration_samples, ptq.seq_len), device=device)
                print(ptq_report)
        elif specs.quant.init is not None and is_rank_zero():
            # the checkpoint holds what calibration wrote (weights, grids, folded norm scales)
            print(f"quant.init={specs.quant.init}: skipped, resuming from {ckpt_path}")
        if store is not None and ckpt_path is None and not follower:
            steps.stage("block stage")
            # a streamed run saved its calibrated blocks one by one; whole, they are saved here
            stage_metrics, block_report = block_stage(
                model, float_model, specs, tokens, store, cfg,
                ptq_report is not None and loaded is None, device,
                before_block=streamed.thaw(model, store if specs.quant.init in streamed.CALIBRATED
                                           else None) if loaded is not None else None,
                after_block=streamed.hold if keeps_codes_only(specs.optim.trainable) else None)
            float_model = None
        elif store is not None and store.exists() and not follower:  # resumed after the blocks
            block_report = store.report()
            stage_metrics = dict(store.init_info() or {})
        set_trainable(model, specs.optim.trainable)
        if ranks.distributed(cfg) and is_rank_zero() and ckpt_path is None:
            ranks.share(model, run_dir, state=not lean)
    if shrunk:  # the checkpoint rebuilds the smaller model from these config changes
        run_config["model_shrink"] = shrunk["config"]

    # 8. end to end (Lightning): the student, its teacher (or its cached top-k), the Trainer
    distiller = None
    if teacher is not None and specs.distill.cache_top_k:
        steps.stage("teacher cache")
        cache = steps.teacher_cache(teacher, specs, cfg, tokens.train_blocks, run_dir, device)
        distiller, teacher = Distiller(specs.distill, None, cache), None
    elif teacher is not None:
        distiller = Distiller(specs.distill, teacher)
    steps.stage("end-to-end")
    if specs.model.gradient_checkpointing:
        steps.checkpoint_activations(model)
    module = QATModule(model, specs.optim, specs.quant.start_step, run_config, distiller,
                       skip_nonfinite=specs.guard.skip_nonfinite)
    module.fill_from_rank0 = lean and ckpt_path is None
    data = TextDataModule.from_tokens(specs.data, tokens)
    trainer = build_trainer(cfg, specs.checkpoint, run_dir,
                            ([pruner] if pruner is not None else [])
                            + ([SQNRCallback(run_dir)] if report is not None else []) + callbacks)
    metrics = run_facts(cfg, specs, report, metrics, stage_metrics, block_report)
    if specs.eval.quantized_before and report is not None and ckpt_path is None:
        metrics["ptq_ppl"] = validate_ppl(trainer, module, data, "ptq", quantized=True)
    set_fake_quant_enabled(model, specs.quant.start_step == 0)
    start = time.perf_counter()
    if cfg.trainer.max_steps > 0:
        fit(trainer, module, data, ckpt_path, run_dir)
    train_seconds = round(time.perf_counter() - start, 1)

    # 9. the final perplexity, of the model as deployed (the rest in export.dtype)
    steps.stage("final ppl")
    metrics["ppl"] = steps.final_ppl(trainer, module, data, specs, quantized=report is not None)
    metrics.update(steps.training_facts(cfg, specs, trainer, module, train_seconds, ckpt_path))

    # 10. checkpoint, reports, export, metrics.json
    steps.stage("checkpoint")
    save_checkpoint(trainer, module, run_dir / "checkpoints" / "last.ckpt")
    steps.drop_optimizer(trainer)
    if not trainer.is_global_zero:  # reports, export and metrics are rank zero's to write
        return metrics
    if baseline is not None:
        steps.stage("distance to float")
        metrics.update(steps.final_quality(model, tokenizer, baseline, specs, trainer, device))
    metrics.update(steps.write_reports(run_dir, specs, model, report, ptq_report, block_report,
                                       shrunk))
    if specs.export.enabled and report is not None:
        steps.stage("export")
        metrics.update(steps.export_run(model, tokenizer, tokens.eval_ids, run_dir, specs,
                                        trainer, metrics, device))
    write_json(run_dir / "metrics.json", metrics)
    steps.stage("done")
    print(summary(metrics, run_dir))
    return metrics


def block_stage(model, float_model, specs, tokens, store: BlockStore, cfg: DictConfig,
                calibrated: bool, device, before_block=None, after_block=None
                ) -> tuple[dict[str, Any], Any]:
    """quant.init's result saved (resume does not calibrate again), its ppl, the block stage,
    the ppl after it. Returns (metrics, BlockwiseReport). before_block / after_block: as
    train_blocks takes them (a streamed run's float weights in, codes held after)."""
    info = store.init_info()
    if info is None:
        info = {}
        if specs.eval.stage_ppl:
            with computing_on(model, device):
                info["ptq_ppl"] = quantized_ppl(model, tokens.eval_ids, specs.data,
                                                specs.export.dtype, "ppl after init")
            print(f"ppl after quant.init={specs.quant.init or 'none (min/max grid)'}: "
                  f"{info['ptq_ppl']:.3f}")
        if is_rank_zero():
            # rtn is a pure function of the weights: a resumed run recomputes it rather than keep
            # a second copy of the quantized model on disk
            keep = calibrated and specs.quant.init != "rtn"
            store.save_init(decoder_blocks(model)[1] if keep else None, info)
    spec = specs.blockwise
    ids = calibration_ids(tokens.train_blocks, spec.samples, spec.seq_len, owner="blockwise")
    report = train_blocks(model, float_model, ids, spec, seed=cfg.seed, store=store,
                          before_block=before_block, after_block=after_block, device=device)
    if is_rank_zero():
        print(report)
    out = dict(info)
    if specs.eval.stage_ppl and cfg.trainer.max_steps > 0:
        with computing_on(model, device):
            out["block_ppl"] = quantized_ppl(model, tokens.eval_ids, specs.data,
                                             specs.export.dtype, "ppl after blocks")
        print(f"ppl after the block stage: {out['block_ppl']:.3f}")
        if is_rank_zero():
            store.update_info({"block_ppl": out["block_ppl"]})
    return out, report

"""The optional stages of a run, each a function `train` calls when the config asks for it.

Teacher-written data, PTQ initialisation, outlier protection, mixed-precision budgets, pruning
before training, the serving-constraint check, export and the N:M check of the export. Each one
takes what it needs and returns plain data, so `train` reads as the order of the stages.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qat.assets import cache_dir
from qat.io import write_json
from qat.data import DataSpec
from qat.lightning.data import TextDataModule
from qat.prune.spec import PruneSpec
from qat.quant import PrepareReport, QuantConfig


def use_teacher_text(data: TextDataModule, teacher, model, tokenizer, spec: DataSpec) -> None:
    """Data-free QAT: replace the corpus's training blocks by teacher-written ones (cached)."""
    import copy

    from qat.distill import freeze
    from qat.distill.teacher_text import generated_blocks

    writer = teacher if teacher is not None else freeze(copy.deepcopy(model))
    start = time.perf_counter()
    data.train_blocks = generated_blocks(writer, tokenizer, spec.generated_samples, spec.block_size,
                                         cache_dir(), seed=spec.seed,
                                         temperature=spec.generation_temperature)
    print(f"data: training on {data.train_blocks.shape[0]} teacher-written sequences of "
          f"{spec.block_size} tokens ({time.perf_counter() - start:.0f} s)")


def calibration_ids(data: TextDataModule, samples: int, seq_len: int, owner: str = "ptq"
                    ) -> torch.Tensor:
    """(samples, seq_len) consecutive training tokens: the first `samples` windows of the split."""
    flat = data.train_blocks.reshape(-1)
    samples = min(samples, flat.numel() // seq_len)
    if samples == 0:
        raise ValueError(f"{owner}.seq_len={seq_len} is longer than the whole training split "
                         f"({flat.numel()} tokens)")
    return flat[: samples * seq_len].view(samples, seq_len)


def post_training_quantize(model, specs, data: TextDataModule):
    """quant.init: put the prepared model's weights on a calibrated grid before any training."""
    from dataclasses import replace

    from qat.ptq import quantize_model

    spec = replace(specs.ptq, method=specs.quant.init)
    ids = calibration_ids(data, spec.calibration_samples, spec.seq_len)
    report = quantize_model(model, spec, ids)
    print(report)
    return report


def outliers(model, specs, data: TextDataModule, run_dir: Path) -> dict[str, list[int]]:
    """LLM.int8()-style outlier input features of every Linear, on the float model."""
    from qat.ptq import detect_outliers

    ids = calibration_ids(data, min(specs.ptq.calibration_samples, 32), specs.ptq.seq_len)
    found = detect_outliers(model, ids, threshold=specs.ptq.outlier_threshold)
    if is_rank_zero():
        write_json(run_dir / "outliers.json", found)
    print(f"outlier features (|x| >= {specs.ptq.outlier_threshold}): {len(found)} layer(s)"
          + "".join(f"\n  {name}: {len(f)} feature(s) {f[:8]}" for name, f in list(found.items())[:10]))
    return found


def mixed_precision(model, quant: QuantConfig, ptq, data: TextDataModule,
                     report: PrepareReport) -> QuantConfig:
    """quant.budget_bits: per-block widths from measured sensitivity, as per-layer overrides.

    Each decoder block is quantized alone (RTN) at every width in quant.budget_choices and its
    KL to the float model measured on ptq.sensitivity_samples sequences; a knapsack then picks
    the widths with the least total KL whose mean stored bits per weight meet the budget.
    User overrides still win over the chosen widths.
    """
    import re
    from dataclasses import replace

    from qat.ptq.sensitivity import assign_bits, block_sensitivity

    groups: dict[str, dict] = {}
    for layer in report.layers:
        found = re.search(r"layers\.(\d+)\.", layer.name)
        groups.setdefault(f"block {found.group(1)}" if found else layer.name, {})[layer.name] = \
            layer.spec
    numel = {g: sum(l.in_features * l.out_features for l in report.layers if l.name in members)
             for g, members in groups.items()}
    ids = calibration_ids(data, ptq.sensitivity_samples, ptq.seq_len)
    start = time.perf_counter()
    sensitivity = block_sensitivity(model, ids, groups, quant.budget_choices)
    weight = quant.weight
    widths = assign_bits(sensitivity, numel, quant.budget_bits, quant.budget_choices,
                         group_size=weight.effective_group_size, symmetric=weight.symmetric)
    chosen = {name: {"bits": widths[g]} for g, members in groups.items() for name in members}
    counts = {b: list(widths.values()).count(b) for b in sorted(set(widths.values()))}
    print(f"mixed precision at {quant.budget_bits} bits per weight: blocks per width {counts} "
          f"({time.perf_counter() - start:.0f} s)")
    return replace(quant, overrides={**chosen, **quant.overrides})


def check_architecture(model, specs) -> None:
    """Features that depend on the block layout refuse here, before any work, naming the
    architecture (what works where: README, "Architectures")."""
    if specs.quant.init in ("awq", "smoothquant"):
        from qat.ptq.fold import check_foldable

        check_foldable(model, specs.quant.init)
    if specs.prune.enabled and specs.prune.pattern in ("heads", "channels"):
        from qat.prune.structured import check_structured

        check_structured(model, specs.prune.pattern)


def start_pruning(model, spec: PruneSpec, data: TextDataModule):
    """Prune what is due at step 0 on the float model (so every eval and a 0-step run see it).

    Unstructured and N:M: a callback that holds the masks and follows the schedule. Heads and
    channels: cut out once, before training, so the student trains (and exports) smaller.
    Returns (callback or None, shrink result or None).
    """
    from qat.prune import PruningCallback, last_update_at, prune, shrink
    from qat.prune.spec import STRUCTURED
    from qat.quant.structure import linearize

    # GPT-2's Conv1D projections become the Linears they are, so masks follow (out, in) rows
    linearize(model)

    calibration = data.train_blocks[: spec.calibration_samples] if spec.method == "wanda" else None
    if spec.pattern in STRUCTURED:
        if spec.schedule != "oneshot" or spec.start_step != 0:
            raise ValueError(f"prune.pattern={spec.pattern!r} removes tensors once, before "
                             "training: use prune.schedule=oneshot with prune.start_step=0")
        result = shrink(model, prune(model, spec, calibration))
        print(f"pruned {spec.pattern}: {result['parameters_before']:,} -> "
              f"{result['parameters_after']:,} parameters ({result['config']})")
        return None, result
    callback = PruningCallback(spec, calibration=calibration)
    if last_update_at(0, spec) is not None:
        callback.update(model, 0)
    return callback, None


def prune_report(model, spec: PruneSpec, shrunk: dict | None, run_dir: Path) -> dict[str, Any]:
    from qat.prune import sparsity_report

    report = sparsity_report(model, spec.include, spec.exclude, spec.pattern)
    if shrunk:
        report["shrink"] = shrunk
    write_json(run_dir / "prune_report.json", report)
    out = {"sparsity": round(report["overall"]["sparsity"], 6), "parameters": report["parameters"]}
    if spec.nm:
        out["nm_ok"] = all(layer["nm_ok"] for layer in report["layers"].values())
    return out


def check_export_nm(out_dir: Path, spec: PruneSpec) -> bool:
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


def check_serving(report: PrepareReport, target: str | None) -> None:
    """Before training: warn about every target that cannot serve the export; `target` must."""
    from qat.export.serving import CHECKS, check_target, describe

    check_target(target)
    for name, check in CHECKS.items():
        if not (issues := check(report.layers)):
            continue
        if name == target:
            raise ValueError(describe(name, issues) + f"\n(export.target={target}; choose another "
                             "scheme or target, or export.target=null to export anyway)")
        if target is None:
            print("warning: " + describe(name, issues))


def export(model, tokenizer, data: TextDataModule, out_dir: Path, options,
           checkpoint: Path | None = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert in memory, write the export, and measure what the served model weighs and scores.

    The evaluated model is the in-memory conversion; the files are read back and must hold the
    same tensors (the check that what was measured is what was written).
    `checkpoint`: rebuild the full model from it first (FSDP: rank zero's gathered weights).
    `run`: the model card's facts about the run (see `qat.export.writer.export_model`).
    """
    from qat.eval.perplexity import perplexity
    from qat.export.convert import cast_float_tensors, convert, serve_as
    from qat.export.load import load_quantized, weight_bytes
    from qat.export.writer import export_model
    from qat.kernels import QuantizedLinear

    if checkpoint is not None:
        from qat.models.checkpoint import model_from_checkpoint

        model, tokenizer, _ = model_from_checkpoint(checkpoint)
    dtype = getattr(torch, options.dtype)
    served = convert(model, dtype)  # as load_quantized(out_dir, dtype) serves it by default
    export_model(served, tokenizer, out_dir, dtype=dtype, run=run)
    result: dict[str, Any] = {"export_dir": str(out_dir), "export_eval_backend": options.eval_backend,
                              "export_bytes": sum(f.stat().st_size for f in out_dir.iterdir()),
                              "export_weight_bytes": weight_bytes(served)["total"]}
    # Stored tensors upcast exactly to float32. backend=reference unpacks the stored codes and
    # computes in float32: it checks the export against the run's ppl to float rounding.
    # backend=auto runs the CPU int4 kernel, whose bf16 activations move ppl by ~4e-4.
    cast_float_tensors(served, torch.float32)
    for layer in served.modules():
        if isinstance(layer, QuantizedLinear):
            serve_as(layer, layer.weight_spec, options.eval_backend)
    reread = load_quantized(out_dir, dtype=torch.float32, backend=options.eval_backend)
    check_same_tensors(served, reread, out_dir)
    del reread
    if options.evaluate:
        spec = data.spec
        result["export_ppl"] = perplexity(served, data.eval_ids, window=spec.eval_window,
                                          max_windows=spec.eval_windows,
                                          batch_size=spec.eval_batch_size,
                                          progress="export ppl").ppl
    return result


def check_same_tensors(served: torch.nn.Module, reread: torch.nn.Module, out_dir: Path) -> None:
    """The export read back stores what the in-memory served model stores, bit for bit (the file
    already equals the latter: the writer's verify_export). Compared in the stored layout, so a
    float Linear made from a Conv1D matches the Conv1D the loader rebuilds."""
    from qat.export.compressed_tensors import stored_tensors

    mine, theirs = (stored_tensors(m, torch.float32)[0] for m in (served, reread))
    if mine.keys() != theirs.keys():
        raise OSError(f"{out_dir}: the export read back has other tensors than the converted model "
                      f"({sorted(mine.keys() ^ theirs.keys())[:3]})")
    for key, value in mine.items():
        if value.dtype != theirs[key].dtype or not torch.equal(value, theirs[key]):
            raise OSError(f"{out_dir}: tensor {key!r} read back differs from the converted model")


def is_rank_zero() -> bool:
    """Before the Trainer exists: Lightning reads the rank from the launcher's environment."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def fingerprint(model: torch.nn.Module, eval_blocks: torch.Tensor) -> str:
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


def float_ppl(model, data: TextDataModule, cached: bool) -> float:
    """Protocol perplexity of the float model as it is now, without a Trainer (no collectives, so
    every rank may call it), shared with the Trainer path's cache."""
    import json

    from qat.eval.perplexity import perplexity

    path = cache_dir() / "fp_ppl" / f"{fingerprint(model, data.eval_blocks)}.json"
    if cached and path.is_file():
        return float(json.loads(path.read_text())["fp_ppl"])
    spec = data.spec
    value = perplexity(model, data.eval_ids, window=spec.eval_window, max_windows=spec.eval_windows,
                       batch_size=spec.eval_batch_size, progress=is_rank_zero() and "float ppl").ppl
    if cached and is_rank_zero():
        write_json(path, {"fp_ppl": value})
    return value


def set_trainable(model, trainable: str) -> None:
    """optim.trainable for the end-to-end stage.

    weights: the weights train on the grid quant.init / the block stage left (as before).
    scales: every quantized weight is frozen on its integer codes and only the scales train
    (EfficientQAT's E2E-QP: few parameters, little optimizer memory); nothing else trains.
    all: weights, scales and zero points train together.
    """
    from qat.quant import fake_quant_modules

    if trainable == "weights":
        return
    if trainable == "scales":
        model.requires_grad_(False)
    for module in fake_quant_modules(model):
        fq = module.weight_fake_quant
        if trainable == "scales":
            fq.freeze_codes(module.weight)
        for p in fq.learn_grid(module.weight, zero_point=trainable == "all"):
            p.requires_grad_(True)


def quantized_ppl(model, data: TextDataModule, dtype: str, label: str = "quantized ppl"
                  ) -> float:
    """Protocol perplexity of the fake-quantized model as exported (the rest rounded to `dtype`),
    without a Trainer: what `ppl` would be if training stopped here."""
    from qat.eval.perplexity import perplexity
    from qat.export.compressed_tensors import as_exported
    from qat.quant import set_fake_quant_enabled

    set_fake_quant_enabled(model, True)
    was_training = model.training
    spec = data.spec
    with as_exported(model.eval(), getattr(torch, dtype)):
        value = perplexity(model, data.eval_ids, window=spec.eval_window,
                           max_windows=spec.eval_windows, batch_size=spec.eval_batch_size,
                           progress=is_rank_zero() and label).ppl
    model.train(was_training)
    return value


def block_store(run_dir: Path, run_config: dict[str, Any]):
    """The block stage's files of this run, tied to everything that shapes the blocks."""
    from qat.blockwise import BlockStore

    keep = ("model", "data", "quant", "ptq", "blockwise", "prune", "seed")
    return BlockStore(run_dir / "checkpoints" / "blockwise",
                      {k: run_config.get(k) for k in keep})


def block_stage(model, float_model, specs, data: TextDataModule, store, seed: int):
    """The block stage over `blockwise.samples` training sequences; prints each block's loss."""
    from qat.blockwise import train_blocks

    spec = specs.blockwise
    ids = calibration_ids(data, spec.samples, spec.seq_len, owner="blockwise")
    report = train_blocks(model, float_model, ids, spec, seed=seed, store=store)
    if is_rank_zero():
        print(report)
    return report

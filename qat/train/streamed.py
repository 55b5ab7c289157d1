"""A run that never holds the float model: the student's decoder blocks stay in the model's
safetensors files until quant.init reaches them, and each is held as its integer codes from then
on; the block stage reads one block's float weights back to train it, and holds codes again.

    load        skeleton: embeddings, final norm, head in memory; blocks in the files
    quant.init  per block: read, quantizers on, rtn grid (or the min/max grid), codes held;
                gptq / awq: calibrated on the previous blocks' quantized outputs, as a whole
                model is, and the calibrated block saved (BlockStore init_NNN) before its codes
                are held
    block stage per block: float weights read back (from the files, or the calibrated block),
                trained, codes held (BlockStore: codes)
    end to end  the codes and their trainable scales (optim.trainable=scales)

Taken when the run can (`streamed_dir`): the model has safetensors files in its own names, a
block stage trains it and the end-to-end stage trains scales alone, and nothing before the block
stage needs the whole float model. Any other run loads the model whole, as before; the numbers
are the same either way (tests/test_streamed.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from qat.blockwise import BlockStore
from qat.io import release_memory
from qat.models.onload import TensorFiles, onloaded_model, onloader_of
from qat.models.placement import block_on, home_of
from qat.models.spec import ModelSpec
from qat.models.structure import check_causal, decoder_blocks
from qat.ptq.apply import PTQReport, rtn_layers
from qat.quant.fake_quant import FakeQuantWeight
from qat.quant.modules import FakeQuantLinear
from qat.train.specs import Specs

INITS = (None, "rtn", "gptq", "awq")  # quant.init methods that work a block at a time
CALIBRATED = ("gptq", "awq")  # those that change the float weights (the block stage starts there)


def can_stream(specs: Specs, max_steps: int | None = None) -> bool:
    """Whether the recipe lets the run keep the float model on disk (see the module doc): a
    block stage that the end-to-end stage follows with scales alone, or PTQ alone (`max_steps`
    0: the trainer's, no block stage), where no float weight trains again."""
    trains_codes = specs.blockwise.enabled and specs.optim.trainable == "scales"
    ptq_only = max_steps == 0 and not specs.blockwise.enabled and specs.quant.init is not None
    return specs.quant.weight is not None and (trains_codes or ptq_only) \
        and specs.quant.init in INITS \
        and not specs.prune.enabled and specs.ptq.outliers == "off" \
        and specs.quant.budget_bits is None and not specs.data.generated_samples \
        and not specs.quant.start_step


def streamed_dir(specs: Specs, max_steps: int | None = None) -> Path | None:
    """The model directory a streamed run reads its blocks from, or None: load it whole. A run
    resumed from a Lightning checkpoint streams too: its blocks are held as codes, as the
    checkpoint holds them, before the checkpoint's state replaces theirs."""
    from qat.models.load import model_dir

    if not can_stream(specs, max_steps):
        return None
    return model_dir(specs.model)


def load_student(spec: ModelSpec, directory: Path):
    """(skeleton, tokenizer), checked as `load_checked` checks a whole model, or None when the
    files are not in the model's own tensor names (it is then loaded whole)."""
    from transformers import AutoTokenizer

    if not (directory / "config.json").is_file():
        return None
    model = onloaded_model(directory, spec.torch_dtype, frozen=False,
                           trust_remote_code=spec.trust_remote_code,
                           attn_implementation=spec.attn_implementation)
    if model is None:
        return None
    check_finite_files(onloader_of(model).files, spec.where)
    check_causal(model, spec.where)
    tokenizer = AutoTokenizer.from_pretrained(str(directory),
                                              trust_remote_code=spec.trust_remote_code)
    return model, tokenizer


def check_finite_files(files: TensorFiles, where: str) -> None:
    """NaN or infinite weights refused before any work, one tensor in memory at a time (as
    stored: a 70B model's embedding upcast to float32 would take 4 GB for the check alone)."""
    for name in files.file_of:
        tensor = files.read([name], None, "cpu")[name]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"model {where!r}: tensor {name!r} has {bad} NaN or infinite "
                             f"value(s); the weights are damaged")


def init_blocks(model: nn.Module, specs: Specs, store: BlockStore | None, resumed: bool,
                device: torch.device | None = None,
                calibration: torch.Tensor | None = None) -> PTQReport | None:
    """quant.init block by block: each block read from the files, its quantizers set from its
    weights, its grid (rtn, or the observer's min/max; gptq / awq on `calibration`, the token
    ids), its codes held; a resumed run takes the saved init instead. Returns the PTQReport (None
    without quant.init, or resumed)."""
    loader = onloader_of(model)
    prefix, blocks = decoder_blocks(model)
    report = PTQReport(specs.quant.init) if specs.quant.init is not None else None
    saved = resumed and store is not None and store.has_init()
    if specs.quant.init in CALIBRATED and not saved:
        return _calibrate_blocks(model, specs, store, device, calibration)
    start = time.perf_counter()
    for index, block in enumerate(blocks):
        loader.adopt(block)
        _fresh_quantizers(block)
        if saved:
            store.load_init_block(index, block)
            hold(index, block)
            continue
        with block_on(block, device or torch.device("cpu")):
            if report is not None:
                rtn_layers(block, report, f"{prefix}.{index}")
            hold(index, block)
    if report is not None:
        report.seconds = time.perf_counter() - start
    if saved:
        print(f"quant.init={specs.quant.init}: loaded from {store.directory} (resumed)")
        return None
    return report


def _calibrate_blocks(model: nn.Module, specs: Specs, store: BlockStore | None,
                      device: torch.device | None, calibration: torch.Tensor | None) -> PTQReport:
    """gptq / awq as `quantize_model` runs them on a whole model, with each block read from the
    files just before its turn, and saved (float weights, folded norms, grid) then held as codes
    just after: the numbers of a whole-model run, one float block in memory."""
    from dataclasses import replace

    from qat.ptq import quantize_model

    loader = onloader_of(model)

    def before_block(index: int, block: nn.Module) -> None:
        loader.adopt(block)
        _fresh_quantizers(block)

    def after_block(index: int, block: nn.Module) -> None:
        if store is not None:  # a block stage follows: it starts from the calibrated block
            store.save_init_block(index, block)
        hold(index, block)

    ptq = replace(specs.ptq, method=specs.quant.init)
    return quantize_model(model, ptq, calibration, device=device, before_block=before_block,
                          after_block=after_block)


def _fresh_quantizers(block: nn.Module) -> None:
    """Quantizers built on the skeleton saw no weight: build them again from the real one."""
    for module in block.modules():
        if isinstance(module, FakeQuantLinear):
            fq = module.weight_fake_quant
            fresh = FakeQuantWeight(fq.spec, module.weight)
            fresh.enabled = fq.enabled
            module.weight_fake_quant = fresh


def hold(index: int, block: nn.Module) -> None:
    """The block's quantized layers keep their codes alone (optim.trainable=scales: the float
    weights will not train again)."""
    for module in block.modules():
        if isinstance(module, FakeQuantLinear):
            module.weight_fake_quant.freeze_codes(module.weight_like())
            module.hold_codes()
    release_memory()


def thaw(model: nn.Module, store: BlockStore | None = None):
    """before_block for the block stage: the block's float weights read back from the files, or
    (`store`: quant.init changed them) from the calibrated block the store saved."""
    loader = onloader_of(model)

    def before_block(index: int, block: nn.Module) -> None:
        layers = {n: m for n, m in block.named_modules()
                  if isinstance(m, FakeQuantLinear) and m.holds_codes}
        names = [f"{n}.weight" for n in layers]
        weights = store.init_tensors(index, names) if store is not None \
            else loader.read(block, names)
        for name, layer in layers.items():  # onto the block's device (the loader's may differ)
            layer.thaw(weights[f"{name}.weight"].to(home_of(layer)))
    return before_block

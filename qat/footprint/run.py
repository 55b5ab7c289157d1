"""Will it fit? Each stage's peak host, device and disk bytes for a training run, from the model's
config and the recipe alone (the model is built on the meta device; nothing is loaded).

The prediction adds up what each stage holds, as the pipeline is written (qat.train.run):

    process        the interpreter with torch, transformers and Lightning imported (PROCESS_BYTES)
    resident       embeddings, final norm, head: the student's, and an onloaded teacher's
    held           every quantized layer as its codes (two per byte at <= 4 bits), its grid and
                   its SQNR sums; the block norms in the model dtype (a streamed run)
    float model    every parameter in the model dtype (a run that loads the model whole)
    block          one decoder block in float: read from the files, trained (weights, gradients,
                   AdamW's two moments), or the float model's block that gives the targets
    calibration    gptq / awq, one block at a time: the Hessians of its inputs, the calibration
                   samples' hidden states, one layer's solve (streamed: each calibrated block is
                   saved to disk, where the block stage starts)
    activations    the block stage's three (samples, seq_len, hidden) tensors and a mini-batch's
                   saved activations; end to end, a batch's saved activations per block and the
                   logits (student, teacher, their float32 loss chunks)

On a CPU run the device is the host (device bytes 0). On an accelerator the stages keep the model
on the host and move one block at a time, so the device holds the block, its optimizer and the
activations; end to end the student (held), its optimizer and the activations.

Disk: the model's files, the block store (held blocks), the checkpoint (held model and AdamW over
the grid) and the export (qat.eval.footprint), cumulated stage by stage.

The constants below the arithmetic (PROCESS_BYTES, the transient multipliers) were fitted on
bench/memory.py's measurements (hidden 2048) and on the 13B layout's blocks (hidden 5120, the
model of bench/larger_than_memory.py): one fit for both widths, since blocks and layers grow with
width faster than activations do. bench/memory.py prints the prediction beside every measured
stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from qat.quant.spec import WeightSpec

PROCESS_BYTES = 0.645 * 2**30  # python, torch, transformers, Lightning, the tokens: after loading
E2E_BYTES = 0.05 * 2**30  # the Trainer, its loops and data loaders (measured: little)
EXPORT_BYTES = 0.35 * 2**30  # the export's writer, tokenizer and perplexity windows
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# transients, as multiples of what they scale with (fitted, see the module doc)
READ_COPIES = 2.0  # a tensor read from the files: the mapped pages and the copy
GPTQ_HESSIAN_COPIES = 6  # one layer's (in, in) float32 copies while GPTQ solves it (measured)
QUANTIZE_COPIES = 2.0  # float32 temporaries of one layer while its grid and codes are computed
AWQ_COPIES = 10.0  # one layer's float32 copies in AWQ's scale and clip search (fitted, 2 rows)
BLOCK_STAGE_COPIES = 4.4  # the trained block: weights, gradients, 2 moments, temporaries
BLOCK_STAGE_BYTES = 0.39 * 2**30  # the block stage's own constant (autograd, optimizer, threads)
E2E_SAVED_PER_TOKEN = (25, 5)  # floats kept per token per block: (x hidden, x intermediate)
E2E_CHECKPOINTED_PER_TOKEN = 14  # the same with gradient checkpointing (x hidden)


@dataclass(frozen=True)
class QuantizedLayer:
    out_features: int
    in_features: int
    spec: WeightSpec
    name: str = ""  # its path in the block (self_attn.q_proj ...): which layers share an input


# one Hessian each (an MoE expert's gate and up share one: Mixtral names them w1 and w3)
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})


@dataclass(frozen=True)
class RunShape:
    """The sizes the stages scale with, from config.json."""

    blocks: int
    block_params: int  # one decoder block
    resident_params: int  # outside the blocks (embeddings, final norm, head)
    largest_tensor: int
    hidden: int
    intermediate: int
    vocab: int
    layers: tuple[QuantizedLayer, ...]  # the quantized Linears of one block

    @property
    def params(self) -> int:
        return self.blocks * self.block_params + self.resident_params

    @property
    def quantized_per_block(self) -> int:
        return sum(l.out_features * l.in_features for l in self.layers)


def run_shape(model, quant) -> RunShape:
    """`model`: the run's model built on the meta device; `quant`: its QuantConfig."""
    from qat.models.structure import decoder_blocks
    from qat.quant.swap import plan

    prefix, blocks = decoder_blocks(model)
    report = plan(model, quant)
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    widest = sizes.index(max(sizes))  # DeepSeek's leading dense blocks are smaller than its MoE
    first = f"{prefix}.{widest}."
    layers = tuple(QuantizedLayer(l.out_features, l.in_features, l.spec,
                                  l.name[len(first):])  # its path in the block
                   for l in report.layers if l.name.startswith(first) and l.spec is not None)
    block_params = sizes[widest]
    total = sum(p.numel() for p in model.parameters())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return RunShape(blocks=len(blocks), block_params=block_params,
                    resident_params=total - len(blocks) * block_params,
                    largest_tensor=max(p.numel() for p in model.parameters()),
                    hidden=int(config.hidden_size),
                    intermediate=active_intermediate(config),
                    vocab=int(config.vocab_size), layers=layers)


def active_intermediate(config) -> int:
    """The MLP width a token's activations scale with: the dense MLP's, or for an MoE the k
    experts it is routed to plus any shared expert."""
    from qat.models.experts import moe_counts

    dense = int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    counts = moe_counts(config)
    if counts is None:
        return dense
    expert = int(getattr(config, "moe_intermediate_size", None) or dense)
    shared = int(getattr(config, "shared_expert_intermediate_size", None) or 0) \
        + int(getattr(config, "n_shared_experts", None) or 0) * expert
    return counts[1] * expert + shared


def held_layer_bytes(layer: QuantizedLayer) -> int:
    """A codes-held layer: codes, scale and zero point (float32), the SQNR sums, per group."""
    n = layer.out_features * layer.in_features
    spec = layer.spec
    group = layer.in_features if spec.granularity != "group" else spec.group_size
    groups = n // group if spec.granularity != "tensor" else 1
    codes = n // 2 if spec.bits <= 4 and group % 2 == 0 else n
    per_group = 4 + 4 + 4 + (0 if spec.symmetric else 4)  # scale, zero point, sum w*q, sum w
    return codes + groups * per_group + 8


def calibration_bytes(shape: RunShape, specs) -> int:
    """gptq / awq on one block: the Hessian of each distinct input (q/k/v share one, gate/up
    one), the hidden states of the calibration samples in and out, and one layer's solve
    (gptq: the Hessian's copies and the weight's, float32; measured on the 13B layout's block,
    7.85 GiB for the stage; awq: the search's copies of one layer, fitted on bench/memory.py's
    2- and 4-layer w3g64_kd rows)."""
    groups: dict[str, int] = {}
    for layer in shape.layers:
        parent, _, leaf = layer.name.rpartition(".")  # every expert has Hessians of its own
        key = next((f"{parent}.{min(g)}" for g in SHARED_INPUTS if leaf in g),
                   layer.name or str(id(layer)))
        groups[key] = layer.in_features
    hessians = sum(4 * n * n for n in groups.values())
    if specs.quant.init == "gptq":  # gathered in parts of at most ptq.hessian_gib (MoE blocks)
        hessians = min(hessians, int(specs.ptq.hessian_gib * 2 ** 30))
    states = 2 * specs.ptq.calibration_samples * specs.ptq.seq_len * shape.hidden * 4
    if specs.quant.init == "gptq":  # H as 2 X^T X / n, its damped copy, Cholesky, inverse, U
        solve = max((4 * (GPTQ_HESSIAN_COPIES * l.in_features ** 2
                          + 3 * l.out_features * l.in_features) for l in shape.layers), default=0)
    else:  # awq: the scale and clipping searches' float copies of one layer
        solve = max((4 * AWQ_COPIES * l.out_features * l.in_features
                     for l in shape.layers), default=0)
    return hessians + states + solve


def stage_bytes(shape: RunShape, specs, streamed: bool, model_files_bytes: int,
                trains: bool = True) -> list[dict]:
    """[{stage, host_bytes, device_bytes, disk_bytes}] in the order the run passes them
    (`trains`: an end-to-end stage runs, trainer.max_steps > 0)."""
    d = DTYPE_BYTES[specs.model.dtype]
    distill = specs.distill.enabled
    td = DTYPE_BYTES[specs.distill.teacher.dtype] if distill else 0
    held_block = sum(held_layer_bytes(l) for l in shape.layers) \
        + (shape.block_params - shape.quantized_per_block) * d
    held = shape.blocks * held_block + shape.resident_params * d
    block = shape.block_params * d
    layer = max((l.out_features * l.in_features for l in shape.layers), default=0)
    resident = shape.resident_params * (d + td)
    floats = shape.params * d  # the whole float model
    bw = specs.blockwise
    cache = DTYPE_BYTES[bw.cache_dtype] if bw.enabled else 0
    block_acts = (3 * bw.samples * bw.seq_len * shape.hidden * cache
                  + bw.batch_size * bw.seq_len * (12 * shape.hidden + 4 * shape.intermediate) * 4
                  ) if bw.enabled else 0
    train_block = block * BLOCK_STAGE_COPIES + BLOCK_STAGE_BYTES + block_acts
    tokens = specs.data.batch_size * specs.data.block_size
    per_token = E2E_SAVED_PER_TOKEN[0] * shape.hidden + E2E_SAVED_PER_TOKEN[1] * shape.intermediate
    # checkpointed: each block keeps a few hidden-sized tensors, one block at a time is recomputed
    saved = tokens * (shape.blocks * E2E_CHECKPOINTED_PER_TOKEN * shape.hidden + per_token) * d \
        if specs.model.gradient_checkpointing else tokens * shape.blocks * per_token * d
    e2e_acts = saved + tokens * shape.vocab * 4 * (3 if distill else 2)  # + the logits
    if specs.optim.trainable == "scales":  # frozen codes: the dequantized weight and its gradient
        e2e_acts += 2 * 4 * layer  # (out, in) float32 scratch buffers (qat.quant.ste)
    grid = sum(held_layer_bytes(l) - l.out_features * l.in_features // 2 for l in shape.layers) \
        * shape.blocks  # the grid's own bytes (scales, zero points, SQNR sums)
    scales = sum(4 * l.out_features * l.in_features // (l.spec.group_size or l.in_features)
                 for l in shape.layers) * shape.blocks  # what trains end to end (float32)
    teacher_block = shape.block_params * td
    stored = model_files_bytes / max(shape.params, 1)  # bytes per parameter in the files
    # the load checks every tensor as stored and runs one forward (the causal check): one block
    # at a time in the model dtype, each tensor read as stored before its cast
    read = max(shape.largest_tensor * stored * READ_COPIES,
               shape.block_params * d + shape.largest_tensor * stored)
    quantize = layer * 4 * QUANTIZE_COPIES
    stages = []
    if streamed:
        calibrated = specs.quant.init in ("gptq", "awq")
        ptq = resident + held + block + (calibration_bytes(shape, specs) if calibrated
                                         else quantize)
        stages += [("load", resident + read), ("ptq", ptq)]
        if bw.enabled:
            stages += [("block stage", resident + held + train_block)]
        if trains:
            stages += [("end-to-end", resident + held + 3 * scales + teacher_block + e2e_acts
                        + E2E_BYTES)]
        stages += [("checkpoint", resident + held + grid // 2),
                   ("export", resident + held + quantize + EXPORT_BYTES)]
    else:
        teacher = floats * td / d if distill else 0
        weights_train = specs.optim.trainable != "scales"
        stages += [("load", floats + teacher)]
        if bw.enabled:
            stages += [("block stage", floats + teacher + floats + train_block)]
        model_e2e = floats * (4 if weights_train else 1)  # weights, gradients, moments
        stages += [("end-to-end", model_e2e + teacher + e2e_acts + E2E_BYTES),
                   ("checkpoint", floats * (3 if weights_train else 1) + teacher),
                   ("export", floats + teacher + quantize)]
    store = shape.blocks * held_block if bw.enabled else 0
    checkpoint = held + 2 * grid if streamed else floats * (3 if specs.optim.trainable != "scales"
                                                            else 1)
    # a streamed gptq / awq saves each calibrated block: the block stage starts from it
    init = shape.blocks * block if streamed and bw.enabled and specs.quant.init in ("gptq", "awq") \
        else 0
    store += init
    disk = {"load": model_files_bytes, "ptq": model_files_bytes + init,
            "block stage": model_files_bytes + store, "end-to-end": model_files_bytes + store,
            "checkpoint": model_files_bytes + store + checkpoint}
    from qat.eval.footprint import LinearShape, ModelShapes, model_bytes

    shapes = ModelShapes(tuple(LinearShape(f"l{i}.{j}", l.out_features, l.in_features)
                               for i in range(shape.blocks) for j, l in enumerate(shape.layers)),
                         shape.params)
    specs_by_name = {f"l{i}.{j}": l.spec for i in range(shape.blocks)
                     for j, l in enumerate(shape.layers)}
    export = model_bytes(shapes, specs_by_name, DTYPE_BYTES[specs.export.dtype])["total"] \
        if specs.export.enabled else 0
    disk["export"] = disk["checkpoint"] + export
    out = []
    for name, host in stages:
        device = 0
        out.append({"stage": name, "host_bytes": int(PROCESS_BYTES + host),
                    "device_bytes": device, "disk_bytes": int(disk.get(name, model_files_bytes))})
    return out

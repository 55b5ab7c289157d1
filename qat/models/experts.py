"""Mixture-of-Experts layers, found from their structure and made of Linears.

transformers 5 stores a MoE layer's experts fused: one module with 3-D parameters
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), called as experts(x, top_k_index,
top_k_weights); its router is a module with a bare `weight`. Nothing in such a module is a Linear,
so a Linear-based quantizer never sees the experts (97% of Mixtral-8x7B's weights). `unfuse`
replaces every such module, in place, by `Experts`: one `Expert` per expert with three nn.Linear
projections named as the family's own checkpoints name them (Mixtral `w1` / `w3` / `w2`, the
Qwen-MoE family `gate_proj` / `up_proj` / `down_proj`), computing the same function (GPT-OSS's
interleaved, biased experts with their clamped SwiGLU too). Every stage that quantizes,
calibrates, trains or exports Linears then handles each expert as the Linear it is, on the same
integer grid; routers (found by their shape, `routers`) stay in float. An expert layout this
does not know is refused by name, never left in float unnoticed.

The unfused names are the checkpoint's per-expert names (`checkpoint_name` adds a family's
renames, e.g. Mixtral's `mlp` -> `block_sparse_moe`), so block reads from the files, the export
and vLLM's MoE loaders agree on them.
"""
from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertLayout:
    """How a family's checkpoints store one expert: its projections' names (gate, up, down),
    renames from the runtime module path to the checkpoint's (regex, replacement), and whether
    the checkpoint holds per-expert tensors (False: fused, e.g. Granite-MoE's `input_linear`)."""

    projections: tuple[str, str, str]
    renames: tuple[tuple[str, str], ...] = ()
    per_expert: bool = True
    vllm_reads: bool = True  # vLLM's loader for the family takes per-expert packed tensors


MIXTRAL = ExpertLayout(("w1", "w3", "w2"), ((r"\.mlp\.", ".block_sparse_moe."),))
QWEN_MOE = ExpertLayout(("gate_proj", "up_proj", "down_proj"))
GRANITE = ExpertLayout(("w1", "w3", "w2"), ((r"\.router\.weight$", ".router.layer.weight"),),
                       per_expert=False)
LAYOUTS = {
    "mixtral": MIXTRAL, "minimax": MIXTRAL,
    "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE, "olmoe": QWEN_MOE, "deepseek_v3": QWEN_MOE,
    "deepseek_v2": QWEN_MOE, "qwen3_next": QWEN_MOE, "hunyuan_v1_moe": QWEN_MOE,
    # stored fused (block_sparse_moe.input_linear / output_linear); written per expert in
    # Mixtral's names, which vLLM's Granite-MoE loader passes on to its Mixtral-style expert
    # mapping (read in its code, not run here); its router is `router.layer`
    "granitemoe": GRANITE, "granitemoeshared": GRANITE,
    # stored fused (E, H, 2I) with gate and up interleaved; vLLM's GPT-OSS loader (read at
    # a6b6cfa) takes MXFP4 blocks or the fused bf16 tensors only: our loader serves the export
    "gpt_oss": ExpertLayout(("gate_proj", "up_proj", "down_proj"), per_expert=False,
                            vllm_reads=False),
}


def layout_of(config) -> ExpertLayout:
    """The expert layout of a model config's family (the Qwen-MoE names when unknown)."""
    model_type = getattr(config, "model_type", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LAYOUTS.get(model_type, LAYOUTS.get(getattr(text, "model_type", None), QWEN_MOE))


class GatedAct(nn.Module):
    """act(gate) * up: the SwiGLU of Mixtral, Qwen-MoE, DeepSeek, OLMoE, Granite."""

    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


class ClampedSwiGLU(nn.Module):
    """GPT-OSS: (clamp(up, -l, l) + 1) * g * sigmoid(alpha g) with g = clamp(gate, max=l)."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class Expert(nn.Module):
    """One gated MLP expert: down(glu(gate(x), up(x))), its Linears named by the layout."""

    def __init__(self, hidden: int, intermediate: int, glu: nn.Module, names: tuple[str, ...],
                 bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.add_module(gate, nn.Linear(hidden, intermediate, **kw))
        self.add_module(up, nn.Linear(hidden, intermediate, **kw))
        self.add_module(down, nn.Linear(intermediate, hidden, **kw))
        self.glu = glu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.glu(gate(x), up(x)))


class Experts(nn.ModuleList):
    """The experts of one MoE layer as a list of `Expert`s, called as transformers calls its
    fused experts: (tokens (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H). Each
    expert runs on the tokens routed to it (an index equal to the expert count is a dropped
    slot, as in transformers): batched over the experts, one grouped matmul per projection,
    when every expert's projection has a batched form (`float_grouped_linear`, or its type's
    `can_group` / `grouped_linear`, e.g. a fake-quantized Linear's), one expert at a time
    otherwise."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        # (top_k_index, top_k_weights) to use instead of the router's (`forced_routing`), and a
        # list that gets each call's routing (`recorded_routing`)
        self.forced: tuple[torch.Tensor, torch.Tensor] | None = None
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.batched: bool | None = None  # None: `batches_on` decides by device and size

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.forced is not None:
            top_k_index, top_k_weights = (t.to(hidden_states.device) for t in self.forced)
        if self.recorded is not None:
            self.recorded.append((top_k_index.detach(), top_k_weights.detach()))
        gate = getattr(self[0], self[0].names[0])
        elements = gate.in_features * gate.out_features
        cpu = hidden_states.device.type == "cpu"
        run = max(1, (CPU_RUN_ELEMENTS if cpu else RUN_ELEMENTS) // elements)  # experts a batch
        batched = batches_on(hidden_states.device, elements) and run > 1 \
            if self.batched is None else self.batched
        projections = self._batched_projections() if batched else None
        if projections is None:
            return self._looped(hidden_states, top_k_index, top_k_weights)
        return self._batched(projections, run, hidden_states, top_k_index, top_k_weights)

    def _looped(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each expert called as a module on its tokens: what hooks (calibration statistics)
        and projections without a batched form see."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            counts = mask.sum(dim=(-1, -2))[: len(self)].tolist()  # (E,) tokens per expert
        for index, count in enumerate(counts):
            if not count:
                continue
            top_k_pos, token_idx = torch.where(mask[index])
            y = self[index](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _batched_projections(self) -> list[tuple[list[nn.Linear], object]] | None:
        """Per projection (gate, up, down): its Linear in every expert and the function that runs
        them batched over experts, or None when one cannot (hooks on a module, which must see
        their expert's call; a projection type with no batched form, or one that declines)."""
        if _hooked(self):
            return None
        found = []
        for name in self[0].names:
            layers = [getattr(expert, name) for expert in self]
            kind = type(layers[0])
            if any(type(layer) is not kind for layer in layers):
                return None
            if kind is nn.Linear:
                found.append((layers, float_grouped_linear))
                continue
            can_group = getattr(kind, "can_group", None)
            if can_group is None or not can_group(layers):
                return None
            found.append((layers, kind.grouped_linear))
        return found

    def _batched(self, projections, run: int, hidden_states: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routed (token, slot) pairs sorted by expert, each projection one batched call over
        the experts (`batched_linear`): the function `_looped` computes."""
        count, k = len(self), top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        with torch.no_grad():
            order = torch.argsort(flat, stable=True)  # dropped slots (index E) sort last
            counts = torch.bincount(flat, minlength=count + 1)[:count].tolist()
        order = order[: sum(counts)]
        token = order // k
        x = hidden_states[token]
        (gate_layers, gate_fn), (up_layers, up_fn), (down_layers, down_fn) = projections
        glu = self[0].glu
        h = glu(batched_linear(gate_layers, gate_fn, x, counts, run),
                batched_linear(up_layers, up_fn, x, counts, run))
        y = batched_linear(down_layers, down_fn, h, counts, run)
        y = y * top_k_weights.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token, y.to(out.dtype))


# weight elements a batched projection takes at once: experts go in runs this size (experts
# too large for two in a run go one at a time). On an accelerator a fine-grained MoE's 128 small
# experts take a dozen calls, DeepSeek-V3's large ones the loop, and the batched weight with the
# straight-through backward's temporaries over it costs a few 64 MiB tensors; on a CPU runs
# stay near its caches
RUN_ELEMENTS = 1 << 24
CPU_RUN_ELEMENTS = 1 << 20
# the largest expert projection (weight elements) a CPU batches: beyond it the loop measured
# faster (bench/moe_experts.py: one expert's tensors stay in cache through the
# straight-through backward's passes, a run's do not, and the per-call cost batching saves is
# small beside the arithmetic)
CPU_BATCHED_ELEMENTS = 1 << 15


def batches_on(device: torch.device, elements: int) -> bool:
    """Whether a MoE layer whose experts' projections hold `elements` weights each batches them
    by default on this device: always on an accelerator, where E small launches per projection
    cost more than the arithmetic; on a CPU for small experts only (CPU_BATCHED_ELEMENTS)."""
    return torch.device(device).type != "cpu" or elements <= CPU_BATCHED_ELEMENTS


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in on `x`: autocast's when it is on (grouped matmuls are not
    autocast ops, so the batched path casts as F.linear would)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def batched_linear(layers: list[nn.Linear], project, x: torch.Tensor, counts: list[int],
                   run: int) -> torch.Tensor:
    """Linear e on rows of `x` (sorted by expert, counts[e] each), for every expert e: `project`
    (layers, x, counts) -> x_e @ W_e^T does `run` experts at a time; biases are added here.
    Experts without a row are left out (no gradient, as in the loop)."""
    first = layers[0]
    layers = [layer for layer, rows in zip(layers, counts) if rows]
    counts = [rows for rows in counts if rows]
    x = x.to(compute_dtype(x))
    pieces, row = [], 0
    for start in range(0, len(layers), run):
        part = counts[start:start + run]
        rows = sum(part)
        pieces.append(project(layers[start:start + run], x[row:row + rows], part))
        row += rows
    y = torch.cat(pieces) if pieces else x.new_zeros(0, first.out_features)
    if first.bias is not None and layers:
        bias = torch.stack([layer.bias for layer in layers]).to(y.dtype)
        y = y + torch.repeat_interleave(bias, torch.tensor(counts, device=y.device), dim=0)
    return y


def float_grouped_linear(layers: list[nn.Linear], x: torch.Tensor, counts: list[int]
                         ) -> torch.Tensor:
    """x_e @ W_e^T for plain Linears (float experts: the teacher, unquantized layers)."""
    weight = torch.stack([layer.weight for layer in layers]).to(x.dtype)
    return segment_matmul(x, weight.transpose(1, 2), counts)


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these operands: CPU float32 / bfloat16 with 16-byte
    aligned strides and storage (torch 2.13's CPU kernel), CUDA bfloat16 on sm80+."""
    if not hasattr(nn.functional, "grouped_mm"):
        return False
    first = tensors[0]
    if first.device.type == "cuda":
        return all(t.dtype == torch.bfloat16 for t in tensors) \
            and torch.cuda.get_device_capability(first.device) >= (8, 0)
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16):
        return False
    for t in tensors:
        size = t.element_size()
        if t.dtype != first.dtype or t.data_ptr() % 16 or \
                any(stride * size % 16 for stride in t.stride() if stride != 1):
            return False
    return True


def _offsets(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def segment_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x_e @ w_e for every expert e: x (S, K) holds counts[e] rows per expert in order, w is
    (E, K, N); one grouped matmul where torch has it, else a loop over the experts."""
    if _grouped_mm_ok(x, w):
        return nn.functional.grouped_mm(x, w, offs=_offsets(counts, x.device))
    pieces, row = [], 0
    for e, rows in enumerate(counts):
        pieces.append(x[row:row + rows] @ w[e])
        row += rows
    return torch.cat(pieces)


def segment_outer(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """a_e^T @ b_e for every expert e (rows of a (S, M) and b (S, N) per expert as in
    `segment_matmul`): (E, M, N), a weight's gradient. Every expert has rows (batched_linear
    leaves the others out; not every kernel writes an empty group)."""
    at = a.t().contiguous()
    if _grouped_mm_ok(at, b):
        return nn.functional.grouped_mm(at, b, offs=_offsets(counts, a.device))
    pieces, row = [], 0
    for rows in counts:
        pieces.append(at[:, row:row + rows] @ b[row:row + rows])
        row += rows
    return torch.stack(pieces)


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused gated experts: 3-D `gate_up_proj` (E, 2I, H) and `down_proj`
    (E, H, I), an `act_fn`, no biases."""
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or gate_up.ndim != 3 or down.ndim != 3:
        return False
    e, two_i, h = gate_up.shape
    return set(params) == {"gate_up_proj", "down_proj"} and hasattr(module, "act_fn") \
        and tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0


GPT_OSS_PARAMS = {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}


def is_gpt_oss_experts(module: nn.Module) -> bool:
    """GPT-OSS's experts: `gate_up_proj` (E, H, 2I) with gate and up interleaved along its last
    dimension, `down_proj` (E, I, H), biases, and a clamped SwiGLU (alpha, limit)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != GPT_OSS_PARAMS or not (hasattr(module, "alpha") and hasattr(module, "limit")):
        return False
    e, h, two_i = params["gate_up_proj"].shape
    return two_i % 2 == 0 and tuple(params["down_proj"].shape) == (e, two_i // 2, h) \
        and tuple(params["gate_up_proj_bias"].shape) == (e, two_i) \
        and tuple(params["down_proj_bias"].shape) == (e, h)


def unsupported_experts(model: nn.Module) -> list[tuple[str, str]]:
    """(name, reason) of expert modules `unfuse` cannot make Linears of: 3-D expert parameters
    in a layout it does not know."""
    found = []
    for name, module in model.named_modules():
        if is_fused_experts(module) or is_gpt_oss_experts(module) or isinstance(module, Experts):
            continue
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)
                  if p.ndim == 3}
        if shapes and name.rpartition(".")[2] == "experts":
            found.append((name, f"{type(module).__name__} with 3-D parameters {shapes}: an "
                               "expert layout qat cannot quantize yet (fused gate_up_proj "
                               "(E, 2I, H) / down_proj (E, H, I), or GPT-OSS's)"))
    return found


def _param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """Its own contiguous tensor: a view would keep the fused parameter alive."""
    return nn.Parameter(value.detach().clone().contiguous(), like.requires_grad)


def _unfused(module: nn.Module, names: tuple[str, str, str]) -> Experts:
    gpt_oss = is_gpt_oss_experts(module)
    gate_up, down = module.gate_up_proj, module.down_proj
    if gpt_oss:  # (E, H, 2I) interleaved, (E, I, H): as (out, in) Linears
        count, hidden, two_i = gate_up.shape
        glu = ClampedSwiGLU(module.alpha, module.limit)
    else:  # (E, 2I, H) gate then up, (E, H, I)
        count, two_i, hidden = gate_up.shape
        glu = GatedAct(module.act_fn)
    inter = two_i // 2
    experts = []
    for e in range(count):
        expert = Expert(hidden, inter, glu, names, bias=gpt_oss, device="meta",
                        dtype=gate_up.dtype)
        experts.append(expert)
        if gate_up.device.type == "meta":
            continue
        gate, up, down_w = (getattr(expert, n) for n in names)
        with torch.no_grad():
            if gpt_oss:
                gate.weight = _param(gate_up[e, :, 0::2].t(), gate_up)
                up.weight = _param(gate_up[e, :, 1::2].t(), gate_up)
                down_w.weight = _param(down[e].t(), down)
                bias = module.gate_up_proj_bias
                gate.bias, up.bias = _param(bias[e, 0::2], bias), _param(bias[e, 1::2], bias)
                down_w.bias = _param(module.down_proj_bias[e], module.down_proj_bias)
            else:
                gate.weight = _param(gate_up[e, :inter], gate_up)
                up.weight = _param(gate_up[e, inter:], gate_up)
                down_w.weight = _param(down[e], down)
    return Experts(experts)


def unfuse(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by `Experts` (same function, one Linear per
    projection per expert), in place; returns their names. A meta model stays on meta.

    Raises ValueError naming the module when experts come in a layout this cannot take."""
    bad = unsupported_experts(model)
    if bad:
        raise ValueError(f"{type(model).__name__}: {bad[0][0]}: {bad[0][1]}")
    config = getattr(model, "config", None)
    names = layout_of(config).projections if config is not None else QWEN_MOE.projections
    done = []
    for name, module in list(model.named_modules()):
        if not (is_fused_experts(module) or is_gpt_oss_experts(module)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _unfused(module, names))
        done.append(name)
    return done


def experts_modules(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def checkpoint_name(config, name: str) -> str:
    """A tensor's name in the family's checkpoints, from its name in the unfused model (only
    names inside an MoE layer's experts or router change, e.g. Mixtral's `.mlp.`)."""
    for pattern, replacement in layout_of(config).renames:
        if ".experts." in name or _router_leaf(name):
            name = re.sub(pattern, replacement, name, count=1)
    return name


def checkpoint_module(config, name: str) -> str:
    """A module's name in the family's checkpoints (`checkpoint_name` of its weight's)."""
    return checkpoint_name(config, f"{name}.weight").removesuffix(".weight")


def _router_leaf(name: str) -> bool:
    return bool(re.search(r"\.(gate|router)\.weight$", name))


def _expert_count(module: nn.Module) -> int | None:
    """How many experts an experts module holds (fused, unfused, or a ModuleList of MLPs)."""
    if is_fused_experts(module) or is_gpt_oss_experts(module):
        return module.gate_up_proj.shape[0]
    if isinstance(module, nn.ModuleList) and len(module) > 1:
        return len(module)
    return None


def routers(model: nn.Module) -> list[str]:
    """The routers and gates of every MoE layer, found from the structure: beside a module
    named `experts` holding E experts, a module with a bare (E, hidden) weight (transformers
    5's TopKRouter), or a Linear with E outputs (a router) or one (Qwen-MoE's
    `shared_expert_gate`, which scales the shared expert). Quantization leaves them in float."""
    found = []
    for name, module in model.named_modules():
        experts = module._modules.get("experts")
        count = _expert_count(experts) if experts is not None else None
        if count is None:
            continue
        for child_name, child in module.named_children():
            if child is experts:
                continue
            weight = child._parameters.get("weight")
            if weight is None or weight.ndim != 2:
                continue
            rows = weight.shape[0]
            if (isinstance(child, nn.Linear) and rows in (count, 1)) or \
                    (not isinstance(child, nn.Linear) and rows == count):
                found.append(f"{name}.{child_name}" if name else child_name)
    return found


def names_router(pattern: str, name: str) -> bool:
    """Whether a `quant.include` pattern asks for router `name` by its own name (its last
    component is the router's, not a wildcard): that, and only that, quantizes a router."""
    leaf = pattern.rpartition(".")[2]
    return not pattern.startswith("re:") and leaf not in ("", "*") \
        and fnmatch.fnmatchcase(name.rpartition(".")[2], leaf)


def moe_counts(config) -> tuple[int, int] | None:
    """(experts per MoE layer, experts each token uses) from a config, or None for a dense
    model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = next((getattr(text, k) for k in ("num_local_experts", "num_experts",
                                              "n_routed_experts") if getattr(text, k, None)),
                 None)
    active = getattr(text, "num_experts_per_tok", None)
    return (int(total), int(active)) if total and active else None


def per_expert_checkpoint(model: nn.Module, name: str) -> bool:
    """False for an expert projection of a family whose checkpoints store its experts fused
    (the per-expert export then differs from what its loaders expect)."""
    return ".experts." not in name or layout_of(getattr(model, "config", None)).per_expert


def vllm_reads_experts(model: nn.Module, name: str) -> bool:
    """False for an expert projection of a family whose vLLM loader takes no per-expert packed
    tensors (GPT-OSS)."""
    return ".experts." not in name or layout_of(getattr(model, "config", None)).vllm_reads


def active_params(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters: a token runs top-k of each MoE layer's experts, so only
    k / E of their parameters are active per token; the rest of the model always is."""
    total = sum(p.numel() for p in model.parameters())
    counts = moe_counts(model.config) if hasattr(model, "config") else None
    if counts is None:
        return total, total
    experts, k = counts
    idle = sum(p.numel() for m in experts_modules(model).values() for p in m.parameters())
    return total, total - idle + idle * k // experts


@contextmanager
def recorded_routing(module: nn.Module) -> Iterator[dict[str, list]]:
    """Every MoE layer's routing while the block runs: {layer name: [(index, weights) per
    call]} in call order."""
    layers = experts_modules(module)
    for layer in layers.values():
        layer.recorded = []
    try:
        yield {name: layer.recorded for name, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.recorded = None


@contextmanager
def forced_routing(module: nn.Module, routing: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
                   ) -> Iterator[None]:
    """Run `module`'s MoE layers on the given routing ({layer name: (top_k_index (T, k),
    top_k_weights (T, k))}) instead of their routers' (None: as they route)."""
    layers = experts_modules(module) if routing else {}
    for name, layer in layers.items():
        layer.forced = routing[name]
    try:
        yield
    finally:
        for layer in layers.values():
            layer.forced = None

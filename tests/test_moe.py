"""Mixture-of-Experts families: tiny random models from transformers' own configs, their experts
quantized per expert through the whole pipeline (GPTQ start -> block stage -> 2 KD steps ->
export -> our loader -> transformers + compressed-tensors -> compressed-tensors' decompression)."""
import copy
import json

import pytest
import torch

from conftest import assert_decompresses_to_trained
from test_architectures import BLOCKS_TINY, PTQ_TINY
from test_architectures import _run as run_tiny

H, I, L, VOCAB = 128, 256, 2, 512
_ATTN = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
             num_key_value_heads=2)
FAMILIES = {
    "mixtral": dict(_ATTN, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_ATTN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      head_dim=32),
    "olmoe": dict(_ATTN, num_experts=4, num_experts_per_tok=2),
    # multi-head latent attention, a leading dense layer, a shared expert
    "deepseek_v3": dict(_ATTN, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=128, first_k_dense_replace=1, n_shared_experts=1,
                        kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1),
    "granitemoe": dict(_ATTN, num_local_experts=4, num_experts_per_tok=2),
    # experts (E, H, 2I) with gate/up interleaved, biases, a clamped SwiGLU; router with a bias
    "gpt_oss": dict(_ATTN, num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}
# checkpoints store the experts fused (Granite's input_linear, GPT-OSS's gate_up_proj):
# transformers' conversion does not merge per-expert packed tensors for them (the serving report
# says so)
FUSED_CHECKPOINTS = {"granitemoe", "gpt_oss"}
ROUTER_GAIN = 50.0  # random routers are near-uniform: a margin keeps top-k choices stable


def moe_model_dir(model_type: str, root, **fields):
    """A random 2-block MoE of `model_type` with the tiny BPE, saved as transformers saves it
    (the family's per-expert checkpoint names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import routers
    from qat.models.tiny import tiny_tokenizer

    directory = root / model_type
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2, max_position_embeddings=1024,
                                  **{**FAMILIES[model_type], **fields})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name in routers(model):
            model.get_submodule(name).weight.mul_(ROUTER_GAIN)
    model.save_pretrained(directory)
    tiny_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def _run(source, run_dir, *overrides):
    """The whole pipeline: GPTQ start, block stage, 2 steps of KD from the float teacher, export."""
    return run_tiny(source, run_dir, "quant.init=gptq", *PTQ_TINY, *BLOCKS_TINY, "distill=kd",
                    "export.enabled=true", *overrides)


def _experts_in_bf16(model):
    """`model` (fake-quantized) as a plain one whose expert weights are rounded to bfloat16,
    what transformers' MoE conversion decompresses them to."""
    from qat.quant.swap import unprepare

    plain = unprepare(copy.deepcopy(model), bake=True)
    for name, module in plain.named_modules():
        if ".experts." in name and isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.bfloat16().float()
    return plain


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_moe_pipeline_quantizes_every_expert_and_serves_it(model_type, tmp_path):
    from qat.export.compressed_tensors import as_exported
    from qat.export.load import load_quantized
    from qat.models.checkpoint import model_from_checkpoint
    from qat.models.experts import (checkpoint_module, checkpoint_name, experts_modules,
                                    routers)
    from qat.quant import FakeQuantLinear

    source = moe_model_dir(model_type, tmp_path)
    run_dir = tmp_path / "run"
    metrics = _run(source, run_dir)
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["ppl"]))

    trained, _, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    experts = experts_modules(trained)
    assert experts, "no MoE layer found"
    report = json.loads((run_dir / "quant_report.json").read_text())
    for name, layer in experts.items():  # every projection of every expert quantized
        for index, expert in enumerate(layer):
            for proj in expert.names:
                assert f"{name}.{index}.{proj}" in report["layers"]
                assert isinstance(getattr(expert, proj), FakeQuantLinear)
    assert set(report["routers"]) == set(routers(trained)) and report["routers"]
    assert not any(r in report["layers"] for r in report["routers"])  # routers stay in float
    ptq = json.loads((run_dir / "ptq_report.json").read_text())
    seen = [v["tokens"] for n, v in ptq["layers"].items() if ".experts." in n]
    assert seen and all(t >= 0 for t in seen) and sum(seen) > 0

    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    served = load_quantized(run_dir / "export", dtype=torch.float32, backend="reference")
    with torch.no_grad(), as_exported(trained.eval(), torch.bfloat16):
        want = trained(ids).logits
        want_bf16_experts = _experts_in_bf16(trained)(ids).logits
    torch.testing.assert_close(served(ids).logits, want, rtol=1e-5, atol=1e-5)

    serving = json.loads((run_dir / "export" / "serving_report.json").read_text())
    assert serving["qat"]["servable"]
    kept = serving["float_tensors"]["tensors"]  # the routers are counted as left in float
    assert {checkpoint_name(trained.config, f"{r}.weight") for r in report["routers"]} <= set(kept)
    hf = serving["transformers"]
    if model_type in FUSED_CHECKPOINTS:
        assert not hf["servable"] and "fused" in " ".join(hf["reasons"])
        if model_type == "gpt_oss":  # and vLLM's GPT-OSS loader reads fused experts only
            assert "GPT-OSS" in " ".join(serving["vllm-gpu"]["reasons"])
    else:
        assert hf["servable"], hf["reasons"]
        assert any("bf16" in limit for limit in hf["limits"])  # the named limit
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32)
        for experts in experts_modules(theirs) or [m for n, m in theirs.named_modules()
                                                   if n.endswith(".experts")]:
            for param in experts.parameters():  # in the scales' dtype (bf16): compare in fp32
                param.data = param.data.float()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, want_bf16_experts, rtol=1e-5,
                                       atol=1e-5)

    # compressed-tensors decompresses every expert to the trained weights, bit for bit
    quantized = {checkpoint_module(trained.config, n): m
                 for n, m in trained.named_modules() if isinstance(m, FakeQuantLinear)}
    stored = assert_decompresses_to_trained(run_dir / "export", quantized)
    assert any(".experts.0." in n for n in stored)


def test_unfused_experts_compute_what_the_fused_ones_do():
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import Experts, unfuse

    for model_type in FAMILIES:
        config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **FAMILIES[model_type])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            fused = model(ids).logits
            names = unfuse(model)
            assert names and all(isinstance(model.get_submodule(n), Experts) for n in names)
            assert not any(p.ndim == 3 for p in model.parameters())
            torch.testing.assert_close(model(ids).logits, fused, rtol=1e-5, atol=1e-5)


def test_expert_no_calibration_token_reaches_falls_back_to_rtn_and_says_so(tmp_path, capfd):
    # 16 experts, top-1, one calibration sample of 8 tokens: at most 8 experts per layer can be
    # reached, so at least 8 are not
    source = moe_model_dir("mixtral", tmp_path, num_local_experts=16, num_experts_per_tok=1)
    run_dir = tmp_path / "run"
    metrics = _run(source, run_dir, "ptq.calibration_samples=1", "ptq.seq_len=8",
                   "trainer.max_steps=1")
    assert metrics["steps"] == 1
    ptq = json.loads((run_dir / "ptq_report.json").read_text())
    unreached = [n for n, v in ptq["layers"].items() if v.get("tokens") == 0]
    assert len(unreached) >= 8 * 3 * L  # three projections per unreached expert, every layer
    assert all(ptq["layers"][n]["fallback"] == "rtn" and ptq["layers"][n]["bits"] == 4
               for n in unreached)
    assert "no calibration token reached" in capfd.readouterr().out


def test_sixty_four_experts_go_through_the_pipeline(tmp_path):
    source = moe_model_dir("qwen3_moe", tmp_path, num_experts=64, num_experts_per_tok=4,
                           moe_intermediate_size=128)
    metrics = _run(source, tmp_path / "run")
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["ppl"]))
    report = json.loads((tmp_path / "run" / "quant_report.json").read_text())
    assert sum(".experts." in n for n in report["layers"]) == 64 * 3 * L


def test_expert_layout_it_cannot_quantize_is_refused_by_name():
    from torch import nn

    from qat.models.experts import unfuse

    class Transposed(nn.Module):  # 3-D experts in a layout qat does not know
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.zeros(4, 64, 128))
            self.w_out = nn.Parameter(torch.zeros(4, 128, 64))

    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].experts = Transposed()
    with pytest.raises(ValueError, match=r"layers\.0\.experts: Transposed .*cannot quantize"):
        unfuse(model)


def test_footprint_gives_total_and_active_parameters(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.footprint.__main__ import run_report

    source = moe_model_dir("mixtral", tmp_path)
    text, out = run_report(str(source), "w4g128", [])
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    # top-2 of 4 experts: half of the experts' weights are active per token
    assert out["active_params"] == out["params"] - experts // 2
    assert out["active_bf16_bytes"] == 2 * out["active_params"] and "active per token" in text


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - FUSED_CHECKPOINTS))
def test_moe_blocks_are_read_from_the_files_under_the_checkpoints_names(model_type, tmp_path):
    from qat.models import ModelSpec, load_model
    from qat.models.onload import onloaded_model

    source = moe_model_dir(model_type, tmp_path)
    skeleton = onloaded_model(source, torch.float32)
    assert skeleton is not None  # the unfused names (with the family's renames) are the files'
    whole, _ = load_model(ModelSpec(path=str(source), dtype="float32"))
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, whole(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_awq_folds_one_scale_into_every_expert_and_keeps_the_float_function(model_type):
    """The norm feeds every expert, the shared expert and the router: one scale for all of them
    (the router's columns take it too, so the routing is unchanged), then each expert's up ->
    down; with fake quantization off the model computes what it did before AWQ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.blocks import fake_quant_disabled
    from qat.models.experts import unfuse
    from qat.ptq.apply import quantize_model
    from qat.ptq.fold import check_foldable
    from qat.quant.spec import QuantConfig, WeightSpec
    from qat.quant.swap import prepare

    fields = dict(FAMILIES["mixtral"] if model_type == "mixtral" else FAMILIES["qwen3_moe"])
    if model_type == "qwen2_moe":
        fields.pop("head_dim")
        fields["shared_expert_intermediate_size"] = 128
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    unfuse(model)
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    check_foldable(model, "awq")
    report = quantize_model(model, "awq", ids, calibration_samples=4, progress=False)
    assert any(".experts.0.down" in g for g in report.groups)
    assert any(g.endswith("mlp.gate_up") for g in report.groups)
    with torch.no_grad(), fake_quant_disabled(model):
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_on_multi_head_latent_attention_is_refused_before_any_work(tmp_path):
    from qat.train import ConfigError

    source = moe_model_dir("deepseek_v3", tmp_path)
    with pytest.raises(ConfigError, match="quant.init=awq is not supported for DeepseekV3"):
        _run(source, tmp_path / "run", "quant.init=awq")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_router_linears_stay_in_float_unless_a_pattern_names_them():
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import routers, unfuse
    from qat.quant.spec import QuantConfig, WeightSpec
    from qat.quant.swap import plan

    # Qwen2-MoE: a TopKRouter module and a shared_expert_gate Linear(hidden, 1)
    config = AutoConfig.for_model("qwen2_moe", vocab_size=VOCAB, **FAMILIES["qwen3_moe"],
                                  shared_expert_intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config)
    unfuse(model)
    gates = routers(model)
    assert {g.rpartition(".")[2] for g in gates} == {"gate", "shared_expert_gate"}
    spec = WeightSpec(bits=4, group_size=64)
    default = plan(model, QuantConfig(weight=spec))
    assert not {layer.name for layer in default.layers} & set(gates)
    assert set(default.routers) == set(gates)
    named = plan(model, QuantConfig(weight=spec, include=("model.layers.*",
                                                          "*.shared_expert_gate")))
    chosen = {layer.name for layer in named.layers}
    assert {g for g in gates if g.endswith("shared_expert_gate")} <= chosen
    assert any(".experts.0." in n for n in chosen)


def test_forced_routing_replaces_the_routers_choice():
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import experts_modules, forced_routing, recorded_routing, unfuse

    config = AutoConfig.for_model("mixtral", vocab_size=VOCAB, **FAMILIES["mixtral"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    unfuse(model)
    block = model.model.layers[0]
    (name, experts), = experts_modules(block).items()
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with recorded_routing(block) as recorded:
            own = block.mlp(x)
        index, weights = recorded[name][0]
        assert index.shape == (16, 2) and weights.shape == (16, 2)
        with forced_routing(block, {name: (index, weights)}):  # its own choice: the same output
            torch.testing.assert_close(block.mlp(x), own, rtol=0, atol=0)
        every_token_to_expert_3 = (torch.full((16, 1), 3), torch.ones(16, 1))
        with forced_routing(block, {name: every_token_to_expert_3}):
            forced = block.mlp(x)
        torch.testing.assert_close(forced, experts[3](x.reshape(16, H)).reshape(2, 8, H))
    assert experts.forced is None and experts.recorded is None  # both undone on exit


def test_block_stage_with_the_float_blocks_routing(tmp_path):
    source = moe_model_dir("mixtral", tmp_path)
    metrics = _run(source, tmp_path / "run", "blockwise.routing=float")
    assert metrics["blockwise"]["blocks"] == L and metrics["steps"] == 2
    with pytest.raises(Exception, match="blockwise.routing"):
        _run(source, tmp_path / "bad", "blockwise.routing=teacher")


def test_routers_of_an_expert_modulelist_are_found_by_their_shape():
    """transformers 4's layout (and remote-code models): experts as a ModuleList of MLPs beside
    a router Linear with one output per expert; the Linears that are not routers stay."""
    from torch import nn

    from qat.models.experts import routers

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(32, 8, bias=False)  # the router: 8 outputs, 8 experts
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
                                         for _ in range(8))
            self.shared_expert_gate = nn.Linear(32, 1, bias=False)
            self.shared_expert = nn.Linear(32, 32)

    model = nn.Module()
    model.layers = nn.ModuleList([Moe(), Moe()])
    assert routers(model) == [f"layers.{i}.{n}" for i in range(2)
                              for n in ("gate", "shared_expert_gate")]


def test_gptq_in_parts_gives_what_one_pass_gives():
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import unfuse
    from qat.ptq.apply import hessian_parts, quantize_model, quantized_linears
    from qat.quant.spec import QuantConfig, WeightSpec
    from qat.quant.swap import prepare

    config = AutoConfig.for_model("mixtral", vocab_size=VOCAB, **FAMILIES["mixtral"])
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for gib in (4.0, 1e-9):  # one pass per block; one pass per module (each expert alone)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        unfuse(model)
        prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
        layers = quantized_linears(model.model.layers[0], "model.layers.0")
        parts = hessian_parts(layers, gib * 2 ** 30)
        assert len(parts) == (1 if gib > 1 else 1 + 4)  # the attention, then each expert
        quantize_model(model, "gptq", ids, calibration_samples=4, progress=False,
                       hessian_gib=gib)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def _experts_layer(model_type: str, weights: str):
    """The first unfused experts of a random `model_type` MoE with 8 experts, their
    projections fake-quantized as `weights` names ('float' leaves them plain Linears)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.experts import experts_modules, unfuse
    from qat.quant.modules import FakeQuantLinear
    from qat.quant.spec import WeightSpec

    fields = {**FAMILIES[model_type], "num_local_experts": 8}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    unfuse(model)
    layer = next(iter(experts_modules(model).values()))
    specs = {"W4 g32 learned scales": WeightSpec(bits=4, group_size=32, learnable_scale=True),
             "W8 per channel": WeightSpec(bits=8, granularity="channel"),
             "W2 g32 asymmetric, learned grid": WeightSpec(bits=2, group_size=32,
                                                           symmetric=False)}
    for expert in layer if weights != "float" else ():
        for name in expert.names:
            linear = FakeQuantLinear.from_linear(getattr(expert, name), specs[weights])
            if weights.endswith("learned grid"):  # the block stage's trained scale and zero point
                linear.weight_fake_quant.learn_grid(linear.weight)
            setattr(expert, name, linear)
    return layer


def _routed(layer, x, index, weights, batched: bool):
    """Output and every gradient (None where none flowed) of one forward + backward."""
    layer.batched = batched
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = layer(x, index, weights)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, weights.grad, grads


@pytest.mark.parametrize("weights", ["float", "W4 g32 learned scales", "W8 per channel",
                                     "W2 g32 asymmetric, learned grid"])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_batched_experts_compute_and_train_what_the_loop_does(model_type, weights, monkeypatch):
    """One fake quantization and one grouped matmul per projection over runs of experts: the
    loop's output and gradients (input, routing weights, every weight, scale and zero point),
    no gradient at all for the expert no token reaches, a dropped slot ignored; GPT-OSS's
    biases and clamped SwiGLU too."""
    import qat.models.experts as experts

    layer = _experts_layer(model_type, weights)
    gate = getattr(layer[0], layer[0].names[0])
    monkeypatch.setattr(experts, "CPU_RUN_ELEMENTS", 3 * gate.weight.numel())  # runs of 3
    generator = torch.Generator().manual_seed(1)
    tokens = 40
    x = torch.randn(tokens, H, generator=generator)
    index = torch.stack([torch.randperm(7, generator=generator)[:2] for _ in range(tokens)])
    index[3, 1] = 8  # a dropped slot (index E, as transformers marks one)
    routing = torch.rand(tokens, 2, generator=generator)
    y, grad_x, grad_routing, grads = _routed(layer, x, index, routing, batched=True)
    y_loop, grad_x_loop, grad_routing_loop, grads_loop = _routed(layer, x, index, routing,
                                                                 batched=False)
    torch.testing.assert_close(y, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, grad_x_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_routing, grad_routing_loop, rtol=1e-5, atol=1e-6)
    unreached = {name for name in grads_loop if name.startswith("7.")}
    assert unreached and {n for n, g in grads_loop.items() if g is None} == unreached
    assert {n for n, g in grads.items() if g is None} == unreached
    trained = set(grads) - unreached
    assert ("learned" in weights) == any("scale" in n for n in trained)
    for name in trained:
        torch.testing.assert_close(grads[name], grads_loop[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_batched_experts_under_autocast_compute_in_its_dtype():
    """Grouped matmuls are no autocast ops: the batched path casts as F.linear would."""
    layer = _experts_layer("mixtral", "W4 g32 learned scales")
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(0))
    index = torch.stack([torch.randperm(8)[:2] for _ in range(24)])
    routing = torch.rand(24, 2)
    outputs = []
    for batched in (True, False):
        layer.batched = batched
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(layer(x, index, routing))
    assert outputs[0].dtype == outputs[1].dtype == torch.float32  # index_add_ into x's dtype
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)


def test_hooked_experts_are_called_one_at_a_time():
    """A hook on an expert (calibration statistics) sees that expert's call: the layer runs the
    loop even when asked to batch."""
    layer = _experts_layer("mixtral", "W4 g32 learned scales")
    layer.batched = True
    seen = []
    handle = layer[2].w1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(0))
    index = torch.stack([torch.tensor([2, t % 2]) for t in range(16)])
    with torch.no_grad():
        layer(x, index, torch.full((16, 2), 0.5))
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], x)


@pytest.mark.parametrize("k,n", [(64, 32), (6, 5)])  # grouped_mm's aligned strides; a loop
def test_segment_matmuls_multiply_each_experts_rows(k, n):
    from qat.models.experts import segment_matmul, segment_outer

    generator = torch.Generator().manual_seed(0)
    counts = [3, 1, 7, 5]
    x = torch.randn(sum(counts), k, generator=generator)
    w = torch.randn(len(counts), k, n, generator=generator)
    g = torch.randn(sum(counts), n, generator=generator)
    rows = torch.tensor(counts).cumsum(0).tolist()
    spans = list(zip([0] + rows[:-1], rows))
    torch.testing.assert_close(segment_matmul(x, w, counts),
                               torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(spans)]))
    torch.testing.assert_close(segment_outer(g, x, counts),
                               torch.stack([g[a:b].t() @ x[a:b] for a, b in spans]))


def test_experts_batch_on_accelerators_and_for_small_experts_on_a_cpu():
    from qat.models.experts import CPU_BATCHED_ELEMENTS, batches_on

    assert batches_on(torch.device("cpu"), CPU_BATCHED_ELEMENTS)
    assert not batches_on(torch.device("cpu"), CPU_BATCHED_ELEMENTS + 1)
    assert batches_on(torch.device("cuda"), 4096 * 14336)

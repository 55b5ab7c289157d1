"""Every causal-LM family we claim: a tiny random model of each, built from transformers' own config
class, through train.py's pipeline (prepare -> 2 steps -> export -> load) with the default include."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import assert_decompresses_to_trained, compose_train

H, I, L, HEADS, KV, VOCAB = 128, 256, 2, 4, 2, 512
_LLAMA_LIKE = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                   num_attention_heads=HEADS, num_key_value_heads=KV)
# model_type -> config fields (each family names its widths its own way)
ARCHITECTURES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=32),
    "gemma2": dict(_LLAMA_LIKE, head_dim=32),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=32),  # scaled embeddings, sliding + global layers
    "phi3": _LLAMA_LIKE,                              # fused qkv_proj and gate_up_proj
    "stablelm": _LLAMA_LIKE,
    "gpt2": dict(n_embd=H, n_layer=L, n_head=HEADS, n_positions=1024),  # Conv1D projections
    "gptj": dict(n_embd=H, n_layer=L, n_head=HEADS, rotary_dim=16, n_positions=1024),
    "gpt_neox": dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                     num_attention_heads=HEADS),
    "opt": dict(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=HEADS,
                word_embed_proj_dim=H),
    "falcon": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS),  # FalconLinear
    "phi": dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS),
    "bloom": dict(hidden_size=H, n_layer=L, n_head=HEADS),
}
HEAD_BIAS = {"phi", "gptj"}  # their lm_head has a bias: no int8 head
NOT_FOR_TRANSFORMERS = {"gpt2": "Conv1D", "falcon": "FalconLinear"}  # compressed-tensors: Linear only


def tiny_model_dir(model_type: str, root):
    """A random 2-block model of `model_type` with the tiny BPE, saved as a Hugging Face dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.tiny import tiny_tokenizer

    directory = root / model_type
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2, max_position_embeddings=1024,
                                  **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def _run(source, run_dir, *overrides):
    from qat.train import train

    return train(compose_train([
        "recipe=w4g128", f"model.path={source}", "data=tiny", "logger=none",
        "trainer.enable_progress_bar=false", "trainer.max_steps=2", "eval.fp_ppl=false",
        *overrides]), run_dir=run_dir)


PTQ_TINY = ["ptq.calibration_samples=4", "ptq.seq_len=32", "ptq.progress=false"]
BLOCKS_TINY = ["blockwise=default", "blockwise.samples=4", "blockwise.seq_len=32",
               "blockwise.epochs=1", "blockwise.progress=false", "eval.stage_ppl=false"]


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_train_export_load_serves_the_trained_model(model_type, tmp_path):
    from qat.export.compressed_tensors import as_exported
    from qat.export.load import load_quantized
    from qat.models.checkpoint import model_from_checkpoint
    from qat.quant import FakeQuantLinear

    source = tiny_model_dir(model_type, tmp_path)
    run_dir = tmp_path / "run"
    # the whole pipeline: GPTQ start, block stage, 2 steps of KD from the float teacher, export
    metrics = _run(source, run_dir, "quant.init=gptq", *PTQ_TINY, *BLOCKS_TINY, "distill=kd",
                   "export.enabled=true")
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["ppl"]))
    assert metrics["blockwise"]["blocks"] == L

    trained, _, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    quantized = {n: m for n, m in trained.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(quantized) >= 4 * L, sorted(quantized)  # every block's projections, found by structure
    assert not any(n.startswith("lm_head") or "embed" in n for n in quantized)

    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    served = load_quantized(run_dir / "export", dtype=torch.float32, backend="reference")
    with torch.no_grad(), as_exported(trained.eval(), torch.bfloat16):
        want = trained(ids).logits
    torch.testing.assert_close(served(ids).logits, want, rtol=1e-5, atol=1e-5)

    # int8 embedding and head (a serving-time choice): scaled embeddings keep their scale
    if model_type in HEAD_BIAS:
        with pytest.raises(ValueError, match="embedding_bits=8: the output head .* has a bias"):
            load_quantized(run_dir / "export", dtype=torch.float32, embedding_bits=8)
    else:
        small = load_quantized(run_dir / "export", dtype=torch.float32, backend="reference",
                               embedding_bits=8)
        got = small(ids).logits
        assert ((got - want).norm() / want.norm()).item() < 0.03

    # transformers + compressed-tensors load it unchanged, or the serving report says why not
    report = json.loads((run_dir / "export" / "serving_report.json").read_text())
    hf = report["transformers"]
    assert report["qat"]["servable"]
    if model_type in NOT_FOR_TRANSFORMERS:
        assert not hf["servable"] and NOT_FOR_TRANSFORMERS[model_type] in " ".join(hf["reasons"])
    else:
        assert hf["servable"], hf["reasons"]
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)

    # the compressed-tensors package unpacks every stored layer to the weights we trained
    assert_decompresses_to_trained(run_dir / "export", quantized)


@pytest.mark.parametrize("model_type,overrides,message", [
    ("gemma3_text", ["quant.init=awq", *PTQ_TINY],
     r"quant.init=awq is not supported for Gemma3ForCausalLM .*changes their output"),
    ("gpt2", ["quant.init=smoothquant", *PTQ_TINY],
     r"quant.init=smoothquant is not supported for GPT2LMHeadModel .*has no"),
    ("phi3", ["prune=magnitude", "prune.pattern=heads", "prune.sparsity=0.5"],
     r"prune.pattern='heads' is not supported for Phi3ForCausalLM .*q_proj"),
    ("stablelm", ["prune=magnitude", "prune.pattern=heads", "prune.sparsity=0.5"],
     r"prune.pattern='heads' is not supported for StableLmForCausalLM .*head_dim"),
    ("opt", ["prune=magnitude", "prune.pattern=channels", "prune.sparsity=0.5"],
     r"prune.pattern='channels' is not supported for OPTForCausalLM .*gate_proj"),
])
def test_layout_dependent_features_refuse_before_any_work(model_type, overrides, message,
                                                          tmp_path):
    from qat.train import ConfigError

    source = tiny_model_dir(model_type, tmp_path)
    with pytest.raises(ConfigError, match=message):
        _run(source, tmp_path / "run", *overrides)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_gpt2_pruned_float_conv1d_is_exported_in_its_own_layout(tmp_path):
    """2:4 pruning turns every Conv1D into a Linear; one kept in float goes back to (in, out)."""
    from qat.models.checkpoint import model_from_checkpoint
    from qat.export.compressed_tensors import as_exported
    from qat.export.load import load_quantized

    source = tiny_model_dir("gpt2", tmp_path)
    run_dir = tmp_path / "run"
    _run(source, run_dir, "prune=nm", "prune.calibration_samples=4", "export.enabled=true",
         "quant.exclude=[lm_head,'*wte*','*wpe*','*.mlp.c_proj']")
    with safe_open(str(run_dir / "export" / "model.safetensors"), framework="pt") as f:
        kept = f.get_tensor("transformer.h.0.mlp.c_proj.weight")
        assert "transformer.h.0.mlp.c_fc.weight_packed" in f.keys()
    assert tuple(kept.shape) == (4 * H, H)  # Conv1D layout: (in, out)
    assert (kept.t().float().reshape(-1, 4) != 0).sum(dim=1).max() <= 2  # 2:4 along the inputs
    trained, _, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    served = load_quantized(run_dir / "export", dtype=torch.float32, backend="reference")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), as_exported(trained.eval(), torch.bfloat16):
        want = trained(ids).logits
    torch.testing.assert_close(served(ids).logits, want, rtol=1e-5, atol=1e-5)

"""qat.serve.decode.greedy: the same greedy tokens as Hugging Face generate, for float and exported models."""
from __future__ import annotations

import pytest
import torch

from qat.serve.decode import greedy, native_step, new_caches
from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat import native
from qat.quant import QuantConfig, WeightSpec, prepare

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler or AVX2/FMA")


@pytest.fixture
def peaked(tiny_llama):
    """Larger weights: peaked next-token distributions, so greedy ties cannot flip on rounding."""
    with torch.no_grad():
        for p in tiny_llama.parameters():
            p.mul_(4)
    return tiny_llama


def _hf(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:]


def test_float_model_matches_generate(peaked):
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(peaked, ids, 40), _hf(peaked, ids, 40))


@pytest.mark.parametrize("embedding_bits", [None, 8])
def test_export_matches_generate(peaked, tmp_path, embedding_bits):
    prepare(peaked, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(peaked, None, tmp_path / "e", dtype=torch.float32)
    served = load_quantized(tmp_path / "e", dtype=torch.float32, embedding_bits=embedding_bits)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy(served, ids, 40), _hf(served, ids, 40))


def test_stops_at_eos_and_rejects_what_it_cannot_do(peaked):
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(2))
    tokens = greedy(peaked, ids, 10)
    first = int(tokens[0])
    assert greedy(peaked, ids, 10, eos_token_id=first).tolist() == [first]
    with pytest.raises(ValueError, match="batch 1"):
        greedy(peaked, ids.repeat(2, 1), 3)
    peaked.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type"):
        greedy(peaked, ids, 3)


def _tiny_qwen2():
    """The tiny Llama's shapes as a Qwen2 model: q/k/v carry biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True)).eval()


def _served(model, directory, symmetric=True, dtype=torch.float32):
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64, symmetric=symmetric)))
    export_model(model, None, directory, dtype=dtype)
    return load_quantized(directory, dtype=dtype)


def _step_for(model, total):
    return native_step(model, new_caches(model, total, torch.float32))


@needs_native
@pytest.mark.parametrize("arch,symmetric", [("llama", True), ("llama", False), ("qwen2", True)])
def test_native_step_reproduces_the_model_forward_at_every_position(peaked, tmp_path, arch,
                                                                     symmetric):
    model = peaked if arch == "llama" else _tiny_qwen2()
    served = _served(model, tmp_path / "e", symmetric)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = served(ids, output_hidden_states=True).hidden_states[-1][0]  # after the norm
        step = _step_for(served, ids.shape[1])
        assert step is not None
        for t in range(ids.shape[1]):  # every position through the native step, from an empty cache
            h = served.model.embed_tokens(ids[:, t]).reshape(-1).contiguous()
            step(h, t)
            torch.testing.assert_close(served.model.norm(h), reference[t], rtol=1e-4, atol=1e-4)


@needs_native
def test_native_greedy_matches_the_torch_loop(peaked, tmp_path):
    served = _served(peaked, tmp_path / "e")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    assert torch.equal(greedy(served, ids, 40), greedy(served, ids, 40, native=False))


def test_native_step_applies_only_to_float32_4bit_gemv_models(peaked, tmp_path):
    assert _step_for(peaked, 8) is None  # float Linears
    bf16 = _served(peaked, tmp_path / "e", dtype=torch.bfloat16)
    assert _step_for(bf16, 8) is None  # bf16 caches and norms
    served = load_quantized(tmp_path / "e", dtype=torch.float32, backend="torch")
    assert _step_for(served, 8) is None  # torch's int4 kernel, not our GEMV
    step = _step_for(load_quantized(tmp_path / "e", dtype=torch.float32), 8)
    assert (step is not None) == native.available()
    if step is not None:
        with pytest.raises(ValueError, match="outside the cache"):
            step(torch.zeros(128), 8)
        with pytest.raises(ValueError, match="float32"):
            step(torch.zeros(128, dtype=torch.bfloat16), 0)

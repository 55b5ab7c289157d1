"""qat.decode.greedy: the same greedy tokens as Hugging Face generate, for float and exported models."""
from __future__ import annotations

import pytest
import torch

from qat.decode import greedy
from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat.quant import QuantConfig, WeightSpec, prepare


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

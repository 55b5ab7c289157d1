"""Perplexity follows the protocol exactly: independent windows, positions 1..T-1, pooled NLL."""
import math

import pytest
import torch
from torch import nn

from qat.eval.perplexity import eval_windows, perplexity, window_nll
from qat.data import DataSpec
from qat.lightning.data import TextDataModule
from qat.models import ModelSpec, load_model


@pytest.fixture
def tiny():
    return load_model(ModelSpec(name="tiny"))


def direct_nll(model, ids, window, n_windows):
    """The protocol written as plainly as possible: one window at a time, full logits."""
    total = 0.0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * window : (w + 1) * window]
            logits = model(x[None]).logits[0].float()  # (T, V)
            total += nn.functional.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_equals_a_direct_computation(tiny, batch_size):
    model, _ = tiny
    ids = torch.randint(0, 512, (64 * 7 + 13,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, window=64, max_windows=None, batch_size=batch_size)
    nll = direct_nll(model, ids, 64, 7)
    assert (result.n_windows, result.n_tokens) == (7, 7 * 63)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / (7 * 63)), rel=1e-5)
    assert result.ppl == math.exp(result.nll_sum / result.n_tokens)


def test_max_windows_scores_only_the_first_windows(tiny):
    model, _ = tiny
    ids = torch.randint(0, 512, (64 * 5,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, window=64, max_windows=2, batch_size=4)
    assert result.n_windows == 2 and result.nll_sum == pytest.approx(direct_nll(model, ids, 64, 2),
                                                                     rel=1e-5)


def test_chunked_loss_covers_rows_beyond_one_chunk(tiny):
    model, _ = tiny
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nll, n = window_nll(model, ids.view(1, 300))  # 299 rows: more than CE_CHUNK_ROWS
    assert n == 299 and nll.item() == pytest.approx(direct_nll(model, ids, 300, 1), rel=1e-5)


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/V, so the perplexity is exactly V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab) + 0 * self.anchor

        return Out()


def test_a_uniform_model_has_perplexity_equal_to_its_vocab():
    result = perplexity(Uniform(1000), torch.arange(40) % 1000, window=10, batch_size=3)
    assert result.n_tokens == 36
    assert result.ppl == pytest.approx(1000.0, rel=1e-6)


def test_training_mode_is_restored(tiny):
    model, _ = tiny
    ids = torch.arange(128) % 512
    model.train()
    perplexity(model, ids, window=64)
    assert model.training
    model.eval()
    perplexity(model, ids, window=64)
    assert not model.training


def test_dropout_is_off_during_eval(tiny):
    """Eval mode matters: with dropout active two runs would differ."""
    model, _ = tiny
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    ids = torch.randint(0, 512, (128,), generator=torch.Generator().manual_seed(3))
    assert perplexity(model, ids, window=64).nll_sum == perplexity(model, ids, window=64).nll_sum


def test_bfloat16_models_are_scored_in_float32():
    model, _ = load_model(ModelSpec(name="tiny", dtype="bfloat16"))
    ids = torch.randint(0, 512, (128,), generator=torch.Generator().manual_seed(4))
    result = perplexity(model, ids, window=64)
    assert isinstance(result.nll_sum, float)
    assert result.nll_sum == pytest.approx(direct_nll(model, ids, 64, 2), rel=1e-5)


@pytest.mark.parametrize("ids,window,max_windows,match", [
    (torch.arange(63), 64, None, "fewer than one eval window"),
    (torch.arange(100).view(10, 10), 5, None, "1-D"),
    (torch.arange(100), 1, None, "window"),
    (torch.arange(100), 10, 0, "max_windows"),
])
def test_bad_inputs_are_refused(ids, window, max_windows, match):
    with pytest.raises(ValueError, match=match):
        eval_windows(ids, window, max_windows)


def test_empty_token_tensor_is_refused(tiny):
    with pytest.raises(ValueError, match="fewer than one eval window"):
        perplexity(tiny[0], torch.zeros(0, dtype=torch.long), window=64)


def test_datamodule_windows_give_the_same_number(tiny):
    """Summing window_nll over val_dataloader (what a LightningModule does) equals perplexity()."""
    model, tok = tiny
    dm = TextDataModule(DataSpec(name="tiny", block_size=64, eval_window=64, eval_windows=8), tok,
                        max_positions=model.config.max_position_embeddings)
    dm.setup("validate")
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            part, count = window_nll(model, batch["input_ids"])
            nll, n = nll + part.item(), n + count
    result = perplexity(model, dm.eval_ids, window=64, max_windows=8)
    assert (n, result.n_tokens) == (8 * 63, 8 * 63)
    assert result.nll_sum == pytest.approx(nll, rel=1e-6)
    assert result.ppl > 100  # an untrained 512-token model is close to uniform

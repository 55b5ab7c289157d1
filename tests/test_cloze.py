"""The LAMBADA-style cloze task (qat.eval.cloze): items from held-out text, greedy accuracy."""
import math

import pytest
import torch

from qat.eval.cloze import (MIN_CONTEXT_WORDS, MIN_TARGET_LETTERS, ClozeItem, cloze_accuracy,
                            cloze_items, encode)

LETTERS = "abcdefghij"
FILLER = " ".join(f"word{i}" for i in range(MIN_CONTEXT_WORDS))
TEXTS = [
    f"The river Tamsin floods in spring. {FILLER} Every farmer along its banks fears the Tamsin."
    " Short one.",
    f"No repeated ending here. {FILLER} The last word is novel.",
    f"Cats sleep. {FILLER} They wake at noon and the cats sleep again. Then Cats!",
]


def test_items_end_a_sentence_with_a_word_met_earlier_in_the_entry():
    items = cloze_items(TEXTS)
    assert items == [
        ClozeItem(f"The river Tamsin floods in spring. {FILLER} Every farmer along its banks "
                  "fears the", "Tamsin"),
        ClozeItem(f"Cats sleep. {FILLER} They wake at noon and the cats sleep again. Then",
                  "Cats"),
    ]  # not "one" (too short), "novel" or "again" (not met before)
    for item in items:
        assert len(item.target) >= MIN_TARGET_LETTERS and item.target in item.context.split()
        assert any(text.startswith(f"{item.context} {item.target}") for text in TEXTS)


def test_items_are_deterministic_and_spread_evenly_when_capped():
    texts = [f"Alpha{LETTERS[i]} begins. {FILLER} It ends with Alpha{LETTERS[i]}." for i in range(10)]
    every = cloze_items(texts, 100)
    assert [i.target for i in every] == [f"Alpha{c}" for c in LETTERS[:10]]
    assert cloze_items(texts, 100) == every
    assert [i.target for i in cloze_items(texts, 3)] == ["Alphaa", "Alphad", "Alphag"]
    with pytest.raises(ValueError, match="cloze items must be >= 1"):
        cloze_items(texts, 0)


def greedy_by_generation(model, tokenizer, item):
    """Whether HF's greedy generate writes the target's tokens after the context, one item at a
    time (no batching, no padding), and the target's NLL from an unpadded forward pass."""
    context, target = encode(tokenizer, item)
    ids = torch.tensor([context])
    written = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                             do_sample=False, pad_token_id=0)[0, len(context):].tolist()
    logprobs = torch.log_softmax(model(torch.tensor([context + target])).logits[0].float(), -1)
    nll = -sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(target))
    return written == target, nll


def test_accuracy_is_greedy_decoding_of_the_whole_target_in_any_batch():
    from qat.models import ModelSpec, load_model

    model, tokenizer = load_model(ModelSpec(name="tiny"))
    texts = [f"Zeta{LETTERS[i]} opens the text {i}. {FILLER} {'and ' * i}closes with Zeta{LETTERS[i]}."
             for i in range(6)]
    items = cloze_items(texts)
    direct = [greedy_by_generation(model, tokenizer, item) for item in items]
    for batch_size in (1, 4):
        result = cloze_accuracy(model, tokenizer, items, batch_size=batch_size)
        assert result.n_items == len(items) == 6
        assert result.accuracy == sum(ok for ok, _ in direct) / len(items)
        assert result.target_nll == pytest.approx(sum(n for _, n in direct) / len(items),
                                                  rel=1e-5)
    assert model.training is False


class NextTokenTable(torch.nn.Module):
    """A language model that predicts, after each token, the one `table` maps it to."""

    def __init__(self, table: dict[int, int], vocab: int):
        super().__init__()
        self.vocab, self.table = vocab, table
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device and a training mode

    def forward(self, input_ids, use_cache=False):
        nxt = input_ids.clone().apply_(lambda t: self.table.get(t, 0))
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10 + self.anchor
        return type("Out", (), {"logits": logits})()


def test_an_item_counts_only_when_every_target_token_is_the_greedy_one():
    from qat.models import ModelSpec, load_model

    _, tokenizer = load_model(ModelSpec(name="tiny"))
    item = cloze_items([f"Omega starts. {FILLER} and ends Omega."])[0]
    context, target = encode(tokenizer, item)
    chain = [context[-1], *target]
    model = NextTokenTable(dict(zip(chain[:-1], chain[1:])), tokenizer.vocab_size)
    assert cloze_accuracy(model, tokenizer, [item]).accuracy == 1.0
    # each target token at logit 10 against V - 1 tokens at 0
    per_token = math.log1p((tokenizer.vocab_size - 1) * math.exp(-10))
    assert cloze_accuracy(model, tokenizer, [item]).target_nll == pytest.approx(
        len(target) * per_token, rel=1e-4)  # float32 log-softmax
    wrong_last = dict(zip(chain[:-1], chain[1:]))
    wrong_last[chain[-2]] = (chain[-1] + 1) % tokenizer.vocab_size  # all right but the last
    assert cloze_accuracy(NextTokenTable(wrong_last, tokenizer.vocab_size), tokenizer,
                          [item]).accuracy == 0.0


def test_the_float_models_result_is_cached_per_model_and_items(tmp_path, monkeypatch):
    import copy

    from qat.eval.stage import float_cloze
    from qat.models import ModelSpec, load_model

    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    model, tokenizer = load_model(ModelSpec(name="tiny"))
    items = cloze_items([f"Beta{LETTERS[i]} first. {FILLER} last Beta{LETTERS[i]}." for i in range(4)])
    first = float_cloze(model, tokenizer, items)
    [path] = (tmp_path / "cloze").glob("*.json")
    path.write_text(path.read_text().replace(f'"target_nll": {first.target_nll}',
                                             '"target_nll": -1.0'))
    assert float_cloze(model, tokenizer, items).target_nll == -1.0  # read from the cache
    assert float_cloze(model, tokenizer, items[:3]).target_nll != -1.0  # other items
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    assert float_cloze(other, tokenizer, items).target_nll != -1.0  # another model
    assert len(list((tmp_path / "cloze").glob("*.json"))) == 3

"""A LAMBADA-style cloze task built from a corpus's held-out entries (issue 33): predict the last
word of a sentence from everything before it in the same entry.

LAMBADA keeps passages whose last word needs the broad context; the rule that picks such items
from plain text without human raters is that the word already occurred earlier in the passage (a
name, the topic), so an item tests whether the model uses its context, not only local grammar.
An item counts as correct when greedy decoding writes the whole target word (every target token
is the argmax given the tokens before it), LAMBADA's accuracy; its log-likelihood is kept too.

The items are a pure function of the texts (no randomness, no download), so the float model and
every quantized one answer the same questions, and the default model gets a real accuracy offline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ITEMS = 200  # enough for a standard error of ~3 points at 50% accuracy, ~20 s on 2 cores at 135M
MAX_CONTEXT_TOKENS = 128  # longer contexts keep their last tokens (LAMBADA: ~80 on average)
MIN_CONTEXT_WORDS = 20
SEARCHED_WORDS = 80  # the target must occur in the context's last words (~110 tokens)
MIN_TARGET_LETTERS = 4

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"(?<![\w'-])([A-Za-z]+)[.!?]$")


@dataclass(frozen=True)
class ClozeItem:
    """The text before the target word (no trailing space) and the word itself."""

    context: str
    target: str


@dataclass(frozen=True)
class ClozeResult:
    accuracy: float  # fraction of items whose target greedy decoding writes exactly
    target_nll: float  # mean negative log-likelihood of a whole target word, nats
    n_items: int

    def to_dict(self) -> dict:
        return {"cloze_acc": self.accuracy, "cloze_nll": self.target_nll,
                "cloze_items": self.n_items}


def cloze_items(texts: list[str], n: int = ITEMS) -> list[ClozeItem]:
    """Up to `n` items from `texts`, in order: the end of every sentence whose last word (letters
    only, >= MIN_TARGET_LETTERS) occurs among the SEARCHED_WORDS before it in its entry, after
    >= MIN_CONTEXT_WORDS words; when there are more, `n` evenly spaced ones. Deterministic."""
    if n < 1:
        raise ValueError(f"cloze items must be >= 1, got {n}")
    found = []
    for text in texts:
        start = 0
        for sentence in _SENTENCE_END.split(text):
            at = text.index(sentence, start)
            start = at + len(sentence)
            match = _LAST_WORD.search(sentence)
            if match is None or len(match.group(1)) < MIN_TARGET_LETTERS:
                continue
            context = text[: at + match.start(1)].rstrip()
            word = match.group(1)
            words = context.split()[-SEARCHED_WORDS:]  # what the model will see of it
            if len(words) >= MIN_CONTEXT_WORDS and \
                    re.search(rf"\b{re.escape(word)}\b", " ".join(words)):
                found.append(ClozeItem(context, word))
    if len(found) > n:
        found = [found[i * len(found) // n] for i in range(n)]
    return found


def encode(tokenizer, item: ClozeItem) -> tuple[list[int], list[int]]:
    """(context ids, target ids): the target encoded with its leading space, apart from the
    context, as lm-evaluation-harness splits a continuation; the context keeps its last
    MAX_CONTEXT_TOKENS."""
    context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    target = tokenizer(" " + item.target, add_special_tokens=False)["input_ids"]
    return context[-MAX_CONTEXT_TOKENS:], target


@torch.no_grad()
def cloze_accuracy(model: torch.nn.Module, tokenizer, items: list[ClozeItem],
                   batch_size: int = 8) -> ClozeResult:
    """Greedy accuracy and mean target NLL of `model` on `items` (eval mode, restored)."""
    if not items:
        raise ValueError("cloze: no items to score")
    encoded = sorted((encode(tokenizer, item) for item in items), key=lambda e: -len(e[0] + e[1]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, nll = 0, 0.0
    try:
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b:b + batch_size]
            length = max(len(c) + len(t) for c, t in batch)
            # right padding: a causal model's logits at the real positions never see it
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            for row, (c, t) in enumerate(batch):
                ids[row, : len(c) + len(t)] = torch.tensor(c + t)
            logprobs = torch.log_softmax(
                model(input_ids=ids.to(device), use_cache=False).logits.float(), -1).cpu()
            for row, (c, t) in enumerate(batch):
                scores = logprobs[row, len(c) - 1: len(c) + len(t) - 1]
                target = torch.tensor(t)
                correct += bool((scores.argmax(-1) == target).all())
                nll -= float(scores.gather(-1, target[:, None]).sum())
    finally:
        model.train(was_training)
    return ClozeResult(correct / len(encoded), nll / len(encoded), len(encoded))

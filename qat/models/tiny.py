"""The "tiny" builtin: a random Llama and a byte-level BPE trained locally, for fast offline tests.

The tokenizer is trained on `tiny_corpus.txt`, template-generated English prose shipped with the
package (original text, deterministic), so nothing is downloaded. It is built once per vocab size and
corpus and cached under `cache_dir()/models/`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qat.assets import cache_dir
from qat.io import atomic_path
from qat.models.spec import ModelSpec

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def tiny_corpus_path() -> Path:
    """The shipped plain-text corpus: paragraphs separated by blank lines."""
    return Path(__file__).with_name("tiny_corpus.txt")


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with exactly `vocab_size` entries (ids 0-2: <s>, </s>, <pad>).

    Byte-level so every string round-trips. Trained on the tiny corpus (~50 ms) and cached, so every
    process with the same vocab size and corpus gets the very same merges.
    """
    corpus = tiny_corpus_path().read_bytes()
    digest = hashlib.sha256(corpus).hexdigest()[:8]
    # the corpus digest in the name keeps an edited corpus from reusing a stale tokenizer
    target = cache_dir() / "models" / f"tiny-tokenizer-v{vocab_size}-{digest}"
    if not (target / "tokenizer.json").exists():
        _build_tokenizer(corpus.decode("utf-8"), vocab_size, target)
    tok = PreTrainedTokenizerFast.from_pretrained(str(target))
    if len(tok) != vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is more than the tiny corpus supports "
                         f"(the trained BPE has {len(tok)} tokens); use a smaller vocab_size")
    return tok


def _build_tokenizer(text: str, vocab_size: int, target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    log.info("training the tiny byte-level BPE (vocab %d) into %s", vocab_size, target)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)
    with atomic_path(target, is_dir=True) as tmp:  # never a half-written tokenizer in the cache
        fast.save_pretrained(str(tmp))
        tmp.chmod(0o755)


def tiny_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama with tied embeddings; same `spec.seed` gives the same weights."""
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.attn_implementation is not None:
        config._attn_implementation = spec.attn_implementation
    # fork_rng: seeding must not disturb the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.to(spec.torch_dtype).eval()

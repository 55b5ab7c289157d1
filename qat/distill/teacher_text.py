"""Data-free distillation (LLM-QAT, Liu et al. 2023): train on sequences the teacher writes itself.

The teacher samples `n` sequences once; they are cached on disk under a key of the teacher's
weights and the sampling settings, so later runs (and other recipes) reuse them.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
from torch import nn

from qat.io import atomic_path


def sample_sequences(teacher: nn.Module, n: int, length: int, *, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 32, first_token_ids=None,
                     bos_token_id: int | None = None) -> torch.Tensor:
    """(n, length) token ids sampled from `teacher`, each started from a random first token.

    LLM-QAT starts every sequence from a token drawn uniformly from the vocabulary (here from
    `first_token_ids` when given, e.g. the tokens of ordinary words) and then samples freely.
    """
    device = next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    pool = torch.as_tensor(first_token_ids) if first_token_ids is not None else torch.arange(vocab)
    rows = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        first = pool[torch.randint(len(pool), (b, 1), generator=generator)]
        prefix = first if bos_token_id is None else torch.cat(
            [torch.full((b, 1), bos_token_id), first], dim=1)
        rows.append(_sample(teacher, prefix.to(device), length, temperature,
                            seed + start).cpu()[:, -length:])
    return torch.cat(rows)


@torch.no_grad()
def _sample(model: nn.Module, prefix: torch.Tensor, length: int, temperature: float,
            seed: int) -> torch.Tensor:
    # transformers >= 5.x names the KV cache `cache`; earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    generator = torch.Generator(device=prefix.device).manual_seed(seed)
    out = model(input_ids=prefix, use_cache=True)
    ids = prefix
    while ids.shape[1] < length + (prefix.shape[1] - 1):
        logits = out.logits[:, -1, :].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
        out = model(input_ids=nxt, use_cache=True, **{cache_arg: out[cache_arg]})
    return ids


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Hash of a sample of the weights: different teachers never share a cache entry."""
    h = hashlib.sha256()
    for name, p in sorted(teacher.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def generated_blocks(teacher: nn.Module, tokenizer, n: int, length: int, cache_dir: Path, *,
                     seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """The cached (n, length) teacher-written training blocks, sampled on the first call."""
    from safetensors.torch import load_file, save_file

    key = f"{teacher_fingerprint(teacher)}-n{n}-len{length}-s{seed}-t{temperature:g}"
    path = Path(cache_dir) / "generated" / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    was_training = teacher.training
    teacher.eval()
    blocks = sample_sequences(teacher, n, length, seed=seed, temperature=temperature,
                              bos_token_id=bos, first_token_ids=_word_tokens(tokenizer))
    teacher.train(was_training)
    with atomic_path(path) as tmp:
        save_file({"input_ids": blocks.contiguous()}, str(tmp))
    return blocks


def _word_tokens(tokenizer) -> list[int] | None:
    """Ids of plain alphabetic tokens: a sensible first token, unlike control or byte tokens."""
    if tokenizer is None:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if i not in special and tok.lstrip("Ġ▁").isalpha()]
    return sorted(ids) or None


def teacher_written(teacher: nn.Module | None, model: nn.Module, tokenizer, spec) -> torch.Tensor:
    """Data-free QAT: (data.generated_samples, data.block_size) training blocks written by the
    teacher (or, without one, a frozen copy of the float model), cached in $QAT_CACHE.

    `spec`: the run's DataSpec (generated_samples, block_size, seed, generation_temperature)."""
    import copy
    import time

    from qat.assets import cache_dir
    from qat.distill.teacher import freeze

    writer = teacher if teacher is not None else freeze(copy.deepcopy(model))
    start = time.perf_counter()
    blocks = generated_blocks(writer, tokenizer, spec.generated_samples, spec.block_size,
                              cache_dir(), seed=spec.seed, temperature=spec.generation_temperature)
    print(f"data: training on {blocks.shape[0]} teacher-written sequences of "
          f"{spec.block_size} tokens ({time.perf_counter() - start:.0f} s)")
    return blocks

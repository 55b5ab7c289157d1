"""Text generation with an export or a float model: load either, decode, count memory."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def resident_bytes(field: str = "VmRSS") -> int:
    """A memory field of this process from Linux /proc/self/status (VmRSS: resident now, VmHWM:
    its peak), in bytes; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_any(source: str, dtype: torch.dtype, embedding_bits: int | None = None):
    """(model, tokenizer) from an export dir, a float HF model dir, or a builtin model name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        import json
        if "quantization_config" in json.loads((path / "config.json").read_text()):
            from qat.export.load import load_quantized
            return (load_quantized(path, dtype=dtype, embedding_bits=embedding_bits),
                    AutoTokenizer.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    from qat.models import ModelSpec, load_model
    model, tokenizer = load_model(ModelSpec(name=source))
    return model.to(dtype).eval(), tokenizer


def weight_bytes(model) -> int:
    from qat.export.load import weight_bytes as quantized_weight_bytes
    return quantized_weight_bytes(model)["total"]


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, sample: bool, temperature: float,
             top_p: float, seed: int, lean: bool = True,
             threads: int | None = None) -> tuple[str, int, float]:
    """Decode; returns (text, new tokens, seconds spent in decoding). Greedy decoding of a
    Llama-style model uses the lean loop of `qat.serve.decode` unless `lean` is False; `threads`
    is its native team's size there (None: all cores, see greedy)."""
    from qat.serve.decode import SUPPORTED, greedy

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    if lean and not sample and getattr(model.config, "model_type", None) in SUPPORTED:
        start = time.perf_counter()
        new = greedy(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     threads=threads)
        seconds = time.perf_counter() - start
        return tokenizer.decode(new, skip_special_tokens=True), new.numel(), seconds
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel(), seconds


@torch.no_grad()
def continue_text(model, tokenizer, ids: torch.Tensor, max_new_tokens: int,
                  until: list[str] = (), sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int = 0) -> str:
    """The text `model` writes after the (1, T) `ids`, ended before the first of the `until`
    strings (lm-evaluation-harness's generate_until): greedy decoding of a Llama-style model by
    the lean loop, which stops as soon as a stop string is written; otherwise Hugging Face's
    generate with the same stop strings."""
    from qat.serve.decode import SUPPORTED, greedy

    until = [u for u in until if u]

    def written(tokens) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    torch.manual_seed(seed)
    if not sample and getattr(model.config, "model_type", None) in SUPPORTED:
        new = greedy(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     stop=(lambda tokens: any(u in written(tokens) for u in until))
                     if until else None).tolist()
    else:
        kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                      attention_mask=torch.ones_like(ids))
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if until:
            kwargs.update(stop_strings=until, tokenizer=tokenizer)
        new = model.generate(ids.to(next(model.parameters()).device), **kwargs)[0, ids.shape[1]:]
        new = new.tolist()
    text = written(new)
    for u in until:
        text = text.split(u, 1)[0]
    return text

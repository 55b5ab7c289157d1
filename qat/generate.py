"""python -m qat.generate DIR "prompt": decode with an export (packed weights, fused kernels) or a
float model directory, and print tokens/s and memory.

DIR may also be a builtin model name (smollm2-135m, tiny) to compare against the float model.
"""
from __future__ import annotations

import argparse
import sys
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
             top_p: float, seed: int, lean: bool = True) -> tuple[str, int, float]:
    """Decode; returns (text, new tokens, seconds spent in decoding). Greedy decoding of a
    Llama-style model uses the lean loop of `qat.decode` unless `lean` is False."""
    from qat.decode import SUPPORTED, greedy

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    if lean and not sample and getattr(model.config, "model_type", None) in SUPPORTED:
        start = time.perf_counter()
        new = greedy(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.generate", description=__doc__)
    parser.add_argument("model", help="export directory, float model directory or builtin name")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                        help="exports: hold the embedding/head as int8 rows")
    parser.add_argument("--hf", action="store_true",
                        help="decode with Hugging Face generate instead of qat.decode's loop")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_any(args.model, getattr(torch, args.dtype), args.embedding_bits)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text, n, seconds = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample,
                                args.temperature, args.top_p, args.seed, lean=not args.hf)
    print(args.prompt + text)
    print(f"\n{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s | weights "
          f"{weight_bytes(model) / 2**20:.1f} MiB | resident {resident_bytes() / 2**20:.0f} MiB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

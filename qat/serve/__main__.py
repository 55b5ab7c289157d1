"""qat-generate (python -m qat.serve) DIR "prompt": decode with an export (packed weights, fused kernels) or a
float model directory, and print tokens/s and memory.

DIR may also be a builtin model name (smollm2-135m, tiny) to compare against the float model.
"""
from __future__ import annotations

import argparse
import sys

import torch

from qat.serve.generate import generate, load_any, resident_bytes, weight_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-generate", description=__doc__)
    parser.add_argument("model", help="export directory, float model directory or builtin name")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads: torch's, and the native decode team's (default: all cores)")
    parser.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                        help="exports: hold the embedding/head as int8 rows")
    parser.add_argument("--hf", action="store_true",
                        help="decode with Hugging Face generate instead of qat.serve.decode's loop")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads}: must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_any(args.model, getattr(torch, args.dtype), args.embedding_bits)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text, n, seconds = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample,
                                args.temperature, args.top_p, args.seed, lean=not args.hf,
                                threads=args.threads)
    print(args.prompt + text)
    print(f"\n{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s | weights "
          f"{weight_bytes(model) / 2**20:.1f} MiB | resident {resident_bytes() / 2**20:.0f} MiB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

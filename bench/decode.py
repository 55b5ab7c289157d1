"""Greedy decode speed and weight memory: the exported W4 g64 model against the bf16 float model.

python bench/decode.py                    # default model, 128 new tokens, 3 repeats, CPU
python bench/decode.py --tokens 32 --model tiny

The quantized side is a real export (written to a temporary directory, reloaded with
qat.load_quantized: packed int4 weights), served two ways: torch's int4 kernel in bf16 as vLLM-style
CPU serving would, and our AVX2 GEMV in float32 with the embedding/head held as int8 rows (where
qat.serve.decode's lean loop runs every decoder layer of a token in one native call; the same loop
in torch ops is timed beside it). Its weights are the round-to-nearest grid, which decodes at the
same speed as trained ones. Every model decodes the same prompt greedily with Hugging Face
`generate` and with the lean loop (the same tokens, checked); tokens/s is the median over repeats,
weight memory the bytes of parameters and buffers the model holds. Writes
bench/results/decode.json and the decode section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

from qat.serve.decode import greedy, native_step, new_caches  # noqa: E402
from qat.data.protocol import held_out_ids, protocol_sets  # noqa: E402
from qat.eval.perplexity import perplexity  # noqa: E402
from qat.export.load import load_quantized, weight_bytes  # noqa: E402
from qat import native  # noqa: E402
from qat.export.writer import export_model  # noqa: E402
from qat.models import ModelSpec, load_model  # noqa: E402
from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402

PROMPT = "The history of the printing press begins"


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode(model, ids: torch.Tensor, tokens: int, repeats: int,
           lean: bool, native_step: bool = True) -> tuple[float, torch.Tensor]:
    """Median tokens/s of greedy decoding `tokens` new tokens with HF generate or qat.serve.decode
    (with or without its one-call native step); and the tokens of the last repeat."""
    def run(n):
        if lean:
            return greedy(model, ids, n, native=native_step)
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:]

    run(4)  # warm up
    rates, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(tokens)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ppl", action="store_true", help="skip the served models' ppl")
    args = parser.parse_args()
    model, tokenizer = load_model(ModelSpec(name=args.model))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    float_model = load_model(ModelSpec(name=args.model))[0].to(torch.bfloat16).eval()
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, tokenizer, Path(tmp) / "export")
        variants = {  # name: (model, what it runs)
            "bf16 float": (float_model, "HF bf16"),
            "W4 g64 export": (load_quantized(Path(tmp) / "export", dtype=torch.bfloat16,
                                             backend="torch"),
                              "torch int4 kernel, bf16 activations and table"),
            "W4 g64 export + int8 table": (
                load_quantized(Path(tmp) / "export", dtype=torch.float32, embedding_bits=8),
                "our AVX2 GEMV, fp32 activations, int8 embedding/head"
                if native.available() else "torch kernels (no native GEMV here)"),
        }
    del model
    eval_ids = None if args.no_ppl else held_out_ids(tokenizer, protocol_sets(ood=None)[0])
    rows = []
    for name, (m, kernels) in variants.items():
        rate, out = decode(m, ids, args.tokens, args.repeats, lean=False)
        lean_rate, lean_out = decode(m, ids, args.tokens, args.repeats, lean=True)
        if not torch.equal(out, lean_out):
            raise SystemExit(f"{name}: qat.serve.decode and generate disagree on the greedy tokens")
        row = {"model": args.model, "weights": name, "kernels": kernels, "tokens": args.tokens,
               "tokens_per_s": round(rate, 2), "lean_tokens_per_s": round(lean_rate, 2),
               "weight_bytes": model_bytes(m), "sample": tokenizer.decode(out[:12])}
        if native_step(m, new_caches(m, 2, torch.float32)) is not None:
            # lean_tokens_per_s ran the one-call native step: show the torch loop beside it
            loop_rate, loop_out = decode(m, ids, args.tokens, args.repeats, lean=True,
                                         native_step=False)
            if not torch.equal(loop_out, lean_out):
                raise SystemExit(f"{name}: the native step and the torch loop disagree")
            row["lean_torch_ops_tokens_per_s"] = round(loop_rate, 2)
            row["kernels"] += "; lean: the whole token (layers, head, argmax) in one native call on the team"
        if eval_ids is not None and name != "bf16 float":  # the float model is 13.586 (fp32)
            row["ppl"] = round(perplexity(m, eval_ids).ppl, 4)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        r["lean_speedup"] = round(r["lean_tokens_per_s"] / base["lean_tokens_per_s"], 3)
        r["memory_ratio"] = round(r["weight_bytes"] / base["weight_bytes"], 4)
        r["weight_MB"] = round(r["weight_bytes"] / 1e6, 1)
    linears = weight_bytes(variants["W4 g64 export"][0])
    table_bf16 = variants["W4 g64 export"][0].get_input_embeddings().weight.numel() * 2
    table_int8 = variants["W4 g64 export + int8 table"][0].get_input_embeddings().weight_bytes()
    write_results("decode", rows)
    update_section("decode", "## Decode speed (greedy, CPU)\n\n"
                   f"`{command()}` on {machine()}. Greedy decode of {args.tokens} new tokens, "
                   "batch 1, with Hugging Face `generate` (tokens_per_s) and with `qat.serve.decode`'s "
                   "lean loop (lean_tokens_per_s; the same tokens, checked), OMP_WAIT_POLICY "
                   f"{os.environ.get('OMP_WAIT_POLICY', 'unset (default)')}, median of "
                   f"{args.repeats}; weight memory = bytes of all parameters and buffers held "
                   f"(the export's quantized Linears: {linears['quantized_linear'] / 1e6:.1f} MB; "
                   f"the embedding/head table is {table_bf16 / 1e6:.1f} MB in bf16, "
                   f"{table_int8 / 1e6:.1f} MB as int8 rows). ppl: "
                   "wiki protocol (64 x 512) of the same served model; the weights are the "
                   "round-to-nearest grid (the float model is 13.586). "
                   "lean_torch_ops_tokens_per_s: the W4 model in the same lean loop run as torch "
                   "ops (our GEMV per Linear): the gap between it and lean_tokens_per_s is the "
                   "per-op overhead that the native step removes and that the bf16 baseline, "
                   "whose loop stays in torch ops, still pays.\n\n" + markdown_table(
                       rows, ["model", "weights", "kernels", "tokens_per_s", "speedup",
                              "lean_tokens_per_s", "lean_speedup", "lean_torch_ops_tokens_per_s",
                              "weight_MB", "memory_ratio",
                              "ppl", "sample"]))


if __name__ == "__main__":
    main()

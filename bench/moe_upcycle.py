"""An MoE with real weights: the default model upcycled into a Mixtral-style MoE, quantized beside
the dense model (issue 31).

    python bench/moe_upcycle.py [--experts 4] [--top-k 2] [--rows NAME ...] [--table]

Each MLP of SmolLM2-135M is copied into `experts` identical experts under a router of its own
(random normal, std 0.02, seeded): with identical experts and top-k weights normalised to sum to
one (Mixtral's router), the MoE computes what the dense model computes, so its float perplexity
is the dense one (checked here). The experts then diverge through calibration (GPTQ: each
expert's Hessian from the tokens routed to it) and training (the block stage, end-to-end KD).
Rows, each one `python train.py` of the default eval protocol (the float-perplexity cache cleared
before each, so every row does the same work): the dense and the MoE model with
the default recipe (w4g64_kd; for the MoE also with blockwise.routing=float, its experts trained
on the float block's routing) and with GPTQ W4 g64 (PTQ only). Reported: float and quantized
perplexity, bits per weight of the export (all its bytes x 8 / parameters), wall time.

Writes bench/results/moe_upcycle.json and the `moe_upcycle` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, update_section, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = RESULTS / "moe_upcycle.json"
ROUTER_STD = 0.02
# the kd rows on run.sh's budget, on w4g64_kd's grid and precision when they ran (2026-12-07)
KD = ["recipe=w4g64_kd", "budget=short", "quant.weight.symmetric=true", "trainer.precision=32-true"]
ROWS = {  # name -> (model: dense | moe, overrides)
    "dense_w4g64_kd": ("dense", [*KD, "export=true"]),
    "moe_w4g64_kd": ("moe", [*KD, "export=true"]),
    # the alternative block target: the quantized block's experts take the float block's routing
    "moe_w4g64_kd_float_routing": ("moe", [*KD, "blockwise.routing=float", "export=true"]),
    "dense_gptq_w4g64": ("dense", ["recipe=gptq_w4g64", "trainer.max_steps=0", "export=true"]),
    "moe_gptq_w4g64": ("moe", ["recipe=gptq_w4g64", "trainer.max_steps=0", "export=true"]),
}


def upcycle(dense: Path, out: Path, experts: int, top_k: int, seed: int = 0) -> Path:
    """Write the Mixtral-style MoE of the Llama in `dense` to `out` (once; reused after), in
    Mixtral's checkpoint layout (block_sparse_moe.experts.E.w1/w3/w2, block_sparse_moe.gate)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer, MixtralConfig

    if (out / "config.json").is_file():
        return out
    src = AutoConfig.from_pretrained(dense)
    config = MixtralConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads, num_key_value_heads=src.num_key_value_heads,
        head_dim=src.head_dim, hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=dict(src.rope_parameters), tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id, sliding_window=None, num_local_experts=experts,
        num_experts_per_tok=top_k, router_jitter_noise=0.0, output_router_logits=False)
    tensors = load_file(str(dense / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    moe = {}
    for name, value in tensors.items():
        if ".mlp." not in name:
            moe[name] = value
            continue
        layer, _, leaf = name.partition(".mlp.")
        own = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}[leaf]
        for e in range(experts):
            moe[f"{layer}.block_sparse_moe.experts.{e}.{own}.weight"] = value.clone()
        if leaf == "gate_proj.weight":
            moe[f"{layer}.block_sparse_moe.gate.weight"] = ROUTER_STD * torch.randn(
                experts, src.hidden_size, generator=generator, dtype=value.dtype)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    save_file(moe, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(dense).save_pretrained(tmp)
    tmp.rename(out)
    return out


def export_bits(run_dir: Path, params: int) -> float | None:
    export = run_dir / "export"
    if not export.is_dir():
        return None
    stored = sum(f.stat().st_size for f in export.glob("*.safetensors"))
    return 8 * stored / params


def run_row(name: str, model: Path, overrides: list[str], params: int) -> dict:
    run_dir = ROOT / "outputs" / "bench" / f"moe_{name}"
    where = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model  # as typed in ROOT
    args = [f"model.path={where}", *overrides]
    cmd = [sys.executable, "train.py", *args, "logger=none", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={run_dir}"]
    # every row computes its float perplexity: the cache would spare the later rows that work
    shutil.rmtree(Path(os.environ.get("QAT_CACHE", "~/.cache/qat")).expanduser() / "fp_ppl",
                  ignore_errors=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{name}: train.py exited {done.returncode}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"name": name, "command": "python train.py " + " ".join(args),
            "seconds": round(seconds), "load_before": round(load, 2), "params": params,
            "bits_per_weight": export_bits(run_dir, params),
            **{k: metrics.get(k) for k in ("fp_ppl", "ptq_ppl", "block_ppl", "ppl", "export_ppl",
                                           "steps")}}


def table(rows: list[dict]) -> str:
    out = [{"run": r["name"], "params": f"{r['params'] / 1e6:.0f}M",
            "float ppl": f"{r['fp_ppl']:.3f}" if r.get("fp_ppl") else "",
            "after init": f"{r['ptq_ppl']:.3f}" if r.get("ptq_ppl") else "",
            "after blocks": f"{r['block_ppl']:.3f}" if r.get("block_ppl") else "",
            "ppl": f"{r['ppl']:.3f}", "vs float": f"{100 * (r['ppl'] / r['fp_ppl'] - 1):+.1f}%"
            if r.get("fp_ppl") else "",
            "bits/weight": f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "",
            "wall s": r["seconds"], "command": f"`{r['command']}`"} for r in rows]
    return markdown_table(out, ["run", "params", "float ppl", "after init", "after blocks",
                                "ppl", "vs float", "bits/weight", "wall s", "command"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--table", action="store_true", help="rebuild the section only")
    args = parser.parse_args(argv)
    results = {r["name"]: r for r in json.loads(RESULT_FILE.read_text())["rows"]} \
        if RESULT_FILE.is_file() else {}
    if not args.table:
        from transformers import AutoConfig

        from qat.eval.footprint import meta_model
        from qat.models.load import smollm2_dir

        dense = smollm2_dir()
        moe = upcycle(dense, ROOT / "outputs" / "bench" / f"smollm2-moe{args.experts}x"
                      f"{args.top_k}", args.experts, args.top_k)
        params = {kind: sum(p.numel() for p in meta_model(AutoConfig.from_pretrained(path))
                            .parameters())
                  for kind, path in (("dense", dense), ("moe", moe))}
        for name in args.rows:
            kind, overrides = ROWS[name]
            results[name] = run_row(name, dense if kind == "dense" else moe, overrides,
                                    params[kind])
            print(json.dumps(results[name]), flush=True)
            write_json(RESULT_FILE, {"machine": machine(), "experts": args.experts,
                                     "top_k": args.top_k, "rows": list(results.values())})
    rows = [results[n] for n in ROWS if n in results]
    update_section("moe_upcycle", "### MoE: the default model upcycled (Mixtral-style, "
                   f"{args.experts} experts, top-{args.top_k})\n\n"
                   "`python bench/moe_upcycle.py` (each row one `train.py` run, alone; float "
                   "perplexity of the MoE equals the dense one by construction)\n\n"
                   + table(rows) + "\n")


if __name__ == "__main__":
    main()

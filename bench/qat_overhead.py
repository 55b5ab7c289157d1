"""What QAT costs over float training: step time and memory, W4 g64 against float, same batch.

python bench/qat_overhead.py                 # default model, batch 4 x 256, 6 alternating steps each
python bench/qat_overhead.py --steps 3 --model tiny

Both models live in one process and train alternately (float step, QAT step, ...), so machine noise
hits both alike; the ratio of medians is reported. Memory is measured two ways: the bytes autograd
keeps for backward during one training step (exact, from saved-tensor hooks, counted once per
storage), and the peak resident memory of a separate process during steps of only that kind
(peak reset after its first step, Linux /proc/self/clear_refs).
Writes bench/results/qat_overhead.json and the qat_overhead section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

from qat.serve.generate import resident_bytes  # noqa: E402
from qat.models import ModelSpec, load_model  # noqa: E402
from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402


def build(model_name: str, quantized: bool):
    model, _ = load_model(ModelSpec(name=model_name))
    model.train()
    if quantized:
        prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    return model


def step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def fake_quant_parts(model) -> dict[str, float]:
    """Milliseconds per training step of each piece of work QAT adds, timed alone over the model's
    quantized Linears with their real weights: the observer's min/max, the qparams from it, the
    fake-quantized weight (made twice a step: forward, and recomputed in backward) and the
    straight-through mask. What the step ratio shows beyond their sum is per-layer Python and
    autograd work, and noise."""
    from qat import native
    from qat.format.grid import compute_qparams, qrange
    from qat.quant.observers import minmax
    from qat.quant.modules import FakeQuantLinear
    from qat.quant.ste import _ste_grads, fake_quant_values

    layers = [(m.weight_fake_quant, m.weight_fake_quant._grouped(m.weight.detach()))
              for m in model.modules() if isinstance(m, FakeQuantLinear)]
    qparams = [compute_qparams(*minmax(g), fq.spec.bits, fq.spec.symmetric, fq.spec.scale_dtype)
               for fq, g in layers]
    grads = [torch.randn_like(g) for _, g in layers]

    def w_hat():
        for (fq, g), (s, z) in zip(layers, qparams):
            z = None if fq.spec.symmetric else z
            if native.fake_quant_supported(g, s, z):
                native.fake_quant(g, s, z, *qrange(fq.spec.bits))
            else:
                fake_quant_values(g.clone(), s, z, fq.spec.bits)

    def mask():
        for (fq, g), (s, z), grad in zip(layers, qparams, grads):
            z = None if fq.spec.symmetric else z
            if native.fake_quant_supported(g, s, z):
                native.mask_grad_(g, grad, s, z, *qrange(fq.spec.bits))
            else:
                _ste_grads(grad, g, s, z, fq.spec.bits, True, False)

    parts = {"observer_minmax": lambda: [minmax(g) for _, g in layers],
             "qparams": lambda: [compute_qparams(-s, s, fq.spec.bits, fq.spec.symmetric,
                                                 fq.spec.scale_dtype)
                                 for (fq, _), (s, _z) in zip(layers, qparams)],
             "w_hat_x2": w_hat, "mask": mask}
    out = {}
    for name, fn in parts.items():
        fn()  # warm: allocator pools, the native library
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times) * 1e3 * (2 if name == "w_hat_x2" else 1), 1)
    return out


def saved_bytes(model, ids) -> int:
    """Bytes autograd holds for backward after one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def peak_rss_child(args, mode: str) -> int:
    """Peak resident bytes of a fresh process over training steps of one kind only (after a
    first step, so loading the model and creating AdamW's state do not set the peak)."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                          "--steps", "2", "--batch", str(args.batch), "--seq", str(args.seq)],
                         capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def child(args) -> None:
    model = build(args.model, args.child == "qat")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    step(model, optimizer, ids)  # optimizer state and allocator pools exist from here on
    _reset_peak_rss()
    for _ in range(args.steps):
        step(model, optimizer, ids)
    print(json.dumps({"peak_rss": _peak_rss()}))


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so loading the model is not the peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    return resident_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", choices=["float", "qat"], default=None)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.manual_seed(0)
    float_model = build(args.model, False)
    qat_model = copy.deepcopy(float_model)
    prepare(qat_model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    ids = torch.randint(0, float_model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    models = {"float": float_model, "qat": qat_model}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    times: dict[str, list[float]] = {"float": [], "qat": []}
    for i in range(args.steps + 1):  # the first step of each warms up
        for kind in ("float", "qat") if i % 2 == 0 else ("qat", "float"):
            elapsed = step(models[kind], optimizers[kind], ids)
            if i:
                times[kind].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = fake_quant_parts(qat_model)
    saved = {k: saved_bytes(m, ids) for k, m in models.items()}
    rss = {k: peak_rss_child(args, k) for k in models}
    row = {"model": args.model, "batch": f"{args.batch} x {args.seq}", "steps": args.steps,
           "float_step_s": round(med["float"], 3), "qat_step_s": round(med["qat"], 3),
           "time_ratio": round(med["qat"] / med["float"], 4),
           "float_saved_MB": round(saved["float"] / 1e6, 1),
           "qat_saved_MB": round(saved["qat"] / 1e6, 1),
           "saved_ratio": round(saved["qat"] / saved["float"], 4),
           "float_peak_rss_MB": round(rss["float"] / 1e6), "qat_peak_rss_MB": round(rss["qat"] / 1e6),
           "memory_ratio": round(rss["qat"] / rss["float"], 4),
           "float_steps_s": [round(t, 3) for t in times["float"]],
           "qat_steps_s": [round(t, 3) for t in times["qat"]],
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "qat_parts_ms": parts, "qat_parts_share": round(sum(parts.values()) / 1e3 / med["float"], 4)}
    print(json.dumps(row, indent=2))
    write_results("qat_overhead", [row])
    write_section(row, command())


def pair_ratios(row: dict) -> list[float]:
    """QAT / float step time of each alternating pair, quartiles: the noise around time_ratio."""
    ratios = [q / f for q, f in zip(row["qat_steps_s"], row["float_steps_s"])]
    return [round(x, 3) for x in statistics.quantiles(ratios, n=4)] if len(ratios) > 1 else []


def write_section(row: dict, cmd: str) -> None:
    row = dict(row, pair_ratio_quartiles=pair_ratios(row))
    cols = ["model", "batch", "float_step_s", "qat_step_s", "time_ratio", "pair_ratio_quartiles",
            "qat_parts_share",
            "float_saved_MB", "qat_saved_MB", "saved_ratio", "float_peak_rss_MB",
            "qat_peak_rss_MB", "memory_ratio"]
    update_section("qat_overhead", "## QAT overhead (W4 g64 vs float training, CPU)\n\n"
                   f"`{cmd}` on {machine()}. Median of {row['steps']} alternating steps "
                   "(forward, backward, AdamW) in one process; pair_ratio_quartiles: quartiles of "
                   "QAT / float over the alternating pairs, i.e. how far machine noise moves the "
                   "ratio; saved = bytes autograd keeps for backward; peak RSS from a separate "
                   "process per kind. qat_parts_share: what QAT adds, each piece timed alone "
                   f"(ms per step: {row.get('qat_parts_ms', {})}), as a share of the float step. "
                   f"Step times (s): float {row['float_steps_s']}, QAT "
                   f"{row['qat_steps_s']}; load average at the end {row['load_average']}.\n\n"
                   + markdown_table([row], cols))


if __name__ == "__main__":
    main()

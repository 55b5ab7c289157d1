"""One MoE layer's experts, one at a time against batched over experts (issue 31).

python bench/moe_experts.py [--device cuda] [--reps 5] [--dry-run]

An `Experts` layer (qat.models.experts) of E SwiGLU experts, float and W4 g64 fake-quantized with
learned scales (what the block stage trains), routed top-k by random choices, in three shapes:
few large experts (Mixtral-like), 64 (OLMoE-like) and 128 small ones (Qwen3-MoE-like), hidden
1024 (the families' own widths with --full, for a GPU), and 64 experts of 128 x 256 (the size
below which a CPU batches). Per shape and kind: the forward under
no_grad (calibration, evaluation) and forward + backward (training), each the minimum over
`--reps` alternating runs of the loop (`Experts.batched = False`) and the batched path (one
fake quantization and one grouped matmul per projection over runs of experts; --run-elements
sets their size, e.g. an accelerator's on a CPU). The ratio
loop / batched above 1 means batching is faster; `batches_on` picks the path per device from
these numbers. Needs only torch and qat (no transformers): it runs on the device machine too.

Writes bench/results/moe_experts_<device>.json and the `moe_experts_<device>` section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qat.models import experts as moe  # noqa: E402
from qat.models.experts import Expert, Experts, GatedAct, batches_on  # noqa: E402
from qat.quant.modules import FakeQuantLinear  # noqa: E402
from qat.quant.spec import WeightSpec  # noqa: E402

# (name, experts, top-k, hidden, intermediate, hidden with --full, intermediate with --full)
SHAPES = [("8 experts, top-2", 8, 2, 1024, 2816, 4096, 14336),
          ("64 experts, top-8", 64, 8, 1024, 512, 2048, 1024),
          ("128 experts, top-8", 128, 8, 1024, 384, 2048, 768),
          ("64 small experts, top-8", 64, 8, 128, 256, 128, 256)]  # a CPU batches these


def layer(experts: int, hidden: int, inter: int, quantized: bool, device: str) -> Experts:
    torch.manual_seed(0)
    layer = Experts([Expert(hidden, inter, GatedAct(nn.SiLU()), ("w1", "w3", "w2"))
                     for _ in range(experts)]).to(device)
    if quantized:
        spec = WeightSpec(bits=4, group_size=64, learnable_scale=True)
        for expert in layer:
            for name in expert.names:
                setattr(expert, name, FakeQuantLinear.from_linear(getattr(expert, name), spec))
    return layer


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(layer: Experts, tokens: int, top_k: int, reps: int, device: str, sync) -> dict:
    experts = len(layer)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, layer[0].w1.in_features, generator=generator).to(device)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k]
                         for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=generator).to(device)

    def forward():
        with torch.no_grad():
            layer(x, index, weights)

    def train():
        layer(x, index, weights).float().pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)

    best = {}
    for _ in range(reps):
        for batched in (False, True):
            layer.batched = batched
            for phase, fn in (("forward", forward), ("train", train)):
                seconds = timed(fn, sync)
                key = (phase, batched)
                best[key] = min(best.get(key, seconds), seconds)
    layer.batched = None
    row = {}
    for phase in ("forward", "train"):
        loop, batched = best[(phase, False)], best[(phase, True)]
        row.update({f"{phase} loop ms": round(loop * 1e3, 1),
                    f"{phase} batched ms": round(batched * 1e3, 1),
                    f"{phase} loop/batched": round(loop / batched, 2)})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="the families' own widths (GPU)")
    parser.add_argument("--run-elements", type=int, default=None,
                        help="weight elements per batch (default: the device's own)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, no files written")
    args = parser.parse_args(argv)
    device = args.device
    load = os.getloadavg()[0]
    default_run = moe.CPU_RUN_ELEMENTS if device == "cpu" else moe.RUN_ELEMENTS
    if args.run_elements:  # both, so that this device's default does not apply
        moe.RUN_ELEMENTS = moe.CPU_RUN_ELEMENTS = args.run_elements
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for name, experts, top_k, hidden, inter, full_hidden, full_inter in SHAPES:
        if args.full:
            hidden, inter = full_hidden, full_inter
        if args.dry_run:
            hidden, inter = 64, 64
        for quantized in (False, True):
            row = {"shape": name, "hidden x intermediate": f"{hidden} x {inter}",
                   "weights": "W4 g64 learned scales" if quantized else "float",
                   "default": "batched" if batches_on(torch.device(device), hidden * inter)
                   and default_run // (hidden * inter) > 1 else "loop"}
            row.update(measure(layer(experts, hidden, inter, quantized, device),
                               16 if args.dry_run else args.tokens, top_k,
                               1 if args.dry_run else args.reps, device, sync))
            rows.append(row)
            print(row, flush=True)
    if args.dry_run:
        return 0
    kind = torch.device(device).type
    where = torch.cuda.get_device_name() if kind == "cuda" else machine()
    columns = list(rows[0])
    run = moe.CPU_RUN_ELEMENTS if kind == "cpu" else moe.RUN_ELEMENTS  # --run-elements's
    body = "\n".join([
        f"### MoE experts: one at a time against batched ({kind})",
        "",
        f"`{command()}` on {where}; load average before the run "
        f"{load:.2f}. {args.tokens} tokens, minimum of {args.reps} alternating "
        f"runs; batches of up to {run} weights (a larger expert alone). `loop/batched` above "
        "1: batching is faster. `default`: the path an `Experts` layer takes on this device "
        "unless told (`batches_on`, and at least two experts in a batch of the device's "
        "default size).",
        "",
        markdown_table(rows, columns),
    ])
    write_results(f"moe_experts_{kind}", rows)
    update_section(f"moe_experts_{kind}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

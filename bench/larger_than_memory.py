"""A model larger than this machine's memory through the whole pipeline (issue 30).

    python bench/larger_than_memory.py [--work DIR] [--ratio 1.1] [--keep]

A synthetic Llama (hidden 5120, MLP 13824, 40 heads, vocab 512: the 13B layout, with as many
blocks as make its bfloat16 weights at least `ratio` x the RAM) is written block by block straight
into safetensors shards (random normal weights, std 0.02; never the whole model in memory), then
run as `python train.py model.path=DIR recipe=w4g64_kd` with quant.init=rtn, the block stage on
2 samples of 128 tokens, one end-to-end KD step of 1 x 128 tokens (each block's activations
recomputed in backward: model.gradient_checkpointing) and the export; then
`qat.load_quantized` reads the export and greedily picks one token. Each step is a child
process whose peak RSS (VmHWM, per stage as bench/memory.py takes it) is recorded; a thread samples
the disk the work directory uses. The synthetic files are deleted at the end (--keep: not).

Writes `larger_than_memory` in bench/results/memory.json and its section of BENCHMARKS.md.
A killed run resumes: the model files are reused and the block stage resumes at its next block.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command, machine, markdown_table, update_section, write_json  # noqa: E402

WIDTH = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
             num_key_value_heads=40, vocab_size=512, max_position_embeddings=2048,
             tie_word_embeddings=False)
OVERRIDES = ["trainer.max_steps=1", "quant.init=rtn", "blockwise.samples=2", "blockwise.seq_len=128",
             "blockwise.batch_size=1", "blockwise.epochs=1", "data.batch_size=1",
             "data.block_size=128", "data.eval_windows=1", "data.ood_windows=1",
             "eval.quantized_before=false", "model.gradient_checkpointing=true"]


def ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def block_bytes() -> int:
    h, m = WIDTH["hidden_size"], WIDTH["intermediate_size"]
    return 2 * (4 * h * h + 3 * h * m + 2 * h)


def write_model(directory: Path, layers: int) -> int:
    """The synthetic model, one shard per block; returns its bfloat16 bytes. Reuses a complete
    directory (its index is written last)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.tiny import tiny_tokenizer

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["metadata"]["total_size"]
    directory.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, dtype="bfloat16", **WIDTH)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, p in skeleton.named_parameters():
        key = ".".join(name.split(".")[:3]) if ".layers." in name else "rest"
        groups.setdefault(key, []).append((name, tuple(p.shape)))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (key, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    config.save_pretrained(directory)
    tokenizer = tiny_tokenizer(WIDTH["vocab_size"])
    tokenizer.model_max_length = WIDTH["max_position_embeddings"]
    tokenizer.save_pretrained(directory)
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


class DiskPeak(threading.Thread):
    """The most the filesystem of `path` used above its level at the start, sampled."""

    def __init__(self, path: Path, baseline: int) -> None:
        super().__init__(daemon=True)
        self.path, self.baseline, self.peak, self.running = path, baseline, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.baseline)
            time.sleep(1.0)


def greedy(export: str, out: str) -> None:
    """Child: load the export with qat.load_quantized and pick one token greedily."""
    import torch

    import qat

    start = time.perf_counter()
    model = qat.load_quantized(export)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    token = int(logits[0, -1].argmax())
    peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    write_json(Path(out), {"token": token, "peak": peak,
                           "seconds": time.perf_counter() - start})


def section(result: dict) -> str:
    gib = 2**30
    rows = [{"stage": s, "peak RSS": f"{b / gib:.2f} GiB",
             "of RAM": f"{b / result['ram_bytes']:.0%}"} for s, b in result["stages"]]
    return ("## A model larger than memory (issue 30)\n\n"
            f"`{result['command']}` on {result['machine']}: a synthetic Llama of "
            f"{result['params'] / 1e9:.1f}B parameters ({result['layers']} blocks of the 13B "
            f"layout, vocab 512) whose bfloat16 files are {result['model_bytes'] / gib:.1f} GiB, "
            f"{result['model_bytes'] / result['ram_bytes']:.2f}x the {result['ram_bytes'] / gib:.1f}"
            f" GiB of RAM. `{result['train_command']}`, then `qat.load_quantized` and one greedy "
            f"token ({result['token']}). Peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB "
            f"({result['peak_rss_bytes'] / result['ram_bytes']:.0%} of RAM; bar < 75%), disk at "
            f"most {result['disk_peak_bytes'] / gib:.1f} GiB (model files included), "
            f"{result['seconds'] / 60:.0f} min in all.\n\n"
            + markdown_table(rows, ["stage", "peak RSS", "of RAM"]))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--greedy":
        greedy(*argv[1:3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qat-larger")
    parser.add_argument("--ratio", type=float, default=1.1)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic model and run")
    args = parser.parse_args(argv)
    work = Path(args.work)
    ram = ram_bytes()
    layers = -(-int(args.ratio * ram) // block_bytes())
    need = 2.1 * layers * block_bytes()  # model, block store, checkpoint, export
    if shutil.disk_usage(work.parent).free + (sum(
            f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.exists() else 0) \
            < need:
        raise SystemExit(f"needs about {need / 1e9:.0f} GB free under {work.parent}")
    disk = DiskPeak(work.parent, shutil.disk_usage(work.parent).used
                    - (sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
                       if work.exists() else 0))
    disk.start()
    start = time.perf_counter()
    model_dir, run_dir = work / "model", work / "run"
    model_bytes = write_model(model_dir, layers)
    print(f"model: {layers} blocks, {model_bytes / 2**30:.1f} GiB bf16, RAM {ram / 2**30:.1f} "
          f"GiB ({time.perf_counter() - start:.0f} s)", flush=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    peaks = work / "peaks.json"
    resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "blockwise").is_dir() \
        and not (run_dir / "checkpoints" / "last.ckpt").is_file() else []
    subprocess.run([sys.executable, str(Path(__file__).parent / "memory.py"), "--child",
                    str(model_dir), "w4g64_kd", str(run_dir), str(peaks), *OVERRIDES, *resume],
                   check=True, env=env)
    token_out = work / "token.json"
    subprocess.run([sys.executable, __file__, "--greedy", str(run_dir / "export"),
                    str(token_out)], check=True, env=env)
    disk.running = False
    run, token = json.loads(peaks.read_text()), json.loads(token_out.read_text())
    stages = [(s, b) for s, b in run["peaks"]] + [("load_quantized + greedy token", token["peak"])]
    params = model_bytes // 2
    result = {"model_bytes": model_bytes, "ram_bytes": ram, "params": params, "layers": layers,
              "peak_rss_bytes": max(b for _, b in stages), "disk_peak_bytes": disk.peak,
              "stages": stages, "seconds": round(time.perf_counter() - start),
              "token": token["token"], "command": command(), "machine": machine(),
              "train_command": "python train.py model.path=DIR recipe=w4g64_kd data=tiny "
                               + " ".join(OVERRIDES)}
    path = RESULTS / "memory.json"
    memory = json.loads(path.read_text()) if path.is_file() else {}
    memory["larger_than_memory"] = result
    write_json(path, memory)
    update_section("memory-larger", section(result))
    print(section(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Record what every recipe produces on the tiny model, to compare two commits bit for bit.

    python scripts/golden.py OUT.json            # every recipe and VARIANTS (~6 min on 2 cores)
    python scripts/golden.py OUT.json w4g64 w2g64_kd
    python scripts/golden.py --compare A.json B.json

Per recipe: the metrics (times and paths left out), a digest of every tensor of the final
checkpoint's state_dict (weights, codes, scales, zero points, masks), the reports, and a digest of
every file of the export. A refactor that changes no behaviour gives the same file on the same
machine. The test that guards CI (tests/test_golden.py) reads a few of these values, recorded at
7c5188a, with tolerances for what float rounding moves between CPUs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import qat  # noqa: E402  (the commit under test: PYTHONPATH may point at another checkout)

CONF = Path(qat.__file__).resolve().parent / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
COMMON = ["model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
          "trainer.max_steps=2", "export.enabled=true", "ptq.calibration_samples=4",
          "ptq.seq_len=32", "ptq.progress=false"]
BLOCKS = ["blockwise.samples=4", "blockwise.seq_len=32", "blockwise.epochs=1",
          "blockwise.progress=false"]  # where the recipe has a block stage
# beyond the recipes: the stages no recipe turns on
VARIANTS = {
    "budget_gptq": ["recipe=w4g64", "quant.init=gptq", "quant.budget_bits=3.5",
                    "ptq.sensitivity_samples=2"],
    "outliers_protect": ["recipe=w4g64", "ptq.outliers=protect", "ptq.outlier_threshold=1.0"],
    "heads_kd": ["recipe=w4g64_kd", "blockwise=none", "prune=magnitude", "prune.pattern=heads",
                 "prune.sparsity=0.25"],
    "wanda_gradual": ["recipe=w4g64", "prune=wanda", "prune.schedule=gradual", "prune.end_step=2",
                      "prune.calibration_samples=4"],
    "awq_kd_all": ["recipe=w3g64_kd", "quant.init=awq", "optim.trainable=all",
                   "distill.teacher.dtype=bfloat16"],
    "generated": ["recipe=w4g64", "data.generated_samples=4", "eval.quantized_before=true"],
    "rtn_0steps": ["recipe=w4g64", "trainer.max_steps=0"],  # codes and export: exact on any CPU
}
# recipes whose defaults moved since 7c5188a recorded them, pinned back to what it ran: w4g64_kd
# went asymmetric with bf16 autocast (issue 34, 2026-12-08)
RECORDED_AS = {"w4g64_kd": ["quant.weight.symmetric=true", "trainer.precision=32-true"]}
VOLATILE = {"train_seconds", "ptq_seconds", "export_dir", "command", "resumed_from", "seconds"}


def _train():
    try:
        from qat.train import train
    except ImportError:  # commits before qat/train held train(cfg)
        from qat.lightning.run import train
    return train


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def record(name: str, workdir: Path) -> dict:
    import torch

    run_dir = workdir / name
    overrides = VARIANTS.get(name, [f"recipe={name}", *RECORDED_AS.get(name, [])])
    cfg = _compose([*COMMON, *overrides])
    if cfg.blockwise.get("enabled"):
        cfg = _compose([*COMMON, *overrides, *BLOCKS])
    metrics = _train()(cfg, run_dir=run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = {k: _digest(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
               if v.numel() else "empty" for k, v in sorted(ckpt["state_dict"].items())}
    reports = {p.name: _strip(json.loads(p.read_text())) for p in sorted(run_dir.glob("*.json"))
               if p.name != "metrics.json"}
    export = {}
    if (run_dir / "export").is_dir():
        export = {p.name: _digest(p.read_bytes()) for p in sorted((run_dir / "export").iterdir())
                  if p.name != "README.md"}  # the card names the run directory
    return {"metrics": _strip(metrics), "tensors": tensors, "reports": reports, "export": export}


def compare(a: dict, b: dict) -> list[str]:
    out = []
    for recipe in sorted(set(a) | set(b)):
        if recipe not in a or recipe not in b:
            out.append(f"{recipe}: only in one file")
            continue
        for part in ("metrics", "tensors", "reports", "export"):
            x, y = a[recipe][part], b[recipe][part]
            if x != y:
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                out.append(f"{recipe} {part}: {len(keys)} differ: "
                           + "; ".join(f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in keys[:4]))
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--compare":
        diffs = compare(*(json.loads(Path(p).read_text()) for p in argv[1:3]))
        print("\n".join(diffs) or "identical")
        return 1 if diffs else 0
    out, recipes = Path(argv[0]), argv[1:] or RECIPES + list(VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QAT_CACHE"] = str(Path(tmp) / "cache")
        for recipe in recipes:
            results[recipe] = record(recipe, Path(tmp))
            print(f"{recipe}: ppl {results[recipe]['metrics'].get('ppl')}", flush=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

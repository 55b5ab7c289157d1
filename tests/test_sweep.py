"""`qat-train -m +sweep=lr` (conf/sweep/lr.yaml, the Optuna sweeper): the Hydra main returns the
run's final perplexity, which the sweeper minimises over the learning rate; two trials here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_optuna_searches_the_learning_rate_on_the_tiny_model(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [dev] extra installs it")
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "+sweep=lr", "hydra.sweeper.n_trials=2",
         f"hydra.sweep.dir={sweep}", "model=tiny", "data=tiny", "recipe=w4g64", "logger=none",
         "trainer.max_steps=3", "trainer.enable_progress_bar=false", "eval.fp_ppl=false"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    ppl, lr = [], []
    for path in runs:
        ppl.append(json.loads(path.read_text())["ppl"])
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        lr.append(float(next(o for o in overrides if o.startswith("optim.lr=")).split("=")[1]))
    assert lr[0] != lr[1] and all(1e-5 <= x <= 1e-3 for x in lr)
    # the sweeper saw each trial's returned value: its best is the smaller final perplexity
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(ppl))
    assert best["best_params"]["optim.lr"] == pytest.approx(lr[ppl.index(min(ppl))])

"""Two CPU processes (gloo), data parallel (DDP) or sharded (FSDP2), train exactly what one
process with the same global batch trains; the stages before training run once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from qat.models.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUN = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
       "eval.fp_ppl=false", "trainer.max_steps=6", "optim.lr=1e-3", "export.enabled=true"]


def run_cli(args: list[str], run_dir: Path, *extra: str) -> str:
    """`train.py` in a subprocess with one thread (the reference and every rank compute alike:
    a thread count changes float sums, and a MoE's routing can amplify that); its log."""
    out = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}", *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("== qat summary ==") == 1  # rank zero reports, writes and exports
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of some arguments with the global batch (4), made once per module:
    both strategies compare with the same one."""
    made: dict[tuple[str, ...], Path] = {}

    def run(args: list[str]) -> Path:
        if tuple(args) not in made:
            made[tuple(args)] = tmp_path_factory.mktemp("one")
            run_cli(args, made[tuple(args)], "data.batch_size=4")
        return made[tuple(args)]
    return run


def two_processes(strategy: str, args: list[str], run_dir: Path, *extra: str) -> str:
    """Under `strategy` on 2 gloo processes, half the global batch each."""
    return run_cli(args, run_dir, f"trainer={strategy}", "trainer.accelerator=cpu",
                   "trainer.devices=2", "data.batch_size=2", *extra)


def assert_same_run(one: Path, two: Path, keys=("first_loss", "last_loss", "ppl", "export_ppl")):
    """Two runs' metrics (1e-5 relative), every checkpointed tensor (weights, scales, grids:
    1e-5; pruning masks equal) and exported tensor (codes equal, the rest to bfloat16's ulp)."""
    from safetensors.torch import load_file

    a_metrics, b_metrics = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a_metrics["steps"] == b_metrics["steps"] and a_metrics["tokens"] == b_metrics["tokens"]
    # gradients are averaged over ranks instead of summed over one batch: float32 rounding only
    # (a KD loss of 1e-3 is a difference of sums of terms ~10: its rounding is absolute, ~1e-6)
    for key in keys:
        assert b_metrics[key] == pytest.approx(a_metrics[key], rel=1e-5, abs=2e-6), key
    a, b = (read_checkpoint(d / "checkpoints" / "last.ckpt") for d in (one, two))
    # Adam divides by sqrt(v): a weight whose gradient is near zero can move by a few float32
    # ulps of its update more on one side (1.05e-6 seen on an AVX2 machine); a wrong average or a
    # missed all-reduce moves weights by ~lr = 1e-3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    for name, state in a.get("callbacks", {}).items():  # pruning masks
        for key, masks in state.get("masks", {}).items() if isinstance(state, dict) else ():
            assert torch.equal(b["callbacks"][name]["masks"][key], masks), key
    exported = [load_file(d / "export" / "model.safetensors") for d in (one, two)]
    assert exported[0].keys() == exported[1].keys()
    for key, value in exported[0].items():
        if value.dtype in (torch.int32, torch.int8, torch.uint8):
            assert torch.equal(exported[1][key], value), key
        else:  # stored in bfloat16: a 1e-6 move of a weight can round one ulp the other way
            torch.testing.assert_close(exported[1][key].float(), value.float(), rtol=2 ** -7,
                                       atol=1e-5, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_with_the_same_global_batch(strategy, tmp_path,
                                                                   one_process):
    """Data parallel (DDP) and fully sharded (FSDP2: each decoder block a unit, its gathered
    checkpoint and export): the same training of weights as one process."""
    two_processes(strategy, RUN, tmp_path / strategy)
    assert_same_run(one_process(RUN), tmp_path / strategy)
    if strategy == "fsdp2":  # the export's model, built a block at a time from the shards, is
        from qat.export.convert import convert, served_from_checkpoint  # the conversion of
        from qat.models.checkpoint import model_from_checkpoint  # the whole model

        path = tmp_path / strategy / "checkpoints" / "last.ckpt"
        whole = convert(model_from_checkpoint(path)[0], torch.bfloat16).state_dict()
        blocks = served_from_checkpoint(path, torch.bfloat16)[0].state_dict()
        assert whole.keys() == blocks.keys()
        assert all(torch.equal(whole[k], blocks[k]) for k in whole)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_prune_2_of_4_with_kd_as_one_process(strategy, tmp_path, one_process):
    """2:4 masks made at step 0 on every rank (deterministic), kept through sharded updates."""
    args = ["recipe=prune2of4_w4g64_kd", *RUN[1:], "trainer.max_steps=3"]
    two_processes(strategy, args, tmp_path / strategy)
    assert_same_run(one_process(args), tmp_path / strategy)
    assert json.loads((tmp_path / strategy / "metrics.json").read_text())["export_nm_ok"]


def test_multi_device_trainer_configs_compose_and_instantiate():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    for name, kind in (("ddp", DDPStrategy), ("fsdp2", ModelParallelStrategy)):
        cfg = compose_train([f"trainer={name}"])
        assert isinstance(instantiate(cfg.trainer.strategy), kind)
        # the recipe's precision stays (the default recipe's: auto)
        assert cfg.trainer.precision == compose_train([]).trainer.precision
        assert cfg.trainer.devices == 2



PTQ = ["ptq.calibration_samples=4", "ptq.seq_len=32", "ptq.progress=false"]
# float32: what is compared is the all-reduce, to float32 rounding (bf16 autocast rounds the
# half batches' gradients apart by more)
KD = ["recipe=w4g64_kd", "trainer.precision=32-true", "quant.init=gptq", "data=tiny", "logger=none",
      "trainer.enable_progress_bar=false", "trainer.max_steps=3", "optim.scale_lr=1e-3",
      "export.enabled=true", "ptq.calibration_samples=4", "ptq.seq_len=32", "ptq.progress=false",
      "blockwise.samples=4", "blockwise.seq_len=32", "blockwise.epochs=1",
      "blockwise.progress=false"]
ONCE = ("float ppl", "ptq", "block stage")  # the stages before training


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with files: its teacher is onloaded from them, not copied."""
    from test_architectures import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_stages_before_training_run_once_and_train_what_one_process_does(strategy, tmp_path,
                                                                        one_process, llama_dir):
    """Rank 0 alone measures the float model, calibrates (GPTQ) and trains the blocks; rank 1
    takes its calibrated model (under FSDP2 built on the meta device, only its own shards
    filled from rank 0's file). The KD run of scales then ends where one process with the same
    global batch ends, data parallel or sharded."""
    args = [*KD, f"model.path={llama_dir}"]
    log = two_processes(strategy, args, tmp_path / strategy, "hydra.verbose=qat.train")
    for stage in ONCE:
        assert log.count(f"stage: {stage}\n") == 1, (stage, log[-3000:])
    taken = "rank 0's calibrated model" + (", own shards" if strategy == "fsdp2" else "")
    assert log.count(f"stage: {taken}\n") == 1
    assert log.count("stage: end-to-end\n") == 2  # both ranks train
    assert_same_run(one_process(args), tmp_path / strategy,
                    ("fp_ppl", "block_ppl", "first_loss", "last_loss", "ppl", "export_ppl"))


def test_another_rank_takes_only_its_own_launchs_calibrated_model(tmp_path, monkeypatch):
    """A prepared state left by an earlier launch in the run directory is never loaded: the
    rank waits for its launch's, and says what it waited for when that does not come."""
    from torch import nn

    from qat.train import ranks

    source, target = nn.Linear(4, 3), nn.Linear(4, 3)
    monkeypatch.setenv(ranks.LAUNCH, "earlier")
    ranks.share(source, tmp_path)
    monkeypatch.setenv(ranks.LAUNCH, "this one")
    with pytest.raises(TimeoutError, match=r"launch\.stage_wait_minutes.*rank 0"):
        ranks.take(target, tmp_path, wait_minutes=0.02)
    assert not torch.equal(target.weight, source.weight)
    ranks.share(source, tmp_path)
    ranks.take(target, tmp_path, wait_minutes=0.02)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_world_size_counts_devices_times_nodes():
    from qat.train.ranks import world_size

    assert world_size(compose_train([])) == 1
    assert world_size(compose_train(["trainer=ddp"])) == 2
    assert world_size(compose_train(["trainer=ddp", "trainer.devices=[0,1,2]",
                                     "trainer.num_nodes=2"])) == 6


@pytest.mark.parametrize("family", ["mixtral", "phi3"])
def test_fsdp2_shards_a_moe_and_a_non_llama_family_as_one_process_trains(family, tmp_path,
                                                                         one_process):
    """Blocks found from the structure: Mixtral's experts (batched) inside their block's unit,
    Phi-3's fused projections; GPTQ start, training, export. (GPT-2 would differ by its dropout:
    each rank draws its own masks.)"""
    from test_architectures import tiny_model_dir
    from test_moe import moe_model_dir

    source = moe_model_dir(family, tmp_path) if family == "mixtral" else \
        tiny_model_dir(family, tmp_path)
    args = ["recipe=w4g64", "quant.weight.group_size=32", "quant.init=gptq",
            f"model.path={source}", *RUN[2:], "trainer.max_steps=2", "ptq.calibration_samples=4",
            "ptq.seq_len=32", "ptq.progress=false"]
    two_processes("fsdp2", args, tmp_path / "fsdp2")
    assert_same_run(one_process(args), tmp_path / "fsdp2")


# train.py, every rank sleeping 5 s before each step from step 2 on, so that the test's SIGKILL
# lands mid-run after the step-2 checkpoint (Lightning starts rank 1 with this same script)
SLOW_AFTER_2 = """
import runpy, sys, time
from qat.lightning.module import QATModule
original = QATModule.on_train_batch_start
def slow(self, batch, batch_idx):
    if self.global_step >= 2:
        time.sleep(5)
    return original(self, batch, batch_idx)
QATModule.on_train_batch_start = slow
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(%r, run_name="__main__")
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_killed_mid_run_resumes_exactly(strategy, tmp_path):
    """Both ranks SIGKILLed after the step-2 checkpoint (DDP: one file by rank 0; FSDP2:
    distributed, each rank wrote its own shards), resumed with ckpt_path=last (FSDP2: each rank
    builds the model on the meta device and reads its shards back): weights, GPTQ's grids,
    moving-average observers, AdamW moments, schedule and data position come back, and the run
    ends where the uninterrupted one ends, tolerance 0."""
    import signal
    import time

    args = [*RUN, "trainer.max_steps=4", "export.enabled=false", "checkpoint.every_n_steps=2",
            "quant.weight.observer=moving_average", "quant.init=gptq", *PTQ]
    two_processes(strategy, args, tmp_path / "straight")
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_AFTER_2 % str(ROOT / "train.py"))
    run_dir = tmp_path / "killed"
    extra = [f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2",
             "data.batch_size=2"]
    proc = subprocess.Popen([sys.executable, str(script), *args, *extra,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step2, last = (run_dir / "checkpoints" / n for n in ("epoch=0-step=2.ckpt", "last.ckpt"))
    deadline = time.monotonic() + 300
    while not (step2.exists() and last.exists()
               and read_checkpoint(last, tensors=False)["global_step"] == 2) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, inside the sleep before step 3
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()
    if strategy == "fsdp2":
        assert sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # a write cut short leaves only a hidden temporary; plant one: the resume removes it
    (run_dir / "checkpoints" / ".last.ckpt.tmp").mkdir()
    two_processes(strategy, args, run_dir, "ckpt_path=last")
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    a, b = (read_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "straight",
                                                                      run_dir))
    assert b["global_step"] == 4 and a["qat"]["loss_history"] == b["qat"]["loss_history"]
    assert any("observer.min_val" in k for k in a["state_dict"])
    assert any(k.endswith("weight_fake_quant.scale") for k in a["state_dict"])  # GPTQ's grids
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight",
                                                                        run_dir)]
    assert metrics[1]["resumed_from"].endswith("last.ckpt") and metrics[0]["ppl"] == metrics[1]["ppl"]


def test_a_distributed_checkpoint_is_read_as_data_never_code(tmp_path):
    """The shard index of a distributed checkpoint is a pickle: one that names anything but the
    index's own classes is refused before it can run (torch's reader would run it)."""
    import pickle

    from qat.models.checkpoint import SHARDS_INDEX, stored_tensors

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    (tmp_path / SHARDS_INDEX).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        stored_tensors(tmp_path)
    assert not (tmp_path / "ran").exists()

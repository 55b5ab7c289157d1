"""Shared fixtures: a tiny Llama built in-process, and Hydra configs composed from conf/."""
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no busy-waiting on shared cores

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama with widths that are multiples of 128, random but seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests share one cache dir (built once per session), never the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "qat-cache"
    monkeypatch.setenv("QAT_CACHE", str(cache))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run dir, metrics) of a 2-step W4 g128 run of the tiny model on the tiny corpus, exported,
    with the final evaluation's distance to the float model (top 64)."""
    from qat.train import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(["model=tiny", "data=tiny", "logger=none", "trainer.max_steps=2",
                         "trainer.enable_progress_bar=false", "recipe=w4g128", "eval.kl_top_k=64"])
    with pytest.MonkeyPatch.context() as patch:  # session scope: before the autouse cache fixture
        patch.setenv("QAT_CACHE", str(tmp_path_factory.getbasetemp() / "qat-cache"))
        return run_dir, train(cfg, run_dir=run_dir)


def compose_train(overrides=()):
    """The train config composed from conf/ with `overrides`, as `python train.py ...` would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "qat" / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def assert_decompresses_to_trained(export_dir, quantized) -> set[str]:
    """compressed-tensors' own decompressor unpacks every quantized layer of a single-file export
    to the trained weights (`quantized`: stored name -> FakeQuantLinear), bit for bit; returns
    the stored layer names."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    from qat.format.schema import read_config

    qc = read_config(export_dir)["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=qc["config_groups"]["group_0"]["weights"])
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as f:
        stored = {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith("weight_packed")}
        assert stored == set(quantized)
        for name in stored:
            local = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys()
                     if k.rsplit(".", 1)[0] == name}
            theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            module = quantized[name]
            ours = module.weight_fake_quant.dequantized(module.weight).to(torch.bfloat16)
            assert torch.equal(theirs, ours), name
    return stored

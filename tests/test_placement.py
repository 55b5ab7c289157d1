"""Where the stages compute (qat.models.placement, `model.device`): names checked, `auto` the
trainer's accelerator, and on a CUDA device the same numbers as on the host with one decoder block
there at a time and everything back on the host after. The CUDA tests run where a GPU is visible."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import compose_train
from qat.blockwise import BlockwiseSpec, train_blocks
from qat.eval.perplexity import perplexity
from qat.models import ModelSpec
from qat.models.onload import onloaded_model, onloader_of
from qat.models.placement import computing_on, home_of, stage_device, to_device
from qat.models.structure import decoder_blocks
from qat.ptq import quantize_model
from qat.quant import QuantConfig, WeightSpec, prepare
from qat.train import ConfigError, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = torch.device("cuda", 0)


def _llama(seed=0, layers=3):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _devices(model) -> list[str]:
    """The device type of each decoder block ('meta' for an onloaded block in its files)."""
    return [home_of(b).type if any(t.device.type != "meta" for t in b.parameters()) else "meta"
            for b in decoder_blocks(model)[1]]


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", "", 3, None])
def test_bad_device_names_are_refused_naming_the_field(name):
    with pytest.raises(ValueError, match=r"model\.device=.* is not allowed; one of auto \| cpu"):
        ModelSpec(device=name)


def test_auto_follows_the_trainer_accelerator():
    assert stage_device("auto", accelerator="cpu") == torch.device("cpu")
    assert stage_device("cpu", accelerator="gpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    assert stage_device("auto", accelerator="auto") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_a_missing_cuda_device_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"model\.device='cuda': no CUDA device is visible"):
        stage_device("cuda")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError, match=r"model\.device='cuda:0': no CUDA device"):
        train(compose_train(["recipe=w4g64", "model=tiny", "data=tiny", "logger=none",
                             "model.device=cuda:0"]), run_dir=run_dir)
    assert not run_dir.exists()


def test_to_device_keeps_the_structure():
    value = (torch.ones(2), {"mask": None, "pos": (torch.zeros(1), 3)}, [torch.ones(1)], "x")
    moved = to_device(value, torch.device("cpu"))
    assert type(moved) is tuple and moved[3] == "x" and moved[1]["mask"] is None
    assert isinstance(moved[1]["pos"], tuple) and moved[1]["pos"][1] == 3
    assert isinstance(moved[2], list) and torch.equal(moved[2][0], value[2][0])


def test_on_the_host_nothing_moves_and_no_hook_is_left():
    model = _llama()
    before = {n: t.data_ptr() for n, t in model.state_dict().items()}
    with computing_on(model, "cpu", whole=False):
        assert all(not b._forward_pre_hooks for b in decoder_blocks(model)[1])
        model(torch.tensor([[1, 2, 3]]))
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == before


@cuda
@pytest.mark.parametrize("whole", [False, True])
def test_on_cuda_the_same_logits_one_block_at_a_time(whole):
    model = _llama()
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    seen = []
    for block in decoder_blocks(model)[1]:
        block.mlp.register_forward_hook(lambda *_: seen.append(_devices(model)))
    with torch.no_grad(), computing_on(model, GPU, whole=whole):
        got = model(ids.to(GPU)).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if whole:
        assert seen == [["cuda"] * 3] * 3
    else:  # block i alone on the device while it runs
        assert seen == [["cuda", "cpu", "cpu"], ["cpu", "cuda", "cpu"], ["cpu", "cpu", "cuda"]]
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cpu"}
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in decoder_blocks(model)[1])


@cuda
def test_on_cuda_an_onloaded_model_reads_its_blocks_there(tmp_path):
    _llama().save_pretrained(tmp_path, max_shard_size="100KB")
    model = onloaded_model(tmp_path, torch.float32)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        with computing_on(model, GPU, whole=False):
            assert onloader_of(model).device == GPU
            got = model(ids.to(GPU)).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert onloader_of(model).device == torch.device("cpu")
    assert _devices(model) == ["meta"] * 3 and model.lm_head.weight.device.type == "cpu"
    assert perplexity(model, ids[0], window=8).ppl > 0  # still runs on the host


def _quantized(model):
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=32)))
    return model


@cuda
def test_gptq_and_the_block_stage_on_cuda_match_the_host():
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    host, gpu = _quantized(_llama()), _quantized(_llama())
    quantize_model(host, "gptq", ids, batch_size=2)
    quantize_model(gpu, "gptq", ids, batch_size=2, device=GPU)
    assert {t.device.type for t in gpu.state_dict().values()} == {"cpu"}
    for (name, a), b in zip(host.state_dict().items(), gpu.state_dict().values()):
        if "scale" in name:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    spec = BlockwiseSpec(enabled=True, samples=4, seq_len=32, epochs=2, batch_size=2,
                         progress=False)
    reference = _llama()
    on_host = train_blocks(host, copy.deepcopy(reference), ids, spec)
    on_gpu = train_blocks(gpu, reference, ids, spec, device=GPU)
    assert {t.device.type for t in (*gpu.state_dict().values(), *reference.state_dict().values())} \
        == {"cpu"}
    for a, b in zip(on_host.blocks, on_gpu.blocks, strict=True):
        assert (b.loss_before, b.loss_after) == pytest.approx((a.loss_before, a.loss_after),
                                                              rel=0.05)


@cuda
def test_a_tiny_run_on_cuda_ends_on_the_host(tmp_path):
    args = ["recipe=w4g64_kd", "model=tiny", "data=tiny", "logger=none",
            "trainer.enable_progress_bar=false", "trainer.max_steps=2", "blockwise.samples=4",
            "blockwise.seq_len=32", "blockwise.epochs=1", "blockwise.progress=false"]
    on_host = train(compose_train(args + ["model.device=cpu", "trainer.accelerator=cpu"]),
                    run_dir=tmp_path / "cpu")
    on_gpu = train(compose_train(args + ["model.device=cuda"]), run_dir=tmp_path / "gpu")
    for key in ("fp_ppl", "block_ppl", "ppl", "export_ppl"):
        assert on_gpu[key] == pytest.approx(on_host[key], rel=0.05), key


def test_dtype_auto_is_bfloat16_only_on_a_cuda_gpu_with_it():
    auto = ModelSpec(name="tiny")
    assert auto.dtype == "auto" and auto.torch_dtype == torch.float32  # unresolved: the host's
    assert auto.for_device("cuda", True).dtype == "bfloat16"
    assert auto.for_device("cuda", False).dtype == "float32"
    assert auto.for_device("cpu", True).dtype == "float32"
    assert ModelSpec(name="tiny", dtype="float16").for_device("cuda", True).dtype == "float16"
    if not torch.cuda.is_available():  # this machine's run: the host, float32
        from qat.train import steps
        from qat.train.specs import build_specs

        cfg = compose_train(["model=tiny", "data=tiny"])
        specs = build_specs(cfg)
        assert steps.stage_device(specs, cfg) == torch.device("cpu")
        assert specs.model.dtype == "float32"

"""Export: the packed checkpoint reloads into a model that computes what was trained."""
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from qat.export.compressed_tensors import as_exported
from qat.export.load import load_quantized, weight_bytes
from qat.export.writer import export_model
from qat.format.schema import read_config
from qat.kernels import QuantizedLinear
from qat.quant import QuantConfig, WeightSpec, prepare

SPECS = {
    "w4g64": WeightSpec(bits=4, group_size=64),
    "w4g32_asym": WeightSpec(bits=4, group_size=32, symmetric=False),
    "w8_channel": WeightSpec(bits=8, granularity="channel", group_size=None),
    "w3g64_asym": WeightSpec(bits=3, group_size=64, symmetric=False),
    "w2g32_lsq": WeightSpec(bits=2, group_size=32, symmetric=False, learnable_scale=True),
    "w4_tensor": WeightSpec(bits=4, granularity="tensor", group_size=None),
}


@pytest.fixture
def peaked_llama(tiny_llama):
    """The tiny model with larger weights: peaked next-token distributions make greedy decoding a
    meaningful check (random small-init models sit on near-ties)."""
    with torch.no_grad():
        for p in tiny_llama.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return tiny_llama


def _greedy(model, ids, n=32):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", list(SPECS))
def test_served_equals_trained(peaked_llama, tmp_path, name):
    """Reference path, float32 non-quantized tensors: logits within 1e-5, greedy tokens identical."""
    prepare(peaked_llama, QuantConfig(weight=SPECS[name]))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = peaked_llama(ids).logits
    export_model(peaked_llama, None, tmp_path / "export", dtype=torch.float32)
    served = load_quantized(tmp_path / "export", dtype=torch.float32, backend="reference")
    assert sum(isinstance(m, QuantizedLinear) for m in served.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, trained, rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(served, ids[:1]), _greedy(peaked_llama, ids[:1]))


@pytest.mark.parametrize("name", list(SPECS))
def test_convert_in_memory_is_the_export_read_back(peaked_llama, tmp_path, name):
    """convert() builds, without files, bit for bit the model load_quantized reads from the export;
    the fake-quantized model it came from is left as it was (a copy)."""
    from qat.export import convert

    prepare(peaked_llama, QuantConfig(weight=SPECS[name]))
    before = {k: v.clone() for k, v in peaked_llama.state_dict().items()}
    served = convert(peaked_llama, torch.bfloat16, backend="reference")
    assert all(torch.equal(v, before[k]) for k, v in peaked_llama.state_dict().items())
    export_model(served, None, tmp_path / "export")
    reread = load_quantized(tmp_path / "export", dtype=torch.bfloat16, backend="reference")
    mine, theirs = served.state_dict(), reread.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    # the export of the converted model is the export of the fake-quantized one, file for file
    export_model(peaked_llama, None, tmp_path / "direct")
    for f in ("model.safetensors", "config.json", "README.md", "serving_report.json"):
        assert (tmp_path / "export" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes(), f
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(served(ids).logits, reread(ids).logits)


def test_convert_in_place_frees_each_layer_as_it_goes(tiny_llama, monkeypatch):
    """In place, a replaced layer (its codes, its float weight) is garbage before the next one is
    converted: the served model is built beside one fake-quantized layer, never beside all of them
    (at 14B that was a second model's worth of memory in the export stage)."""
    import gc
    import importlib
    import weakref

    from qat.quant.modules import FakeQuantLinear

    module = importlib.import_module("qat.export.convert")
    prepare(tiny_llama, QuantConfig(weight=SPECS["w4g64"]))
    old = [weakref.ref(m) for m in tiny_llama.modules() if isinstance(m, FakeQuantLinear)]
    alive = []

    def count_alive() -> None:
        gc.collect()
        alive.append(sum(r() is not None for r in old))

    monkeypatch.setattr(module, "release_memory", count_alive)
    module.convert(tiny_llama, torch.bfloat16, inplace=True)
    assert len(alive) == len(old) == 14
    # after the i-th layer: the others not yet converted, and at most the one just replaced
    assert all(n <= len(old) - i for i, n in enumerate(alive, start=1)), alive
    assert all(r() is None for r in old)


def test_convert_refuses_a_model_without_fake_quantization(tiny_llama):
    from qat.export import convert

    with pytest.raises(ValueError, match="no fake-quantized Linear"):
        convert(tiny_llama)


def test_bf16_export_with_fast_kernels_is_close(peaked_llama, tmp_path):
    prepare(peaked_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = peaked_llama(ids).logits
    export_model(peaked_llama, None, tmp_path / "export")
    served = load_quantized(tmp_path / "export")  # bf16, CPU int4 kernel
    with torch.no_grad():
        logits = served(ids).logits.float()
    # bf16 activations and embeddings: relative error of a few bf16 ulps accumulated over 2 layers.
    rel = (logits - trained).norm() / trained.norm()
    assert rel < 2e-2, rel


def test_as_exported_computes_the_bf16_export_and_restores(peaked_llama, tmp_path):
    """Inside `as_exported` the fake-quant model equals the bf16 export reloaded in float32."""
    prepare(peaked_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    before = {k: v.clone() for k, v in peaked_llama.state_dict().items()}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    export_model(peaked_llama, None, tmp_path / "export")  # bf16 for everything not packed
    served = load_quantized(tmp_path / "export", dtype=torch.float32, backend="reference")
    with torch.no_grad():
        with as_exported(peaked_llama, torch.bfloat16):
            trained = peaked_llama(ids).logits
        full = peaked_llama(ids).logits
        torch.testing.assert_close(served(ids).logits, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, trained, rtol=1e-5, atol=1e-5)  # the rounding is real
    for key, value in peaked_llama.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_config_json_is_compressed_tensors_pack_quantized(tiny_llama, tmp_path):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64),
                                    overrides={"*.down_proj": {"bits": 8, "granularity": "channel"}}))
    export_model(tiny_llama, None, tmp_path / "e")
    qc = read_config(tmp_path / "e")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    groups = sorted(qc["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [g["weights"]["num_bits"] for g in groups] == [4, 8]
    assert len(groups[1]["targets"]) == 2 and groups[1]["weights"]["strategy"] == "channel"
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(qc)  # the package's own schema (extra="forbid") accepts it


@pytest.mark.parametrize("name", ["w4g64", "w4g32_asym", "w8_channel", "w3g64_asym", "w2g32_lsq"])
def test_compressed_tensors_decompresses_our_export_bit_for_bit(tiny_llama, tmp_path, name):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    spec = SPECS[name]
    prepare(tiny_llama, QuantConfig(weight=spec))
    export_model(tiny_llama, None, tmp_path / "e")
    qc = read_config(tmp_path / "e")["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=qc["config_groups"]["group_0"]["weights"])
    modules = dict(tiny_llama.named_modules())
    with safe_open(str(tmp_path / "e" / "model.safetensors"), framework="pt") as f:
        names = {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith("weight_packed")}
        assert len(names) == 14
        for name_ in names:
            local = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys()
                     if k.rsplit(".", 1)[0] == name_}
            theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            module = modules[name_]
            ours = module.weight_fake_quant.dequantized(module.weight)
            assert theirs.dtype == torch.bfloat16
            assert torch.equal(theirs, ours.to(torch.bfloat16)), name_


def test_bits_per_weight_and_memory(tiny_llama, tmp_path):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(tiny_llama, None, tmp_path / "e")
    with safe_open(str(tmp_path / "e" / "model.safetensors"), framework="pt") as f:
        bits = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8 for k in f.keys()
                   if k.endswith(("weight_packed", "weight_scale")))
        numel = sum(int(torch.prod(f.get_tensor(k))) for k in f.keys() if k.endswith("weight_shape"))
    assert bits / numel == pytest.approx(4.25)
    served = load_quantized(tmp_path / "e")
    held = weight_bytes(served)
    assert held["quantized_linear"] <= numel * 4.25 / 8 * 1.01


def _export(tiny_llama, tmp_path):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    return export_model(tiny_llama, None, tmp_path / "e")


def test_truncated_safetensors_is_a_clear_error(tiny_llama, tmp_path):
    out = _export(tiny_llama, tmp_path)
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_quantized(out)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    out = _export(tiny_llama, tmp_path)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_scale"):
        load_quantized(out)


def test_shape_disagreeing_with_config_is_named(tiny_llama, tmp_path):
    out = _export(tiny_llama, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 384
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_proj\.weight_shape' is \[256, 128\] but config\.json"):
        load_quantized(out)


def test_unknown_quant_method_is_rejected(tiny_llama, tmp_path):
    out = _export(tiny_llama, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant_method='gptq' is not supported"):
        load_quantized(out)


def test_failed_export_leaves_nothing(tiny_llama, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    with pytest.raises(OSError, match="disk full"):
        export_model(tiny_llama, BrokenTokenizer(), tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_is_readable_like_any_model_directory(tiny_llama, tmp_path, umask):
    """Not mkdtemp's 0700 nor safetensors' 0600: the modes a new file gets under the umask."""
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    old = os.umask(umask)
    try:
        export_model(tiny_llama, None, tmp_path / "e")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "e").iterdir())
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_act_order_group_permutation_is_refused_not_ignored(tiny_llama, tmp_path):
    """A `group` act-order checkpoint (other tools' GPTQ) needs weight_g_idx: refuse, never skip."""
    from safetensors.torch import load_file, save_file

    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(tiny_llama, None, tmp_path / "e")
    config_path = tmp_path / "e" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="actorder='group'"):
        load_quantized(tmp_path / "e")
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = None
    config_path.write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "e" / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.arange(128, dtype=torch.int32) // 64
    save_file(weights, str(tmp_path / "e" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_g_idx"):
        load_quantized(tmp_path / "e")

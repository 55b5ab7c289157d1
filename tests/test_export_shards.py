"""A sharded export (export.max_shard_size): Hugging Face's layout, read by our loader, by
transformers + compressed-tensors, and decompressed by compressed-tensors to the trained weights."""
import json

import pytest
import torch
from safetensors import safe_open

from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat.format.shards import INDEX_FILE, parse_size, plan_shards, weight_files
from qat.quant import QuantConfig, WeightSpec, prepare


@pytest.fixture
def sharded(tiny_llama, tmp_path):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    out = export_model(tiny_llama, None, tmp_path / "e", dtype=torch.float32,
                       max_shard_bytes=parse_size("60KB"))
    return tiny_llama, out


def test_the_layout_is_hugging_faces(sharded):
    _, out = sharded
    index = json.loads((out / INDEX_FILE).read_text())
    files = weight_files(out)
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    stored = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys = list(handle.keys())
        stored.update({k: f.name for k in keys})
        modules = {k.rpartition(".")[0] for k in keys}
        # within the limit (the header on top), unless one module alone is larger
        assert f.stat().st_size <= 60_000 + 4096 or len(modules) == 1, (f.name, modules)
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(
        f.stat().st_size for f in files) - sum(8 + _header(f) for f in files)


def _header(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_our_loader_serves_what_was_trained(sharded):
    model, out = sharded
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    served = load_quantized(out, dtype=torch.float32, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_transformers_loads_it(sharded):
    from transformers import AutoModelForCausalLM

    model, out = sharded
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_compressed_tensors_decompresses_every_shard_bit_for_bit(sharded):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, out = sharded
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=qc["config_groups"]["group_0"]["weights"])
    modules, seen = dict(model.named_modules()), 0
    for f in weight_files(out):
        with safe_open(str(f), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        for name in {k.rsplit(".", 1)[0] for k in tensors if k.endswith("weight_packed")}:
            local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                     if k.rsplit(".", 1)[0] == name}
            assert {"weight_packed", "weight_scale", "weight_shape"} <= set(local), \
                f"{name}: a layer's tensors were split across shards"
            theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            module = modules[name]
            ours = module.weight_fake_quant.dequantized(module.weight)
            assert torch.equal(theirs, ours.to(theirs.dtype)), name
            seen += 1
    assert seen == 14


def test_an_index_that_disagrees_with_the_shards_is_refused(sharded):
    _, out = sharded
    index = json.loads((out / INDEX_FILE).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00001-of-00001.safetensors"
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError), match="model-00001-of-00001|index"):
        load_quantized(out)


def test_shard_plan_and_sizes():
    assert plan_shards([("a", 5), ("b", 5), ("c", 11), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards([("a", 5)], 1) == [["a"]]  # a tensor larger than the limit stands alone
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234 and parse_size("1.5 MB") == 1_500_000
    for bad in ("lots", "0", "-1MB", "5 GBs"):
        with pytest.raises(ValueError, match="export.max_shard_size"):
            parse_size(bad)


def test_iter_tensors_reads_what_safetensors_wrote_one_tensor_at_a_time(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from qat.format.shards import iter_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randint(-9, 9, (4, 2), generator=g, dtype=torch.int32),
               "d": torch.tensor(2.5, dtype=torch.float64), "e": torch.tensor([True, False]),
               "f": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    read = dict(iter_tensors(tmp_path / "x.safetensors"))
    assert read.keys() == tensors.keys()
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_tensors(tmp_path / "cut.safetensors"))

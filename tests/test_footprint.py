"""Footprint arithmetic against hand-computed bytes, and the prediction against a real export."""
import json

import pytest

from qat.eval.footprint import (LinearShape, ModelShapes, estimated_bits_per_weight, export_footprint,
                                layer_bytes, model_bytes, model_shapes, naive_bytes,
                                safetensors_bytes)
from qat.footprint.__main__ import main
from qat.quant import QuantConfig, WeightSpec, prepare


def spec(bits, group_size=64, symmetric=True):
    gran = "group" if group_size else "channel"
    return WeightSpec(bits=bits, granularity=gran, group_size=group_size, symmetric=symmetric)


def test_naive_bytes_of_a_70b_model():
    assert [naive_bytes(70e9, b) / 1e9 for b in (32, 16, 8, 4)] == [280, 140, 70, 35]


@pytest.mark.parametrize("shape, s, expected", [
    # packed: out * ceil(in*b/32) words * 4; scales: out * groups * 2; zp: ceil(out*b/32) * groups * 4
    ((96, 128), spec(4), (96 * 16 * 4, 96 * 2 * 2, 0)),
    ((96, 128), spec(4, symmetric=False), (96 * 16 * 4, 96 * 2 * 2, 12 * 2 * 4)),
    ((100, 128), spec(3, symmetric=False), (100 * 12 * 4, 100 * 2 * 2, 10 * 2 * 4)),
    ((64, 100), spec(8, None, symmetric=False), (64 * 25 * 4, 64 * 2, 16 * 4)),
    ((64, 100), spec(2, None), (64 * 7 * 4, 64 * 2, 0)),  # 200 bits per row: 7 words, 24 spare bits
    ((10, 64), WeightSpec(bits=4, granularity="tensor", symmetric=False), (10 * 8 * 4, 2, 4)),
])
def test_layer_bytes_by_hand(shape, s, expected):
    got = layer_bytes(LinearShape("l", *shape), s)
    assert (got["weight_packed"], got["weight_scale"], got["weight_zero_point"]) == expected
    assert got["weight_shape"] == 16


def test_group_that_does_not_tile_the_row_names_the_layer():
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj.*in_features=96.*64"):
        layer_bytes(LinearShape("model.layers.3.mlp.up_proj", 128, 96), spec(4))


def test_model_bytes_adds_the_float_rest_once():
    shapes = ModelShapes((LinearShape("a", 64, 128), LinearShape("b", 128, 64)),
                         total_params=64 * 128 * 2 + 1000)
    got = model_bytes(shapes, spec(4, symmetric=False))
    assert got["weight_packed"] == 64 * 16 * 4 + 128 * 8 * 4
    assert got["weight_scale"] == 64 * 2 * 2 + 128 * 1 * 2
    assert got["weight_zero_point"] == 8 * 2 * 4 + 16 * 1 * 4
    assert got["float"] == 2000 and got["weight_shape"] == 32
    assert got["total"] == (4096 + 4096) + (256 + 256) + (64 + 64) + 2000 + 32
    mixed = model_bytes(shapes, {"a": spec(4)})  # b stays in float
    assert mixed["float"] == (1000 + 128 * 64) * 2 and mixed["weight_shape"] == 16


def test_estimated_bits_per_weight():
    assert estimated_bits_per_weight(spec(4)) == 4.25
    assert estimated_bits_per_weight(spec(4, symmetric=False)) == 4 + 20 / 64
    assert estimated_bits_per_weight(spec(4, 128)) == 4.125
    assert estimated_bits_per_weight(spec(8, None)) == 8.0
    assert estimated_bits_per_weight(spec(8, None), in_features=512) == 8 + 16 / 512


def test_shapes_of_a_model_dir_from_config_alone(tiny_llama, tmp_path):
    tiny_llama.config.save_pretrained(tmp_path)  # config.json only: no weights needed
    shapes = model_shapes(str(tmp_path))
    assert shapes.total_params == sum(p.numel() for p in tiny_llama.parameters())
    assert len(shapes.linears) == 14 and all("lm_head" not in l.name for l in shapes.linears)
    assert shapes.linear_params == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)


@pytest.fixture
def mixed_export(tiny_llama, tmp_path):
    from qat.export.writer import export_model

    config = QuantConfig(weight=spec(4, symmetric=False),
                         overrides={"*mlp.down_proj": {"bits": 8, "granularity": "channel",
                                                       "group_size": None}})
    prepare(tiny_llama, config)
    return export_model(tiny_llama, None, tmp_path / "export")


def test_export_measured_bytes_equal_the_prediction(mixed_export):
    from safetensors.torch import load_file

    info = export_footprint(mixed_export)
    assert info["measured"] == info["predicted"]
    assert info["schemes"] == {"W4 g64 asym": 12, "W8 per-channel asym": 2}
    tensors = load_file(mixed_export / "model.safetensors")
    assert info["measured"]["total"] == sum(t.numel() * t.element_size() for t in tensors.values())
    zp = sum(t.numel() * 4 for k, t in tensors.items() if k.endswith("zero_point"))
    assert safetensors_bytes(mixed_export / "model.safetensors")["weight_zero_point"] == zp


def test_cli_params_table_and_json(tmp_path, capsys):
    assert main(["--params", "70e9", "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "280.000" in out and "260.770" in out and "INT4 g64 sym" in out
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["naive"]["INT4"] == 35e9
    assert data["estimate"]["INT4 g64 sym"]["total"] == pytest.approx(70e9 * 4.25 / 8)


def test_cli_model_dir_exact_and_export(tiny_llama, tmp_path, capsys, mixed_export):
    tiny_llama.config.save_pretrained(tmp_path / "float")
    assert main(["--model", str(tmp_path / "float"), "--json", str(tmp_path / "f.json")]) == 0
    exact = json.loads((tmp_path / "f.json").read_text())["exact"]
    linear = 294912  # the tiny Llama's decoder Linear weights, 14 layers
    assert exact["INT4 g64 sym"]["linear_bytes"] == linear // 2 + linear // 64 * 2 + 14 * 16
    assert exact["INT4 g64 sym"]["other_bytes"] == (300 * 128 + 5 * 128) * 2
    assert main(["--model", str(mixed_export)]) == 0
    assert "NO" not in capsys.readouterr().out


def test_cli_odd_width_is_an_error_naming_the_layer(tiny_llama, tmp_path, capsys):
    tiny_llama.config.intermediate_size = 96  # down_proj rows of 96 cannot hold groups of 64
    tiny_llama.config.save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path)]) == 2
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--group-size", "32"]) == 0


def _saved_llama(directory, layers):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.tiny import tiny_tokenizer

    config = AutoConfig.for_model("llama", num_hidden_layers=layers, hidden_size=128,
                                  intermediate_size=256, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_tokenizer(512).save_pretrained(directory)
    return directory


def test_run_footprint_per_stage(tmp_path, capsys):
    """--recipe: each stage's host and disk bytes; a streamed recipe holds codes, so a model of
    twice the blocks adds about the held bytes of the added blocks, far below their float
    bytes; the recipe that loads the model whole needs more."""
    from qat.footprint.run import held_layer_bytes

    small, large = _saved_llama(tmp_path / "a", 2), _saved_llama(tmp_path / "b", 4)
    outs = {}
    for name, model in (("small", small), ("large", large)):
        for recipe in ("w4g64_kd", "w4g64"):
            path = tmp_path / f"{name}-{recipe}.json"
            assert main(["--model", str(model), "--recipe", recipe, "data=tiny",
                         "--json", str(path)]) == 0
            outs[name, recipe] = json.loads(path.read_text())
    assert "streamed" in capsys.readouterr().out
    assert outs["small", "w4g64_kd"]["streamed"] and not outs["small", "w4g64"]["streamed"]
    stages = [r["stage"] for r in outs["small", "w4g64_kd"]["stages"]]
    assert stages == ["load", "ptq", "block stage", "end-to-end", "checkpoint", "export"]

    def stage(key, name):
        return next(r["host_bytes"] for r in outs[key]["stages"] if r["stage"] == name)

    added = outs["large", "w4g64_kd"]["params"] - outs["small", "w4g64_kd"]["params"]
    grew = stage(("large", "w4g64_kd"), "ptq") - stage(("small", "w4g64_kd"), "ptq")
    assert 0 < grew < added * 1.5  # bytes per added parameter: codes and grids, not floats
    whole = stage(("large", "w4g64"), "end-to-end") - stage(("small", "w4g64"), "end-to-end")
    assert whole > added * 4  # the float model, its gradients and AdamW moments
    disk = [r["disk_bytes"] for r in outs["small", "w4g64_kd"]["stages"]]
    assert disk == sorted(disk)  # the files only accumulate
    spec = WeightSpec(bits=4, group_size=64)
    from qat.footprint.run import QuantizedLayer

    assert held_layer_bytes(QuantizedLayer(128, 256, spec)) == 128 * 256 // 2 + 128 * 4 * 12 + 8


def test_run_footprint_refuses_bad_input(tmp_path, capsys):
    model = _saved_llama(tmp_path / "m", 2)
    assert main(["--model", str(model), "--recipe", "no_such_recipe"]) == 2
    assert main(["--model", str(tmp_path / "nowhere"), "--recipe", "w4g64_kd"]) == 2
    assert main(["--model", str(model), "--recipe", "w4g64_kd", "optim.trainable=nope"]) == 2
    assert "optim.trainable" in capsys.readouterr().err

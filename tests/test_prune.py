"""Pruning math, specs, schedules, scores and structured shrinking, on small tensors and tiny_llama."""
import pytest
import torch
from torch import nn

from qat.prune import (PruneSpec, check_nm, collect_input_norms, compute_masks, global_masks,
                       gradual_sparsity, last_update_at, nm_mask, prune, shrink, sparsity_at,
                       sparsity_report, unstructured_mask, wanda_score)
from qat.quant import FakeQuantLinear, QuantConfig, WeightSpec, prepare, unprepare


def tied_scores(*shape, seed=0):
    """Scores with many exact ties (integers 0..4), so a threshold alone could not hit the count."""
    return torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(seed)).float()


def ids(n=4, t=12, seed=1):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- unstructured and N:M masks ------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.3, 0.5, 0.9])
def test_layer_mask_prunes_exactly_the_lowest_scores_despite_ties(sparsity):
    score = tied_scores(16, 36)
    keep = unstructured_mask(score, sparsity, "layer")
    assert int((~keep).sum()) == round(sparsity * score.numel())
    if 0 < sparsity:
        assert score[~keep].max() <= score[keep].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_row_mask_prunes_the_same_count_in_every_row(sparsity):
    score = tied_scores(8, 40)
    keep = unstructured_mask(score, sparsity, "row")
    assert ((~keep).sum(1) == round(sparsity * 40)).all()
    for row, k in zip(score, keep):
        assert row[~k].max() <= row[k].min()


def test_global_mask_has_one_threshold_and_an_exact_total():
    scores = {"small": tied_scores(8, 16, seed=2) * 0.5, "large": tied_scores(4, 32, seed=3) + 2}
    masks = global_masks(scores, 0.4)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.4 * (128 + 128))
    kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
    gone = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
    assert gone.max() <= kept.min()
    assert int((~masks["small"]).sum()) > int((~masks["large"]).sum())  # not per layer


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_best_of_every_m(n, m):
    score = tied_scores(6, 32)
    keep = nm_mask(score, n, m)
    groups, kept = score.view(-1, m), keep.view(-1, m)
    assert ((~kept).sum(1) == m - n).all()
    for g, k in zip(groups, kept):
        assert g[~k].max() <= g[k].min()
    assert check_nm(score * keep, n, m)
    assert not check_nm(torch.randn(6, 32), n, m)  # dense weights fail the check


def test_check_nm_needs_m_to_divide_the_rows():
    assert check_nm(torch.zeros(3, 8), 2, 4)
    assert not check_nm(torch.zeros(3, 6), 2, 4)


def test_nm_spec_prunes_tiny_llama_and_the_report_confirms(tiny_llama):
    spec = PruneSpec(method="magnitude", pattern="2:4")
    head_before = tiny_llama.lm_head.weight.clone()
    masks = prune(tiny_llama, spec)
    assert len(masks) == 14  # 7 Linears in each of 2 layers, lm_head excluded
    report = sparsity_report(tiny_llama, spec.include, spec.exclude, spec.pattern)
    assert all(layer["nm_ok"] for layer in report["layers"].values())
    assert report["overall"]["sparsity"] == 0.5
    assert torch.equal(tiny_llama.lm_head.weight, head_before)
    import json
    json.dumps(report)  # the lead writes it next to metrics.json


def test_global_spec_on_tiny_llama_hits_the_exact_total(tiny_llama):
    spec = PruneSpec(method="magnitude", sparsity=0.6, scope="global")
    masks = prune(tiny_llama, spec)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    per_layer = {round(float((~m).float().mean()), 3) for m in masks.values()}
    assert len(per_layer) > 1  # layers differ under one global threshold


# ---- schedules ---------------------------------------------------------------------------------

def test_gradual_cubic_values_and_clamping():
    assert gradual_sparsity(10, 0.1, 0.8, 10, 20) == pytest.approx(0.1)
    assert gradual_sparsity(20, 0.1, 0.8, 10, 20) == pytest.approx(0.8)
    assert gradual_sparsity(15, 0.0, 0.8, 10, 20) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert gradual_sparsity(0, 0.1, 0.8, 10, 20) == pytest.approx(0.1)
    assert gradual_sparsity(99, 0.1, 0.8, 10, 20) == pytest.approx(0.8)


def test_gradual_schedule_updates_every_k_steps_and_reaches_the_end():
    spec = PruneSpec(method="magnitude", sparsity=0.8, schedule="gradual", start_step=10,
                     end_step=20, every_n_steps=3, initial_sparsity=0.1)
    updates = {step: last_update_at(step, spec) for step in range(0, 26)}
    assert updates[9] is None and sparsity_at(9, spec) == 0.0  # not started
    assert [updates[s] for s in (10, 12, 13, 15, 16, 19, 20, 25)] == [10, 10, 13, 13, 16, 19, 20, 20]
    assert sparsity_at(10, spec) == pytest.approx(0.1)
    assert sparsity_at(12, spec) == sparsity_at(10, spec)  # held between updates
    assert sparsity_at(13, spec) == pytest.approx(gradual_sparsity(13, 0.1, 0.8, 10, 20))
    assert sparsity_at(20, spec) == pytest.approx(0.8) and sparsity_at(1000, spec) == 0.8
    values = [sparsity_at(s, spec) for s in range(10, 26)]
    assert values == sorted(values)


def test_oneshot_constant_and_nm_schedules():
    oneshot = PruneSpec(method="magnitude", sparsity=0.3, start_step=5)
    assert [sparsity_at(s, oneshot) for s in (0, 4, 5, 50)] == [0.0, 0.0, 0.3, 0.3]
    assert last_update_at(50, oneshot) == 5
    constant = PruneSpec(method="wanda", sparsity=0.3, schedule="constant")
    assert sparsity_at(0, constant) == 0.3 and last_update_at(7, constant) == 0
    assert sparsity_at(0, PruneSpec(method="magnitude", pattern="4:8")) == 0.5
    assert last_update_at(3, PruneSpec()) is None  # method=none never prunes


# ---- scores --------------------------------------------------------------------------------------

def test_wanda_keeps_small_weights_on_loud_features_where_magnitude_drops_them():
    loudness = torch.tensor([1.0, 10.0, 0.1, 1.0])
    embed = nn.Embedding(4, 4)
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        embed.weight.copy_(torch.diag(loudness))  # token j lights feature j at loudness[j]
        linear.weight.copy_(torch.tensor([[1.0, 0.5, 2.0, 0.25], [0.3, 0.2, 4.0, 1.0]]))
    model = nn.Sequential(embed, linear)
    tokens = torch.arange(4).repeat(3, 2)  # (3, 8): every feature seen 6 times
    norms = collect_input_norms(model, tokens, names=["1"])
    assert torch.allclose(norms["1"], loudness * 6 ** 0.5)
    wanda = unstructured_mask(wanda_score(linear.weight, norms["1"]), 0.5, "row")
    magnitude = unstructured_mask(linear.weight.abs(), 0.5, "row")
    assert magnitude.tolist() == [[True, False, True, False], [False, False, True, True]]
    assert wanda.tolist() == [[True, True, False, False], [False, True, False, True]]


def test_input_norms_of_tiny_llama_cover_every_linear_and_respect_max_samples(tiny_llama):
    data = ids(4)
    norms = collect_input_norms(tiny_llama, data, max_samples=2, batch_size=1)
    assert len(norms) == 15 and norms["model.layers.0.mlp.down_proj"].shape == (256,)
    assert all((v > 0).all() for v in norms.values())
    again = collect_input_norms(tiny_llama, [data[:2]])
    assert all(torch.allclose(norms[k], again[k], rtol=1e-5) for k in norms)
    assert tiny_llama.training is False


# ---- fake quantization keeps pruned weights at zero ------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_pruned_weights_stay_zero_through_fake_quantization(tiny_llama, symmetric):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64, symmetric=symmetric)))
    masks = prune(tiny_llama, PruneSpec(method="magnitude", sparsity=0.5))
    modules = dict(tiny_llama.named_modules())
    zero_points = []
    for name, keep in masks.items():
        layer = modules[name]
        assert isinstance(layer, FakeQuantLinear)
        deq = layer.weight_fake_quant.dequantized(layer.weight)
        assert (deq[~keep] == 0).all()
        assert (layer.weight_fake_quant(layer.weight)[~keep] == 0).all()  # the training forward
        zero_points.append(layer.weight_fake_quant.qparams(layer.weight)[1])
    assert any((zp != 0).any() for zp in zero_points) != symmetric  # asym really has zero points


# ---- structured pruning: masked model == shrunk model ------------------------------------------------

def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("pattern,method,sparsity,expected", [
    ("heads", "magnitude", 0.5, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}),
    ("channels", "wanda", 0.25, {"intermediate_size": 192}),
])
def test_structured_pruning_shrinks_and_matches_the_masked_model(tiny_llama, tmp_path, pattern,
                                                                 method, sparsity, expected):
    from transformers import AutoModelForCausalLM

    spec = PruneSpec(method=method, pattern=pattern, sparsity=sparsity)
    tokens = ids(2, 10, seed=4)
    masks = prune(tiny_llama, spec, calibration=ids(4, 12))
    masked = logits(tiny_llama, tokens)
    summary = shrink(tiny_llama, masks)
    assert summary["config"] == expected
    assert summary["parameters_after"] < summary["parameters_before"]
    assert {k: getattr(tiny_llama.config, k) for k in expected} == expected
    assert torch.allclose(logits(tiny_llama, tokens), masked, atol=1e-5)
    tiny_llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == summary["parameters_after"]
    assert torch.allclose(logits(reloaded, tokens), masked, atol=1e-5)


def test_heads_are_removed_as_whole_kv_groups(tiny_llama):
    masks = compute_masks(tiny_llama, PruneSpec(method="magnitude", pattern="heads", sparsity=0.5))
    o_heads = masks["model.layers.0.self_attn.o_proj"].any(0).view(4, 32).any(1)  # 4 query heads
    kv_heads = masks["model.layers.0.self_attn.k_proj"].any(1).view(2, 32).any(1)  # 2 kv heads
    assert o_heads.tolist() in ([True, True, False, False], [False, False, True, True])
    assert kv_heads.tolist() == o_heads[::2].tolist()


def test_shrink_refuses_fake_quant_layers_and_uneven_layers(tiny_llama):
    masks = compute_masks(tiny_llama, PruneSpec(method="magnitude", pattern="channels",
                                                sparsity=0.5))
    uneven = dict(masks)
    uneven["model.layers.1.mlp.down_proj"] = torch.ones_like(uneven["model.layers.1.mlp.down_proj"])
    with pytest.raises(ValueError, match="different numbers of MLP channels"):
        shrink(tiny_llama, uneven)
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    with pytest.raises(ValueError, match="unprepare"):
        shrink(tiny_llama, masks)
    assert tiny_llama.config.intermediate_size == 256  # nothing touched
    unprepare(tiny_llama)
    assert shrink(tiny_llama, masks)["config"] == {"intermediate_size": 128}


# ---- spec validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"pattern": "3:2"}, r"prune\.pattern='3:2' is not allowed; N:M needs 0 < N < M"),
    ({"pattern": "0:4"}, r"N:M needs 0 < N < M"),
    ({"pattern": "blocks"}, r"prune\.pattern='blocks' is not allowed; choose one of"),
    ({"method": "l1"}, r"prune\.method='l1' is not allowed; choose one of \['none', 'magnitude'"),
    ({"sparsity": 1.0}, r"prune\.sparsity=1\.0 is not allowed; it must be a number in \[0, 1\)"),
    ({"sparsity": True}, r"prune\.sparsity=True"),
    ({"scope": "model"}, r"prune\.scope='model'"),
    ({"scope": "global", "pattern": "heads"}, r"prune\.scope='global' is not allowed with"),
    ({"schedule": "linear"}, r"prune\.schedule='linear'"),
    ({"schedule": "gradual", "pattern": "2:4"}, r"N:M is applied at once"),
    ({"schedule": "gradual", "start_step": 5, "end_step": 5}, r"prune\.end_step=5 is not allowed"),
    ({"schedule": "gradual", "end_step": 9, "initial_sparsity": 0.6}, r"initial_sparsity=0\.6"),
    ({"schedule": "constant", "start_step": 3}, r"prune\.start_step=3 is not allowed"),
    ({"every_n_steps": 0}, r"prune\.every_n_steps=0 is not allowed; it must be an integer >= 1"),
    ({"include": "*layers.*"}, r"prune\.include must be a list"),
    ({"include": []}, r"prune\.include is empty"),
])
def test_bad_specs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneSpec(**{"method": "magnitude", **kwargs})


def test_spec_accepts_hydra_lists_and_reports_final_sparsity():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"method": "wanda", "pattern": "4:8", "include": ["*mlp*"]})
    spec = PruneSpec(**cfg)
    assert spec.include == ("*mlp*",) and spec.nm == (4, 8) and spec.final_sparsity == 0.5
    with pytest.raises(ValueError, match="in_features divisible by 8"):
        compute_masks(nn.Sequential(nn.Linear(12, 4)), PruneSpec(method="magnitude",
                                                                  pattern="4:8", include=["*"]))

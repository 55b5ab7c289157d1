"""Every shipped config and recipe composes, its specs instantiate and validate, and every recipe
plans (layers, groups, masks) on the model its header names."""
import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from qat.lightning.trainer import trainer_precision
from qat.train.specs import ConfigError, build_specs
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"
TINY_CORPUS = CONF.parents[1] / "qat" / "models" / "tiny_corpus.txt"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("model", "data", "trainer", "logger", "quant", "distill")}


def test_a_required_value_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        build_specs(compose_train(["data=local", "data.path=???"]))


def test_the_required_recipes_exist():
    assert {"w8", "w4g64", "w4g128", "w3g64", "w2g64"} <= set(RECIPES)
    assert {"w4g64_kd", "w3g64_kd", "w2g64_kd", "w4g128_kd", "w3g128_kd", "w2g128_kd"} <= set(RECIPES)


def header_overrides(recipe: str) -> list[str]:
    """The overrides of the command a recipe's header names first (`# python train.py recipe=...`),
    which says which model it applies to (model=tiny for the 128-wide groups)."""
    line = (CONF / "recipe" / f"{recipe}.yaml").read_text().splitlines()[1]
    words = line.removeprefix("# python train.py").split("(")[0].split()
    assert f"recipe={recipe}" in words, f"{recipe}.yaml: its header does not name its command"
    return words


@functools.lru_cache(maxsize=None)
def applied_model(name: str):
    """The float model a recipe plans on: the tiny one for real, the default one on the meta
    device (its shapes; no weights are read)."""
    from qat.eval.footprint import meta_model, model_config
    from qat.models import ModelSpec, load_model

    if name == "tiny":
        return load_model(ModelSpec(name="tiny"))[0]
    return meta_model(model_config("smollm2-135m"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_distills_exactly_when_named_kd(recipe):
    specs = build_specs(compose_train([f"recipe={recipe}"]))
    assert specs.distill.enabled == recipe.endswith("_kd")
    if specs.distill.enabled:
        assert specs.distill.teacher.is_self


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_plans_on_its_model(recipe):
    from qat.quant import plan

    overrides = header_overrides(recipe)
    specs = build_specs(compose_train(overrides))
    assert (specs.quant.weight is None) == (recipe == "float")
    model_name = "tiny" if "model=tiny" in overrides else "smollm2-135m"
    assert specs.model.name == model_name
    model = applied_model(model_name)
    if specs.quant.weight is None:
        return
    report = plan(model, specs.quant)  # layer selection and group divisibility, or ValueError
    decoder_linears = [n for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert sorted(layer.name for layer in report.layers) == sorted(decoder_linears)
    assert all(layer.spec.bits == specs.quant.weight.bits for layer in report.layers
               if not specs.quant.overrides)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.startswith("prune")])
def test_prune_recipes_plan_their_masks_on_the_tiny_model(recipe):
    from qat.prune import collect_input_norms, compute_masks
    from qat.prune.masks import check_nm

    specs = build_specs(compose_train([*header_overrides(recipe), "model=tiny"]))
    assert specs.prune.enabled and not specs.blockwise.enabled
    model = applied_model("tiny")
    calibration = torch.randint(0, model.config.vocab_size, (4, 32),
                                generator=torch.Generator().manual_seed(0))
    norms = collect_input_norms(model, calibration) if specs.prune.method == "wanda" else None
    masks = compute_masks(model, specs.prune, input_norms=norms)
    weights = dict(model.named_parameters())
    assert masks and all(n.startswith("model.layers.") for n in masks)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(1 - specs.prune.final_sparsity, abs=0.01)
    if specs.prune.nm:
        n, m = specs.prune.nm
        assert all(check_nm(weights[f"{name}.weight"] * mask, n, m) for name, mask in masks.items())


def test_a_users_recipe_joins_through_the_search_path(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - w3g64\nquant:\n  weight:\n    group_size: 32\n")
    specs = build_specs(compose_train(["recipe=mine", f"hydra.searchpath=[file://{tmp_path}]"]))
    assert (specs.quant.weight.bits, specs.quant.weight.group_size) == (3, 32)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_composes(group, option):
    extra = [f"data.path={TINY_CORPUS}"] if (group, option) == ("data", "local") else []
    cfg = compose_train([f"{group}={option}", *extra])
    if group in ("model", "data", "quant", "distill"):
        build_specs(cfg)
    elif group == "trainer":
        if option == "fsdp" and not __import__("torch").cuda.is_available():
            pytest.skip("Lightning's FSDP needs CUDA (tests/test_ddp.py instantiates its strategy)")
        trainer = instantiate(cfg.trainer, precision=trainer_precision(cfg.trainer), logger=False,
                              enable_checkpointing=False)  # as qat.lightning.trainer builds it
        assert trainer.max_steps == cfg.trainer.max_steps
    elif cfg.logger and cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger, save_dir="/tmp/qat-logger-test")
        assert logger is not None


def test_overrides_reach_the_specs():
    cfg = compose_train(["recipe=w4g64", "quant.weight.group_size=32", "optim.lr=1e-4",
                         "quant.weight.symmetric=false"])
    specs = build_specs(cfg)
    assert specs.quant.weight.group_size == 32 and not specs.quant.weight.symmetric
    assert specs.optim.lr == 1e-4


def test_recipe_values_win_over_train_yaml_and_cli_wins_over_recipe():
    assert build_specs(compose_train(["recipe=w3g64"])).quant.weight.bits == 3
    assert build_specs(compose_train(["recipe=w3g64", "quant.weight.bits=5"])).quant.weight.bits == 5


@pytest.mark.parametrize("recipe", ["w4g64_kd", "w3g64_kd", "w2g64_kd"])
def test_the_short_budget_wins_over_the_recipe_and_the_cli_over_it(recipe):
    """run.sh's budget=short is applied after the recipe (whose own budget is the quality one),
    and a value on the command line still wins over it."""
    from omegaconf import OmegaConf

    short = OmegaConf.load(CONF / "budget" / "short.yaml")
    own = compose_train([f"recipe={recipe}"])
    cut = compose_train([f"recipe={recipe}", "budget=short"])
    for key in ("blockwise.samples", "blockwise.epochs", "trainer.max_steps"):
        assert OmegaConf.select(cut, key) == OmegaConf.select(short, key)
    assert own.trainer.max_steps > cut.trainer.max_steps
    assert own.blockwise.samples * own.blockwise.epochs > cut.blockwise.samples * cut.blockwise.epochs
    assert compose_train([f"recipe={recipe}", "budget=short", "trainer.max_steps=3"]
                         ).trainer.max_steps == 3
    assert "budget=short" in (CONF.parents[1] / "run.sh").read_text()


@pytest.mark.parametrize("override,field", [
    ("quant.weight.bits=9", "quant.weight.bits"),
    ("quant.weight.bits=1", "quant.weight.bits"),
    ("quant.weight.granularity=row", "quant.weight.granularity"),
    ("quant.weight.group_size=0", "quant.weight.group_size"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("model.dtype=int8", "model.dtype"),
    ("distill=kd", None),
    ("distill.loss=kl", "distill.loss"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.teacher.dtype=int4", "distill.teacher.dtype"),
    ("data.generated_samples=-1", "data.generated_samples"),
    ("data.generated_share=0", "data.generated_share"),
    ("data.generated_share=1.5", "data.generated_share"),
    ("export.dtype=int8", "export.dtype"),
])
def test_bad_values_name_the_field(override, field):
    if field is None:  # a valid group choice, here so that the ones after it compose
        build_specs(compose_train([override]))
        return
    group = ["distill=kd"] if override.startswith("distill.") else []
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_specs(compose_train([*group, override]))

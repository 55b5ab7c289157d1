"""Every shipped config and recipe composes, and its specs instantiate and validate."""
from pathlib import Path

import pytest
from hydra.utils import instantiate

from qat.lightning.run import ConfigError, build_specs
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY_CORPUS = CONF.parent / "qat" / "models" / "tiny_corpus.txt"
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("model", "data", "trainer", "logger", "quant", "distill")}


def test_a_required_value_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        build_specs(compose_train(["data=local", "data.path=???"]))


def test_the_required_recipes_exist():
    assert {"w8", "w4g64", "w4g128", "w3g64", "w2g64"} <= set(RECIPES)
    assert {"w4g64_kd", "w3g64_kd", "w2g64_kd", "w4g128_kd", "w3g128_kd", "w2g128_kd"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.endswith("_kd")])
def test_kd_recipes_enable_distillation_from_the_float_model(recipe):
    specs = build_specs(compose_train([f"recipe={recipe}"]))
    assert specs.distill.enabled and specs.distill.teacher.is_self
    assert not build_specs(compose_train([f"recipe={recipe.removesuffix('_kd')}"])).distill.enabled \
        if recipe.removesuffix("_kd") in RECIPES else True


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_instantiates(recipe):
    cfg = compose_train([f"recipe={recipe}"])
    specs = build_specs(cfg)
    assert (specs.quant.weight is None) == (recipe == "float")
    assert f"recipe={recipe}" in (CONF.parent / "recipes" / f"{recipe}.yaml").read_text()


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_composes(group, option):
    extra = [f"data.path={TINY_CORPUS}"] if (group, option) == ("data", "local") else []
    cfg = compose_train([f"{group}={option}", *extra])
    if group in ("model", "data", "quant", "distill"):
        build_specs(cfg)
    elif group == "trainer":
        if option == "fsdp" and not __import__("torch").cuda.is_available():
            pytest.skip("Lightning's FSDP needs CUDA (tests/test_ddp.py instantiates its strategy)")
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
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
    ("export.dtype=int8", "export.dtype"),
])
def test_bad_values_name_the_field(override, field):
    if field is None:  # a valid group choice, here so that the ones after it compose
        build_specs(compose_train([override]))
        return
    group = ["distill=kd"] if override.startswith("distill.") else []
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_specs(compose_train([*group, override]))

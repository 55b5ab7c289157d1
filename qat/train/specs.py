"""Every config group of a run as a checked spec: instantiated from its `_target_`, validated in
its `__post_init__`; a bad value raises ConfigError naming the field, before any work."""
from __future__ import annotations

from dataclasses import dataclass

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from qat.blockwise import BlockwiseSpec
from qat.data import DataSpec
from qat.distill import DistillSpec
from qat.eval.spec import EvalSpec
from qat.export.spec import ExportSpec
from qat.lightning.module import OptimSpec
from qat.lightning.spec import CheckpointSpec, GuardSpec, LaunchSpec
from qat.models import ModelSpec
from qat.prune import PruneSpec
from qat.ptq import PTQSpec
from qat.quant import QuantConfig
from qat.train.keys import UnknownKeyError, check_keys


class ConfigError(ValueError):
    """Bad input found before training started; the message names the field."""


@dataclass
class Specs:
    model: ModelSpec
    data: DataSpec
    quant: QuantConfig
    optim: OptimSpec
    distill: DistillSpec
    prune: PruneSpec
    ptq: PTQSpec
    blockwise: BlockwiseSpec
    eval: EvalSpec
    export: ExportSpec
    checkpoint: CheckpointSpec
    guard: GuardSpec
    launch: LaunchSpec


def build_specs(cfg: DictConfig) -> Specs:
    """Instantiate and validate every spec; raise ConfigError naming the bad field."""
    try:
        check_keys(cfg)
    except UnknownKeyError as err:
        raise ConfigError(str(err)) from err
    specs = {}
    for key, kind in Specs.__annotations__.items():
        if cfg.get(key) is None:  # configs written before this group existed
            specs[key] = globals()[kind]()
            continue
        try:
            specs[key] = instantiate(cfg[key])
        except InstantiationException as err:
            raise ConfigError(str(err.__cause__ or err)) from err
        except MissingMandatoryValue as err:
            raise ConfigError(f"{err.full_key} is required (it is ??? in the config): set "
                              f"{err.full_key}=VALUE on the command line") from err
    _check_together(cfg, specs)
    return Specs(**specs)


def _check_together(cfg: DictConfig, specs: dict) -> None:
    """What no single group can check alone."""
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("_target_"):
        try:  # a multi-device strategy's own fields, before any stage runs
            instantiate(strategy)
        except InstantiationException as err:
            raise ConfigError(str(err.__cause__ or err)) from err
    prune = specs["prune"]
    sharded = isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith(
        ".fsdp2")
    if sharded and prune.enabled and (prune.schedule == "gradual" or prune.start_step > 0):
        raise ConfigError(f"prune.schedule={prune.schedule!r} with prune.start_step="
                          f"{prune.start_step} recomputes masks during training, which "
                          "trainer=fsdp2 does not support yet (the weights are sharded): use "
                          "prune.schedule=oneshot or constant from step 0, or trainer=ddp")
    max_steps = cfg.trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be an integer >= 0")
    if specs["blockwise"].enabled:
        if specs["quant"].weight is None:
            raise ConfigError("blockwise.enabled=true needs quant.weight (a recipe that quantizes)")
        if specs["prune"].enabled:
            raise ConfigError(f"blockwise.enabled=true with prune.pattern="
                              f"{specs['prune'].pattern!r} is not supported yet (block training "
                              "would move pruned weights off zero): use blockwise=none with prune")
    if specs["optim"].trainable != "weights" and specs["quant"].weight is None:
        raise ConfigError(f"optim.trainable={specs['optim'].trainable!r} needs quant.weight")

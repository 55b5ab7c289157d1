"""python train.py [recipe=NAME] [key=value ...]: quantization-aware training of a causal LM.

compose (Hydra) -> validate -> load model and data -> prepare (fake quantization) -> fit -> eval ->
checkpoint + metrics.json (+ export). See conf/train.yaml for every knob.
"""
import sys

import hydra
from omegaconf import DictConfig

from qat.lightning.run import ConfigError, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:  # bad input: a clear message, no traceback, nothing written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

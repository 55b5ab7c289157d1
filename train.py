"""python train.py [recipe=NAME] [key=value ...]: quantization-aware training of a causal LM.

compose (Hydra) -> validate -> load model and data -> prepare (fake quantization) -> fit -> eval ->
checkpoint + metrics.json (+ export). See conf/train.yaml for every knob.
"""
import os
import sys

# With 2 cores shared, OpenMP's busy-waiting threads stall each other (5x slower eval under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.lightning.module import DivergenceError  # noqa: E402
from qat.lightning.run import ConfigError, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:  # bad input: a clear message, no traceback, nothing written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:  # NaN/inf loss: the step, and the checkpoint to go back to
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)


def _expand_shorthands(argv: list[str]) -> list[str]:
    """`export=true` reads better than `export.enabled=true`; Hydra cannot take both forms."""
    return [f"export.enabled={a.split('=', 1)[1]}" if a.lstrip("+~").split("=", 1)[0] == "export"
            and "=" in a else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = _expand_shorthands(sys.argv[1:])
    main()

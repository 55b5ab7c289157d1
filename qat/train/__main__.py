"""qat-train [recipe=NAME] [key=value ...]: quantization-aware training of a causal LM.

compose (Hydra) -> validate -> load model and data -> prepare (fake quantization) -> fit -> eval ->
checkpoint + metrics.json (+ export). The configs ship inside the package (qat/conf, recipes in
qat/conf/recipe); `qat-train --cfg job` prints the composed config, `--help` the groups. Your own
configs join through Hydra's search path: hydra.searchpath=[file://DIR] with DIR/recipe/NAME.yaml.
"""
import os
import sys

# With 2 cores shared, OpenMP's busy-waiting threads stall each other (5x slower eval under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qat.lightning.module import DivergenceError  # noqa: E402
from qat.train import ConfigError, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="pkg://qat.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg).get("ppl")  # what a sweeper (hydra/sweeper=optuna) minimises
    except ConfigError as err:  # bad input: a clear message, no traceback, nothing written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:  # NaN/inf loss: the step, and the checkpoint to go back to
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)


def expand_shorthands(argv: list[str]) -> list[str]:
    """`export=true` reads better than `export.enabled=true`; Hydra cannot take both forms."""
    return [f"export.enabled={a.split('=', 1)[1]}" if a.lstrip("+~").split("=", 1)[0] == "export"
            and "=" in a else a for a in argv]


def main() -> None:
    """The console command: Hydra reads sys.argv itself."""
    sys.argv[1:] = expand_shorthands(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()

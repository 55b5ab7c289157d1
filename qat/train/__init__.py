"""The training command (`qat-train` / `python -m qat.train` / `python train.py`, see __main__) and
`train(cfg)`, the whole run as the list of its stages (run.py)."""
from qat.train.run import train
from qat.train.specs import ConfigError

__all__ = ["ConfigError", "train"]

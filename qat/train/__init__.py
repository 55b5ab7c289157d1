"""The training command: `qat-train` / `python -m qat.train` / `python train.py` (see __main__)."""

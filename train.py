"""python train.py [recipe=NAME] [key=value ...]: the same as `qat-train` (qat/train/__main__.py)."""
from qat.train.__main__ import main

if __name__ == "__main__":
    main()

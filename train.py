"""`python train.py ...`: the training command line, `hunyuan_jax/cli/train.py` (installed as
`hunyuan-train`); `python train.py --help` lists its options."""

import sys

from hunyuan_jax.cli.train import entry

if __name__ == "__main__":
    sys.exit(entry())

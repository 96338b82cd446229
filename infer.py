"""`python infer.py ...`: the generation command line, `hunyuan_jax/cli/infer.py` (installed as
`hunyuan-infer`); `python infer.py --help` lists its options."""

import sys

from hunyuan_jax.cli.infer import entry

if __name__ == "__main__":
    sys.exit(entry())

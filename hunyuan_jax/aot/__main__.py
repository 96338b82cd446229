"""`python -m hunyuan_jax.aot ...`: see `hunyuan_jax.aot.cli`."""

import sys

from hunyuan_jax.aot.cli import main

sys.exit(main())

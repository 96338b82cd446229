"""Checkpoint conversion, Hugging Face (PyTorch `.bin` or safetensors, bf16/fp32/FP8) <-> our
orbax/tensorstore layout, streaming one tensor at a time.

| module | owns |
|---|---|
| `plan.py` | scanning + verifying an HF source before any write; the recorded plan; fresh / resume / done / refused for an existing `--out` |
| `hf_to_jax.py` | the streaming, resumable writer (`hf_to_jax`) and the manifest |
| `jax_to_hf.py` | export to sharded safetensors (`jax_to_hf`) from a converted checkpoint, a train.py run directory or a bare orbax params directory |
| `verify.py` | reading a converted checkpoint or a run's checkpoints in full against their checksums (`verify`) |
| `common.py` | dtypes, the fast tree <-> HF transforms, safetensors writing, HF key order, carried tokenizer files, progress bar |
| `merge_lora.py` | folding a LoRA run's adapters into its base |

The command line is `hunyuan_jax/cli/convert.py` (`python -m hunyuan_jax.cli.convert hf-to-jax|jax-to-hf|verify ...`).

The on-disk layout is described in one place, `hunyuan_jax/checkpoints/converted.py`; the HF key
<-> tree table in `hunyuan_jax/checkpoints/hf_mapping.py`; recognising checkpoint directories in
`hunyuan_jax/checkpoints/loading.py`.
"""

from hunyuan_jax.checkpoints.convert.common import safetensors_header, write_safetensors
from hunyuan_jax.checkpoints.convert.hf_to_jax import hf_to_jax
from hunyuan_jax.checkpoints.convert.jax_to_hf import jax_to_hf
from hunyuan_jax.checkpoints.convert.plan import plan_hf_to_jax
from hunyuan_jax.checkpoints.hf_tensors import to_hf, to_slice, transpose2d

__all__ = [
    "hf_to_jax",
    "jax_to_hf",
    "plan_hf_to_jax",
    "safetensors_header",
    "to_hf",
    "to_slice",
    "transpose2d",
    "write_safetensors",
]

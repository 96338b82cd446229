"""The original Hunyuan-Large PyTorch modeling code (`hymodels`, shared/reference/original_code)
with transformers' `generate`, as a decode baseline on the weights of a hunyuan_jax model.

    orig = OriginalGenerator.create(code_dir, model, cfg, workdir)   # or a str: why not
    tokens, prefill_s, decode_s = orig.generate(prompts [B, P] int, new_tokens)

The weights go through the project's exporter: the model's parameters are saved as an orbax
tree and `convert.jax_to_hf` writes the safetensors + config.json that the original code's
`from_pretrained` loads. The code is never copied into the project: its `hymodels` package is imported
from its folder (`_import_original`). It needs `transformers==4.41.2` (the version of the reference outputs; not a
project dependency): when that is not importable, `create` returns the reason (a string) and
the benchmark skips this side with that message.

Timing: one `generate` call (greedy, no EOS, `max_new_tokens` = new_tokens); a stopping
criterion records the time of its first call (after the prefill produced the first token),
so prefill seconds = up to the first token, decode seconds = the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

TRANSFORMERS = "4.41.2"


class OriginalGenerator:
    def __init__(self, hf_model, torch):
        self.model, self.torch = hf_model, torch

    @classmethod
    def create(cls, code_dir, model, cfg, workdir: Path, dtype: str = "float32"):
        """An OriginalGenerator on `model`'s weights, or a one-line reason why not."""
        if code_dir is None:
            return "no --original-code given"
        code_dir = Path(code_dir)
        if not (code_dir / "hymodels" / "modeling_hunyuan.py").is_file():
            return f"{code_dir} has no hymodels/modeling_hunyuan.py"
        try:
            import torch
            import transformers
        except ImportError as e:
            return f"transformers=={TRANSFORMERS} is not installed ({e})"
        if transformers.__version__ != TRANSFORMERS:
            return (
                f"transformers {transformers.__version__} is installed; the original code "
                f"needs {TRANSFORMERS}"
            )
        HunYuanForCausalLM = _import_original(code_dir).HunYuanForCausalLM

        hf_dir = export_hf(model, cfg, Path(workdir), dtype)
        hf = HunYuanForCausalLM.from_pretrained(hf_dir, torch_dtype=getattr(torch, dtype))
        hf.eval()
        return cls(hf, torch)

    def generate(self, prompts: np.ndarray, new_tokens: int):
        """Greedy; prompts [B, P] of equal length -> (new tokens [B, N], prefill s, decode s)."""
        torch = self.torch
        ids = torch.from_numpy(np.asarray(prompts, np.int64))
        marks = []

        def first_token(input_ids, scores, **kwargs):
            if not marks:
                marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        from transformers import StoppingCriteriaList

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([first_token]),
            )
            t2 = time.perf_counter()
        return out[:, ids.shape[1] :].numpy(), marks[0] - t0, t2 - marks[0]


def export_hf(model, cfg, workdir: Path, dtype: str) -> Path:
    """`model`'s parameters -> orbax tree -> convert.jax_to_hf -> workdir/hf (safetensors)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from hunyuan_jax.checkpoints import convert

    workdir.mkdir(parents=True, exist_ok=True)
    tree = workdir / "orbax"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(
        tree, args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)), force=True
    )
    cfg_file = workdir / "config.json"
    cfg_file.write_text(json.dumps(cfg.to_hf(), indent=1))
    out = workdir / "hf"
    convert.jax_to_hf(
        tree, out, dtype, config=cfg_file, overwrite=True, progress=False, log=lambda *_: None
    )
    return out


def _import_original(code_dir: Path):
    """The original code's `hymodels.modeling_hunyuan`, imported from `code_dir` as the package
    `hymodels` (its modules import each other relatively), without adding to sys.path."""
    pkg = code_dir / "hymodels"
    spec = importlib.util.spec_from_file_location(
        "hymodels", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["hymodels"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("hymodels.modeling_hunyuan")

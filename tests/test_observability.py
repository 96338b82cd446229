"""train.py's observability outputs, through its command line on the tiny config: the per-step
scalars as TensorBoard event files beside metrics.jsonl (read back record by record), a
jax.profiler trace of `--profile-steps A:B`, and the one-line usage errors (exit 2) for bad
`--profile-steps` values; and the benchmark harness (bench/harness.py): sides alternate round
by round, median / spread, and the busy-machine warning.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_jax.cli import train as train_cli
from hunyuan_jax.train.metrics import read_scalars
from tests.helpers.process import converter_env

REPO = Path(__file__).resolve().parent.parent

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 4


def _args(run_dir, *extra):
    sets = [
        "mesh=data=1,fsdp=1,expert=1,tensor=1",
        "rules=fsdp",
        f"steps={STEPS}",
        "batch_size=2",
        "seq_len=32",
        "micro_batches=1",
        "warmup_steps=1",
        "save_every=100",
        "log_every=2",
        "corpus_max_bytes=100000",
        "tokenizer_train_bytes=100000",
    ]
    out = ["--config", str(TINY), "--run-dir", str(run_dir)]
    for s in sets:
        out += ["--set", s]
    return out + list(extra)


def test_tensorboard_scalars_and_profile_trace(tmp_path):
    """In a process of its own (CPU JAX only): jax.profiler crashes in a process that has
    loaded libtpu's client, as the AOT tests do in this one."""
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *_args(run, "--profile-steps", "2:3")],
        env=converter_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))

    scalars = read_scalars(run / "tensorboard")
    # float32 event values: exact up to float32 rounding of the JSON's float64.
    loss = scalars["train/loss"]
    assert [s for s, _ in loss] == [r["step"] for r in records]
    for (_, got), r in zip(loss, records):
        assert got == pytest.approx(r["loss"], rel=2**-23)
    assert [s for s, _ in scalars["train/tokens_per_s"]] == [2, 4]  # log_every=2
    assert {"train/ce_loss", "train/grad_norm", "train/lr", "train/expert_load_max"} <= set(scalars)

    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


@pytest.mark.parametrize("value", ["3", "a:b", "0:2", "3:2", "1:2:3"])
def test_bad_profile_steps_is_a_usage_error(tmp_path, capsys, value):
    assert train_cli.main(_args(tmp_path / "run", "--profile-steps", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--profile-steps" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bench_harness_alternates_and_flags_spread():
    from bench import harness

    order = []
    times = iter([1.0, 2.0, 1.1, 2.0, 1.5, 2.0])  # side a: spread (1.5-1)/1.1 = 45%; b: 0
    res = harness.alternate(
        {
            "a": lambda: order.append("a") or {"t": next(times)},
            "b": lambda: (order.append("b"), {"t": next(times)})[1],
        },
        rounds=3,
        peak=False,
    )
    assert order == ["a", "b"] * 3  # one call of each side per round, in turn
    a, b = res["a"]["t"], res["b"]["t"]
    assert a.samples == (1.0, 1.1, 1.5) and a.median == 1.1
    assert a.spread == pytest.approx(0.5 / 1.1) and b.spread == 0.0
    (line,) = harness.busy_warnings(res)
    assert "a t 45%" in line and "b t" not in line
    assert harness.busy_warnings({"b": res["b"]}) == []

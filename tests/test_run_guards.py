"""What guards a training run against a second process and against bad configuration values:

- the run-directory lock (hunyuan_jax/train/run_lock.py): a real train.py started on a run directory
  whose lock a live process holds exits 4 with one line naming the holder, and leaves every
  file and directory in the run as it was (the holder's unfinished checkpoint included); a
  lock left by a SIGKILLed holder is taken over with a warning; one written by another host
  is refused, naming it; in a multi-host job every process exits 4 when process 0 (the one
  that takes the lock) cannot;
- config values (hunyuan_jax/model/config.py, train/config.py, model/policy.py): NaN / infinity in any
  section (model, runtime, train, train.dpo, train.lora, a checkpoint's config.json), a YAML
  key given twice at any level, a missing or unknown key, a section that is not a mapping,
  values out of their range: ConfigError (exit 2) naming the file / key / line, never a
  traceback; a `--set` key given twice is said in a warning line.

Three train.py subprocesses (one alone, two as a multi-host job: ~5-10 s each, they stop at
the lock); the rest in-process.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hunyuan_jax.cli import train as train_cli
from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.train.config import check_repeated_overrides, load_configs
from hunyuan_jax.train.run_lock import LOCK_FILE, RunDirLocked, RunLock

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
HF_CONFIG = REPO / "hunyuan_jax" / "assets" / "hy_tiny" / "hf_st" / "config.json"

# Holds a run directory's lock (the same module train.py uses) until its stdin closes.
HOLDER = """
import sys
from hunyuan_jax.train.run_lock import RunLock

lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def _hold(run: Path) -> subprocess.Popen:
    """A live process holding `run`'s lock (returns once it holds it)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()  # bounded: the holder prints it or exits (EOF)
    assert line.strip() == "locked", (line, p.wait(timeout=30))
    return p


def _snapshot(root: Path) -> dict:
    """Every path under `root` with its kind, size and modification time (ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- the run lock
def test_second_train_py_on_a_locked_run_dir_exits_4_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    # What a first run leaves while it saves: an unfinished orbax step, metrics so far.
    unfinished = run / "checkpoints" / "20.orbax-checkpoint-tmp-1712345678" / "params"
    unfinished.mkdir(parents=True)
    (unfinished / "_METADATA").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.9}\n')
    holder = _hold(run)
    try:
        before = _snapshot(run)
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--run-dir",
             str(run), "--set", "steps=2", "--set", "mesh=data=1,fsdp=1,expert=1,tensor=1"],
            env=dict(os.environ, JAX_PLATFORMS="cpu", HUNYUAN_JAX_NO_REEXEC="1"),
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
        took = time.monotonic() - t0
        after = _snapshot(run)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 4, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    host = socket.gethostname()
    assert lines[0].startswith(f"train.py: error: run directory {run} is in use by pid "), lines
    assert f"pid {holder.pid} on host {host!r}" in lines[0] and LOCK_FILE in lines[0], lines
    assert after == before  # the unfinished checkpoint, the metrics: nothing touched
    assert holder.returncode == 0 and not (run / LOCK_FILE).exists()  # released at exit
    print(f"second train.py refused in {took:.1f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_host_train_py_all_processes_exit_4_on_a_locked_run_dir(tmp_path):
    """Two train.py processes of one multi-host job (2 x 4 CPU devices, gloo): process 0
    alone takes the lock; when it cannot, both exit 4 (process 1 is told, not left waiting
    in a collective for a process 0 that is gone)."""
    run = tmp_path / "run"
    holder = _hold(run)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "HUNYUAN_"))}
    procs = []
    try:
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(REPO / "train.py"), "--config", str(TINY),
                     "--run-dir", str(run), "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", str(i)],
                    env=dict(env, JAX_PLATFORMS="cpu", HUNYUAN_JAX_NO_REEXEC="1",
                             XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
            )  # fmt: skip
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.stdin.close()
        holder.wait(timeout=30)
    lines = [[line for line in e.splitlines() if line.strip()] for e in errs]
    assert [p.returncode for p in procs] == [4, 4], errs
    assert f"is in use by pid {holder.pid} " in lines[0][-1], lines[0]
    assert (
        lines[1][-1]
        == f"train.py: error: process 0 could not lock run directory {run} (see its log)"
    )
    assert sorted(os.listdir(run)) == []  # the holder released it; nothing else was written


def test_stale_lock_taken_over_and_another_hosts_refused(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    with pytest.raises(RunDirLocked, match=f"in use by pid {holder.pid} "):
        RunLock(run).acquire()  # a live holder (flock) refuses this process too
    holder.send_signal(signal.SIGKILL)  # dies holding it: the file stays, the flock goes
    holder.wait(timeout=30)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    said = []
    lock = RunLock(run).acquire(log=said.append)
    assert len(said) == 1 and "stale lock" in said[0] and f"pid {holder.pid} " in said[0], said
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()
    # Written by a process on another host: this host cannot tell whether it still runs.
    other = {"host": "tpu-vm-7", "pid": 4242, "pid_start": 1, "started": "2026-01-02T03:04:05Z"}
    (run / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunDirLocked, match="pid 4242 on host 'tpu-vm-7'.*delete ") as e:
        RunLock(run).acquire()
    assert e.value.exit_code == 4
    assert json.loads((run / LOCK_FILE).read_text()) == other  # left as it was


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override,key",
    [
        ("lr=nan", "'lr'"),
        ("grad_clip=.inf", "'grad_clip'"),
        ("peak_flops_per_device=-.inf", "'peak_flops_per_device'"),
        ("model.rope_theta=.nan", "'rope_theta'"),
        ("model.rms_norm_eps=inf", "'rms_norm_eps'"),
        ("runtime.capacity_factor=.inf", "'capacity_factor'"),
        ("runtime.hidden_dropout=.nan", "'hidden_dropout'"),
        ("dpo.beta=nan", "'dpo.beta'"),
        ("lora={rank: 4, alpha: .nan}", "'lora.alpha'"),
    ],
)
def test_nonfinite_values_refused_in_every_section(override, key):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number") as e:
        load_configs(TINY, [override])
    assert e.value.exit_code == 2


def test_train_cli_lr_nan_is_exit_2_naming_the_key(tmp_path, capsys):
    rc = train_cli.main(
        ["--config", str(TINY), "--run-dir", str(tmp_path / "r"), "--set", "lr=nan"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"train.py: error: {TINY}: train key 'lr' must be a finite number, got nan"
    ], err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


def _hf_config(tmp_path, **changes) -> Path:
    d = tmp_path / f"hf_{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    cfg = json.loads(HF_CONFIG.read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity as such
    return d


def test_checkpoint_config_json_values_checked(tmp_path):
    """A checkpoint's config.json: NaN / Infinity, a fractional count, a bool written as a
    string are ConfigErrors naming the file and key (Infinity was an OverflowError, 2.5
    layers became 2, "false" became True)."""
    assert ModelConfig.from_hf(_hf_config(tmp_path)).num_layers > 0  # control
    for changes, why in [
        ({"rope_theta": float("nan")}, "'rope_theta' must be a finite number"),
        ({"vocab_size": float("inf")}, "'vocab_size' must be an integer"),
        ({"num_hidden_layers": 2.5}, "'num_hidden_layers' must be an integer"),
        ({"rms_norm_eps": float("-inf")}, "'rms_norm_eps' must be a finite number"),
        ({"rope_scaling": {"type": "dynamic", "alpha": float("nan"), "factor": 1.0}}, "alpha"),
        ({"use_qk_norm": "false"}, "'use_qk_norm' must be true or false"),
        ({"moe_topk": [1, 2]}, "per-layer moe_topk"),
        ({"initializer_range": -0.02}, "'initializer_range' must be >= 0"),
    ]:
        d = _hf_config(tmp_path, **changes)
        with pytest.raises(ConfigError, match=why) as e:
            ModelConfig.from_hf(d)
        assert str(d / "config.json") in str(e.value), e.value


def _yaml(tmp_path, text: str) -> Path:
    f = tmp_path / "cfg.yaml"
    f.write_text(text)
    return f


MODEL = """model:
  vocab_size: 64
  hidden_size: 32
  intermediate_size: 32
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  num_experts: 2
"""


def test_yaml_duplicate_keys_named_with_file_and_line(tmp_path):
    load_configs(_yaml(tmp_path, MODEL + "train:\n  lr: 3.0e-3\n"))  # control
    cases = [
        (MODEL + "train:\n  lr: 3.0e-3\n  steps: 3\n  lr: 3.0e+3\n", 12, "'lr' (first on line 10)"),
        (MODEL + "train:\n  lr: 1.0e-3\n" + MODEL, 11, "'model' (first on line 1)"),
        (MODEL + "train:\n  lora:\n    rank: 4\n    rank: 8\n", 12, "'rank' (first on line 11)"),
        (
            MODEL.replace("  num_experts: 2\n", "  num_experts: 2\n  num_heads: 8\n"),
            9,
            "'num_heads'",
        ),
    ]
    for text, line, key in cases:
        f = _yaml(tmp_path, text)
        with pytest.raises(ConfigError, match=re.escape(f"duplicate key {key}")) as e:
            load_configs(f)
        assert str(e.value).startswith(f"{f}:{line}: "), e.value
    with pytest.raises(ConfigError, match=r"--set 'lora=\{rank: 4, rank: 8\}'.*duplicate key"):
        load_configs(TINY, ["lora={rank: 4, rank: 8}"])
    # Merge keys still override what they merge (not a duplicate).
    f = _yaml(tmp_path, MODEL + "train:\n  <<: {lr: 1.0e-3, steps: 3}\n  lr: 2.0e-3\n")
    _, _, tcfg = load_configs(f)
    assert (tcfg.lr, tcfg.steps) == (2e-3, 3)


def test_missing_unknown_and_malformed_sections_are_exit_2(tmp_path):
    cases = [
        (MODEL.replace("  hidden_size: 32\n", ""), r"missing required config key\(s\) \['hidden_size'\]"),
        (MODEL.replace("  num_heads: 4\n", "  num_heads: 4\n  n_heads: 4\n"), r"unknown config key\(s\) \['n_heads'\]"),
        ("model:\n", r"missing required config key\(s\) \['vocab_size', 'hidden_size'"),
        (MODEL + "runtime: [float32]\n", "the 'runtime:' section must be a mapping"),
        (MODEL + "train: 3\n", "the 'train:' section must be a mapping"),
        (MODEL + "train:\n  lora: {targets: 5}\n", "bad lora value"),
        (MODEL + "train:\n  dpo: {beta: 0.1, gamma: 1}\n", r"unknown train key\(s\) \['dpo.gamma'\]"),
        (MODEL + "runtime:\n  scan_layers: 'false'\n", "'scan_layers' must be"),
    ]  # fmt: skip
    for text, why in cases:
        f = _yaml(tmp_path, text)
        with pytest.raises(ConfigError, match=why) as e:
            load_configs(f)
        assert str(e.value).startswith(str(f)) and e.value.exit_code == 2, e.value


@pytest.mark.parametrize(
    "override,why",
    [
        ("seed=-1", "'seed' must be in"),
        ("b1=1.0", "'b1' must be in"),
        ("b2=-0.1", "'b2' must be in"),
        ("eps=0", "'eps' must be positive"),
        ("aux_loss_coef=-0.01", "'aux_loss_coef' must be >= 0"),
        ("z_loss_coef=-1", "'z_loss_coef' must be >= 0"),
        ("tokenizer_vocab_size=0", "'tokenizer_vocab_size' must be positive"),
        ("model.rms_norm_eps=0", "'rms_norm_eps' must be positive"),
        ("pack=yes please", "'pack' must be"),
        ("lora={alpha: 0}", "'lora.alpha' must be positive"),
    ],
)
def test_values_out_of_range_refused(override, why):
    with pytest.raises(ConfigError, match=why):
        load_configs(TINY, [override])


def test_repeated_set_keys_are_said_and_flag_conflicts_refused():
    said = []
    check_repeated_overrides(["lr=1e-3", "steps=3", "train.lr=1e-3"], log=said.append)
    assert said == []  # the same value twice is no conflict
    check_repeated_overrides(
        ["lr=3e-3", "dpo.beta=0.1", "lr=3e+3", "dpo={beta: 0.5}"], log=said.append
    )
    assert said == [
        "[config] warning: key 'lr' of the train section: '--set lr=3e+3' overrides "
        "'--set lr=3e-3'",
        "[config] warning: key 'dpo.beta' of the train section: '--set dpo={beta: 0.5}' "
        "overrides '--set dpo.beta=0.1'",
    ], said
    with pytest.raises(
        ConfigError, match="'run_dir' .* set twice: '--set run_dir=b' and '--run-dir a'"
    ):
        check_repeated_overrides(["run_dir=b"], run_dir="a")


def test_lock_file_cleaned_between_runs_in_one_process(tmp_path):
    """Taking and releasing the lock twice in one process (what sequential train() calls
    in one interpreter do) works, and a held lock is refused to a second holder."""
    with RunLock(tmp_path / "r") as lock:
        assert (tmp_path / "r" / LOCK_FILE).is_file()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} "):
            RunLock(tmp_path / "r").acquire()
        assert lock.fd is not None
    assert not (tmp_path / "r" / LOCK_FILE).exists()
    with RunLock(tmp_path / "r"):
        pass
    shutil.rmtree(tmp_path / "r")

"""Integrity (issue 11), with the corruption injected into real files by the tests: a flipped
byte inside a zstd and an uncompressed chunk of a converted checkpoint, inside a training
checkpoint's params; a truncated and a deleted array file; a 0-byte tokenizer.model (and a
real SIGKILL while the tokenizer is written); truncated .bin / .safetensors shards and an
unsafe pickle given to infer.py and `train.py --init-from`; a resumed run whose newest
checkpoint is corrupt (falls back) or whose checkpoints all are (exit 4); a run stopped on a
non-finite loss after a loss spike (exit 5, the healthy checkpoint named); a full disk during
a background checkpoint save; chat data with an unknown role and an empty data file (exit 3).
Every CLI case asserts the exit status and that stderr is one line naming the file, array or
tensor.

One tiny run (6 steps, checkpoints 2, 4, 6) is trained once for the module and copied where a
test damages it; a persistent compilation cache (shared with the subprocesses) turns the
later compiles of the same step into cache hits. CLIs run in-process (`main(argv)`), except
where the process itself is the point (the one-line stderr of a real process, SIGKILL).
Durations on 2 shared, loaded CPU cores: the module fixture 60-100 s (the one compile), the
SIGKILL test ~20 s, the disk-full test ~17 s, the rest < 10 s each; the file ~3.3 min.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import HY_TINY

from hunyuan_jax.checkpoints import convert, health, integrity, loading, runs
from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.cli import infer
from hunyuan_jax.cli import train as train_cli
from hunyuan_jax.cli.convert import main as convert_main
from hunyuan_jax.data.corpus import PackedLoader, embedded_corpus, texts_for_tokenizer
from hunyuan_jax.data.tokenizer import SentencePieceTokenizer
from hunyuan_jax.errors import CheckpointError
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.loop import train
from tests.helpers.jax_cache import cache_dir, persistent_compilation_cache

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
QUIET = dict(progress=False, log=lambda msg: None)
CONVERT = "python -m hunyuan_jax.cli.convert"
# One configuration for every training run here (one compiled step, cached across runs).
BASE = [
    "mesh=data=1,fsdp=1,expert=1,tensor=1",
    "rules=fsdp",
    "steps=10",
    "batch_size=4",
    "seq_len=32",
    "micro_batches=1",
    "warmup_steps=2",
    "save_every=2",
    "keep_checkpoints=5",
    "log_every=100",
    "corpus_max_bytes=100000",
    "tokenizer_train_bytes=100000",
]
ARRAY = "groups.layers.0.moe.up_proj.value"  # the array the tests damage


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with persistent_compilation_cache():
        yield


def _env(**extra) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir(),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        **extra,
    )


def _train_args(run: Path, *extra) -> list[str]:
    args = ["--config", str(TINY), "--run-dir", str(run)]
    for s in BASE + list(extra):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A train.py run directory: 6 of 10 steps, checkpoints 2, 4, 6 (each with its record)."""
    d = tmp_path_factory.mktemp("integrity") / "run"
    mcfg, policy, tcfg = load_configs(TINY, BASE + [f"run_dir={d}", "stop_at=6"])
    train(mcfg, policy, tcfg, log=lambda *_: None)
    return d


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> Path:
    """A SentencePiece tokenizer that fits hy_tiny's 1024-id vocabulary (for infer.py)."""
    d = tmp_path_factory.mktemp("sp")
    texts = texts_for_tokenizer(embedded_corpus(100_000), "text", 100_000)
    SentencePieceTokenizer.train(texts, d / "tokenizer", 512, hard_vocab_limit=False)
    return d / "tokenizer.model"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sp_tokenizer) -> dict[str, Path]:
    """hy_tiny converted: zstd chunks (from safetensors) and uncompressed ones (from .bin)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for comp, layout in (("zstd", "hf_st"), ("none", "hf_bin")):
        convert.hf_to_jax(
            HY_TINY / layout,
            root / comp,
            compression=comp,
            tokenizer_dir=sp_tokenizer.parent,
            **QUIET,
        )
        out[comp] = root / comp
    return out


# ----------------------------------------------------------------------------- helpers
def _flip(path: Path, offset: int | None = None) -> None:
    """Flip one bit of one byte of a file (by default in its middle)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x04
    path.write_bytes(bytes(data))


def _chunk_file(ckpt: Path, name: str = ARRAY) -> Path:
    """The largest zarr3 shard file of a converted array."""
    files = [f for f in (ckpt / fmt.PARAMS_DIR / name / "c").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


def _data_file(run: Path, step: int, item: str = "params") -> Path:
    """The largest OCDBT data file of a step's item (holds most of its arrays)."""
    d = run / "checkpoints" / str(step) / item / "ocdbt.process_0" / "d"
    return max(d.iterdir(), key=lambda f: f.stat().st_size)


def _one_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    assert "Traceback" not in err and "weights_only" not in err
    return lines[0]


def _convert(capsys, *argv) -> tuple[int, str]:
    code = convert_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _infer(capsys, ckpt, *extra) -> tuple[int, str]:
    argv = ["--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", *extra]
    code = infer.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _train_cli(capsys, run, *extra, init_from=None) -> tuple[int, str]:
    argv = _train_args(run, *extra) + (["--init-from", str(init_from)] if init_from else [])
    code = train_cli.main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- converted
@pytest.mark.parametrize("comp", ["zstd", "none"])
def test_flipped_byte_in_a_converted_chunk(comp, converted, sp_tokenizer, tmp_path, capsys):
    """crc32c on every chunk: a flipped bit inside a zstd or a raw chunk is an error naming
    the array and the file, for verify, loading (infer.py) and export. Control: the same flip
    in a checkpoint written with `--checksum none` loads silently different weights."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted[comp], ckpt)
    code, err = _convert(capsys, "verify", "--ckpt", ckpt)
    assert code == 0 and "crc32c matches" in err, err
    bad = _chunk_file(ckpt)
    _flip(bad)
    code, err = _convert(capsys, "verify", "--ckpt", ckpt)
    line = _one_line(err, CONVERT)
    assert code == 4 and ARRAY in line and str(bad) in line, line
    code, err = _infer(capsys, ckpt, "--tokenizer", sp_tokenizer)
    line = _one_line(err, "infer.py")
    assert code == 4 and ARRAY in line and str(bad) in line, line
    out = tmp_path / "exported"
    code, err = _convert(capsys, "jax-to-hf", "--ckpt", ckpt, "--out", out, "--no-progress")
    line = _one_line(err, CONVERT)
    assert code == 4 and ARRAY in line and str(bad) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temp dir

    # Control: without checksums the same damage reads back as different numbers, no error.
    blind = tmp_path / "blind"
    src = HY_TINY / ("hf_st" if comp == "zstd" else "hf_bin")
    convert.hf_to_jax(src, blind, compression=comp, checksum="none", **QUIET)
    before = fmt.open_for_read(blind / "params", ARRAY, False, True).read().result()
    _flip(_chunk_file(blind), offset=_chunk_file(blind).stat().st_size // 3)
    after = fmt.open_for_read(blind / "params", ARRAY, False, True).read().result()
    assert not np.array_equal(before, after)
    code, err = _convert(capsys, "verify", "--ckpt", blind)
    assert code == 0 and "without checksums" in err


def test_truncated_and_missing_converted_chunk_files(converted, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted["zstd"], ckpt)
    shard = _chunk_file(ckpt)
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=ARRAY):
        loading.load_params(loading.open_checkpoint(ckpt), RuntimePolicy.inference("float32"))
    code, err = _convert(capsys, "verify", "--ckpt", ckpt)
    assert code == 4 and ARRAY in _one_line(err, CONVERT) and str(shard) in err
    shard.unlink()  # a missing chunk file is an error, not zeros
    code, err = _convert(capsys, "verify", "--ckpt", ckpt)
    assert code == 4 and ARRAY in _one_line(err, CONVERT)
    with pytest.raises(CheckpointError, match=ARRAY):
        loading.load_params(loading.open_checkpoint(ckpt), RuntimePolicy.inference("float32"))
    shutil.rmtree(ckpt / "params" / ARRAY)  # the whole array
    code, err = _convert(capsys, "verify", "--ckpt", ckpt)
    assert code == 4 and f"array {ARRAY} is missing" in _one_line(err, CONVERT)


# ----------------------------------------------------------------------------- run checkpoints
def test_run_records_digests_and_health(run):
    record = runs.read_record(run / "checkpoints" / "6")
    params = record["params"]
    assert ARRAY in params and params[ARRAY]["dtype"] == "float32"
    assert len(record["opt_state"]) > len(params)  # Adam's moments and the count
    h = record["health"]  # 4 reference steps (< 5) and 2 in the window: finiteness only
    assert h["healthy"] and h["window"] == [5, 6] and h["reason"].startswith("finite"), h
    # The numpy digest of what is on disk equals the on-device digest recorded at save time.
    arr = fmt.open_for_read(run / "checkpoints" / "6" / "params", ARRAY, True, False)
    assert integrity.np_digest(arr.read().result()) == params[ARRAY]["digest"]
    assert (run / "tokenizer" / runs.TOKENIZER_SUMS).is_file()


def test_flipped_byte_in_run_params(run_copy, tmp_path, capsys):
    """Silent before (the flipped value decoded fine): now verify, loading and export name the
    array; `verify` of the whole run lists the steps that still verify."""
    bad = _data_file(run_copy, 6)
    _flip(bad)
    step_dir = run_copy / "checkpoints" / "6" / "params"
    code, err = _convert(capsys, "verify", "--ckpt", run_copy, "--step", 6)
    line = _one_line(err, CONVERT)
    assert code == 4 and "is corrupt (checksum" in line and str(step_dir) in line, line
    code, err = _convert(capsys, "verify", "--ckpt", run_copy)  # progress lines, then one error
    ok = [x for x in err.splitlines() if x.startswith("[convert] step ")]
    assert [x.split(" (")[0] for x in ok] == ["[convert] step 4: ok", "[convert] step 2: ok"]
    line = _one_line("\n".join(x for x in err.splitlines() if x not in ok), CONVERT)
    assert code == 4 and "steps that fail: 6; steps that verify: 2, 4" in line, line
    assert _convert(capsys, "verify", "--ckpt", run_copy, "--step", 4)[0] == 0
    code, err = _infer(capsys, run_copy)
    assert code == 4 and "is corrupt (checksum" in _one_line(err, "infer.py")
    out = tmp_path / "exported"
    code, err = _convert(capsys, "jax-to-hf", "--ckpt", run_copy, "--out", out, "--no-progress")
    assert code == 4 and "is corrupt (checksum" in _one_line(err, CONVERT)
    assert not out.exists() and not list(tmp_path.glob(".exported*"))
    code, err = _convert(
        capsys, "jax-to-hf", "--ckpt", run_copy, "--out", out, "--step", 4, "--no-progress"
    )
    assert code == 0 and (out / "model.safetensors.index.json").is_file(), err


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_run_array_file_real_process(damage, run_copy):
    """infer.py as a real process (orbax's async machinery used to end in a 200-line
    traceback, "Event loop is closed"): one line, exit 4, naming the array."""
    f = _data_file(run_copy, 6)
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    else:
        f.unlink()
    p = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), "--checkpoint", str(run_copy), "--prompt", "hi"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_line(p.stderr, "infer.py")
    assert p.returncode == 4 and "cannot read array" in line and "checkpoints/6/params" in line


def test_resume_falls_back_to_newest_checkpoint_that_verifies(run, run_copy):
    _flip(_data_file(run_copy, 6))
    logs = []
    mcfg, policy, tcfg = load_configs(TINY, BASE + [f"run_dir={run_copy}", "stop_at=8"])
    summary = train(mcfg, policy, tcfg, log=logs.append)
    said = [m for m in logs if "fails verification" in m]
    assert len(said) == 1 and "checkpoint 6" in said[0] and "resuming from step 4" in said[0]
    assert summary["start_step"] == 4 and (run_copy / "checkpoints" / "corrupt-6").is_dir()
    assert runs.complete_steps(run_copy) == [2, 4, 6, 8]
    # Steps 5 and 6 retrained from step 4 reproduce the original run exactly.
    lines = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    want = {m["step"]: m["loss"] for m in lines(run)}
    got = {m["step"]: m["loss"] for m in lines(run_copy)}
    assert [got[s] for s in (5, 6)] == [want[s] for s in (5, 6)]


def test_resume_when_no_checkpoint_verifies(run_copy, capsys):
    for step in (2, 4, 6):
        _flip(_data_file(run_copy, step))
    code, err = _train_cli(capsys, run_copy)
    line = _one_line(err, "train.py")
    assert code == 4 and "no checkpoint of" in line and "verifies" in line
    assert f"delete {run_copy / 'checkpoints'}" in line
    assert runs.complete_steps(run_copy) == [2, 4, 6]  # nothing moved or deleted


# ----------------------------------------------------------------------------- HF shards
def _unsafe_bin(src: Path, dst: Path) -> Path:
    """hy_tiny's .bin checkpoint whose first shard's pickle calls os.system when loaded."""
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("pytorch_model-*.bin"))[0]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with zipfile.ZipFile(shard) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"model.embed_tokens.weight": Evil()}, protocol=2)
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_STORED) as z:
        for n, b in entries.items():
            z.writestr(n, b)
    return shard


def _truncated(src: Path, dst: Path, pattern: str) -> Path:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob(pattern))[-1]
    os.truncate(shard, shard.stat().st_size * 2 // 3)
    return shard


def test_bad_hf_shards_given_to_infer_and_init_from(tmp_path, sp_tokenizer, capsys):
    cases = {
        "unsafe": _unsafe_bin(HY_TINY / "hf_bin", tmp_path / "unsafe"),
        "bin": _truncated(HY_TINY / "hf_bin", tmp_path / "bin", "*.bin"),
        "st": _truncated(HY_TINY / "hf_st", tmp_path / "st", "*.safetensors"),
    }
    for name, shard in cases.items():
        code, err = _infer(capsys, shard.parent, "--tokenizer", sp_tokenizer)
        line = _one_line(err, "infer.py")
        assert code == 4 and str(shard) in line, (name, line)
        code, err = _train_cli(
            capsys, tmp_path / f"run_{name}", f"tokenizer={sp_tokenizer}", init_from=shard.parent
        )
        line = _one_line(err, "train.py")
        assert code == 4 and str(shard) in line, (name, line)
    # The unsafe pickle in a real process: refused, nothing from torch, nothing executed.
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "infer.py"),
            "--checkpoint",
            str(tmp_path / "unsafe"),
            "--prompt",
            "hi",
            "--tokenizer",
            str(sp_tokenizer),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_line(p.stderr, "infer.py")
    assert p.returncode == 4 and "unsupported object posix.system" in line, line


# ----------------------------------------------------------------------------- tokenizer
def test_zero_byte_tokenizer(run_copy, tmp_path, capsys):
    """With checkpoints trained on it: refused, naming the file and what to delete (train.py
    and infer.py). Without: removed, to be written again."""
    (run_copy / "tokenizer" / "tokenizer.model").write_bytes(b"")
    code, err = _train_cli(capsys, run_copy)
    line = _one_line(err, "train.py")
    assert code == 4 and "tokenizer.model is corrupt (0 bytes" in line
    assert f"delete {run_copy} to start over" in line
    code, err = _infer(capsys, run_copy)
    assert code == 4 and "tokenizer.model is corrupt" in _one_line(err, "infer.py")

    from hunyuan_jax.train.data import run_tokenizer

    fresh = tmp_path / "fresh"
    (fresh / "tokenizer").mkdir(parents=True)
    (fresh / "tokenizer" / "tokenizer.model").write_bytes(b"")  # what a kill used to leave
    logs = []
    assert run_tokenizer(fresh, logs.append) is None and not (fresh / "tokenizer").exists()
    assert "writing it again" in logs[0]


def test_sigkill_while_the_tokenizer_is_written_then_rerun(tmp_path):
    """A real SIGKILL of train.py while SentencePiece writes <run>/tokenizer/; the rerun
    writes the tokenizer again and trains."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *_train_args(run, "stop_at=2")]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tok = run / "tokenizer"
    deadline = time.monotonic() + 240
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if tok.is_dir() and any(x.name.startswith(".tokenizer.") for x in tok.iterdir()):
                break
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    assert not (tok / runs.TOKENIZER_SUMS).exists()  # killed before it was complete
    q = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert q.returncode == 0, q.stderr[-3000:]
    assert runs.tokenizer_problem(tok) is None
    assert runs.complete_steps(run) == [2]


def _record_raised_in(filename: str, message: str):
    """An asyncio ERROR record carrying an exception raised in code from `filename`."""
    import logging

    try:
        exec(compile("raise ValueError('Failed to write: File too large')", filename, "exec"))
    except ValueError as e:
        exc = e
    return logging.LogRecord(
        "asyncio",
        logging.ERROR,
        "/usr/lib/python3.11/asyncio/base_events.py",
        1,
        message,
        None,
        (type(exc), exc, exc.__traceback__),
    )


def test_orbax_background_failures_are_not_logged():
    """The CLI's log filter drops asyncio's reports of orbax's abandoned writes, whether the
    message names orbax (a Task's coroutine) or only its exception's traceback does (a
    `_GatheringFuture`: which of the two asyncio reports before exit depends on timing; a
    fresh-clone CI run once printed the second as a traceback after the one-line error), and
    keeps every other error."""
    import logging

    from hunyuan_jax import errors

    errors._quiet_orbax_error_logs()
    keep = next(f for f in logging.getLogger("asyncio").filters if hasattr(f, "quiet_orbax"))
    orbax_file = "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
    gathering = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>"
    assert not keep(_record_raised_in(orbax_file, gathering))
    task = "Task exception was never retrieved\ntask: <Task coro=<write() at /x/orbax/a.py:1>>"
    assert not keep(_record_raised_in("/elsewhere/app.py", task))
    assert keep(_record_raised_in("/elsewhere/app.py", gathering))  # not orbax's: kept


def test_abandoned_future_after_the_error_line_is_not_printed(tmp_path):
    """An expected error ends a CLI with one line even when an asyncio future that failed is
    only collected at exit (asyncio's "Future exception was never retrieved", whose message
    and traceback name nothing but the future: what a failed orbax read leaves behind)."""
    script = tmp_path / "cli.py"
    script.write_text(
        "import asyncio, sys\n"
        "from hunyuan_jax.errors import CheckpointError, run_cli\n"
        "loop = asyncio.new_event_loop()\n"
        "def main():\n"
        "    global fut\n"
        "    fut = loop.create_future()\n"
        "    fut.set_exception(ValueError('FAILED_PRECONDITION: Error reading x'))\n"
        "    raise CheckpointError('cannot read array x')\n"
        "sys.exit(run_cli('cli.py', main))\n"
    )
    p = subprocess.run(
        [sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 4
    assert _one_line(p.stderr, "cli.py") == "cli.py: error: cannot read array x"


def test_disk_full_during_a_checkpoint_save(tmp_path):
    """A real process whose files may not grow past 3 MB (RLIMIT_FSIZE: writes fail with
    EFBIG, as on a full disk) while orbax saves step 2 in the background: one line, exit 4,
    and no complete-looking step is left behind."""
    # The limit is set by a small launcher that then execs train.py (not by `preexec_fn`, whose
    # fork in this JAX-threaded process draws JAX's os.fork() warning); an ignored signal and
    # the rlimit both survive exec.
    limit = (
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", limit, str(REPO / "train.py"), *_train_args(run, "stop_at=2")]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    line = _one_line(p.stderr, "train.py")
    assert p.returncode == 4 and f"saving checkpoint 2 into {run / 'checkpoints'} failed" in line
    assert "File too large" in line and "rerun to resume" in line
    assert runs.complete_steps(run) == []


# ----------------------------------------------------------------------------- data errors
@pytest.mark.parametrize(
    "content, expect",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "Assistant", "content": "hello"}]}\n',
            ":1",
        ),
        ("", "empty data file"),
    ],
)
def test_bad_training_data_exits_3(content, expect, tmp_path):
    """As a real process: one line naming file (and line), exit 3, nothing trained."""
    data = tmp_path / "chat.jsonl"
    data.write_text(content)
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *_train_args(tmp_path / "run", f"data={data}", "data_format=chat"),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    line = _one_line(p.stderr, "train.py")
    assert p.returncode == 3 and str(data) in line and expect in line, line


# ----------------------------------------------------------------------------- health
def test_health_definition():
    h = health.History(keep=10)
    for s in range(1, 21):
        h.add(s, 3.0 - 0.01 * s, 1.0, True)
    assert h.assess(20, 10)["healthy"]
    h.add(21, 2.8, 1.0, True)
    h.add(22, 5.0, 1.0, True)  # > 1.5 x median loss
    bad = h.assess(22, 20)
    assert not bad["healthy"] and "loss 5 at step 22 > 1.5 x median" in bad["reason"]
    g = health.History(keep=10)
    for s in range(1, 11):
        g.add(s, 3.0, 1.0 + 0.1 * (s % 2), True)
    g.add(11, 3.0, 6.0, True)  # > 5 x median grad norm (1.05)
    assert "grad norm 6 at step 11" in g.assess(11, 10)["reason"]
    g.add(12, float("nan"), float("nan"), False)  # skipped: counted, not judged
    g.add(13, 3.0, 1.0, True)
    ok = g.assess(13, 11)
    assert ok["healthy"] and ok["skipped_steps"] == 1
    first = health.History(keep=10)
    first.add(1, 7.0, 3.0, True)
    assert first.assess(1, 0)["reason"].startswith("finite (too few steps")


def test_nonfinite_stop_names_the_newest_healthy_checkpoint(run, run_copy, capsys, monkeypatch):
    """A finite loss spike after step 6 (its weights' final norm scaled by 30, re-saved with
    valid checksums), then a NaN batch at step 9: exit 5, one line naming the last finite
    step, checkpoint 8 unhealthy (the spike), 6 as the newest healthy one, and the commands.
    The report judges the steps before each checkpoint: the bad update saved in 6 itself only
    shows after it, which is why the message also names the one before."""
    from hunyuan_jax.train.step import TrainStep
    from sharding.plan import ShardingPlan

    mcfg, policy, tcfg = load_configs(TINY, BASE + [f"run_dir={run_copy}"])
    target = TrainStep(mcfg, policy, tcfg, ShardingPlan.create(tcfg.mesh, tcfg.rules))
    target = target.restore_target()
    ck = runs.Checkpointer(run_copy, async_save=False)
    params, opt_state, data = ck.restore(6, target.params, target.opt_state)
    old_health = ck.record(6)["health"]
    ck.close()
    shutil.rmtree(run_copy / "checkpoints" / "6")
    weight = params["final_norm"]["weight"]
    weight.set_value(weight.get_value() * 30.0)
    ck = runs.Checkpointer(run_copy, async_save=False)
    ck.save(6, params, opt_state, data, old_health)
    ck.close()

    original = PackedLoader.__next__
    calls = {"n": 0}

    def poisoned(self):
        batch = original(self)
        calls["n"] += 1
        if calls["n"] == 3:  # resumed at 6: the third batch is step 9
            batch["loss_mask"][0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(PackedLoader, "__next__", poisoned)
    code, err = _train_cli(capsys, run_copy)
    line = _one_line(err, "train.py")
    assert code == 5, line
    assert "non-finite loss or gradient at step 9" in line and "last finite step: 8" in line
    assert "8 UNHEALTHY (steps 7-8: loss" in line and "6 healthy" in line
    assert "newest healthy checkpoint: step 6" in line
    assert f"rm -r {run_copy / 'checkpoints' / '8'}" in line and "--set lr=" in line
    rec = runs.read_record(run_copy / "checkpoints" / "8")["health"]
    assert not rec["healthy"] and rec["loss_max"] > 1.5 * rec["loss_median"]


def test_resume_a_run_initialised_from_another_architecture(tmp_path, sp_tokenizer, capsys):
    """--init-from takes the checkpoint's architecture (hy_tiny's, not small.yaml's); rerunning
    the same command resumes the run instead of refusing a "changed" model config."""
    run = tmp_path / "from_hy_tiny"
    argv = _train_args(run, f"tokenizer={sp_tokenizer}", "steps=4", "save_every=2")
    argv[1] = str(REPO / "configs" / "small.yaml")
    argv += ["--init-from", str(HY_TINY / "hf_st")]
    assert train_cli.main(argv + ["--set", "stop_at=2"]) == 0, capsys.readouterr().err
    assert train_cli.main(argv) == 0, capsys.readouterr().err
    assert [m["step"] for m in map(json.loads, open(run / "metrics.jsonl"))] == [1, 2, 3, 4]

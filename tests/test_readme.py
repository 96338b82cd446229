"""The README's commands, run as a newcomer runs them: every fenced `bash` command and `python`
snippet of README.md (parsed at run time) is either run, as written, in a scratch directory, or
listed in `TABLE` with the reason it is not. A command that is neither fails the test, so the
README cannot drift from the code unnoticed.

What "as written" allows, and nothing more (`instantiate`, `TABLE`):
- synopsis placeholders (DIR, HF_DIR, ...) are replaced by the paths the README's own earlier
  commands produce (one tiny train.py run feeds infer.py, the server and the converter), and
  `[optional]` groups are dropped or, where named in the table, given one value;
- the server's port 8000 becomes a free port (in the server command and in the curl / openai
  commands that talk to it), so that the test never collides with anything on 8000;
- the environment is a CPU host's: `python` is this venv's, `JAX_PLATFORMS=cpu`, no XLA_FLAGS.

`test_readme_commands_run` (slow: ~3-4 min on 2 cores) runs them; the fast tests check that the
table covers the README exactly and that every number a synopsis shows as an option's value is
that option's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# per command: a bound for hangs, not a speed check (the tiny train runs take ~30 s on 2 idle
# cores; the 32-step GRPO run and the 8-device runs took 289-300 s beside a second test worker
# and three compiles, load average 10)
TIMEOUT_S = 600
SERVER_START_S = 420  # 14+ engine programs compile at start-up; the suite runs 2 workers


# ----------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True)
class Command:
    lang: str  # "bash" or "python"
    text: str  # as in the README (continuation lines joined for bash)
    line: int  # README line where it starts

    @property
    def key(self) -> str:
        """What the table's patterns match: a bash command's words (quotes and comment
        removed) joined by single spaces; a python block's text, whitespace normalised."""
        if self.lang == "bash":
            return " ".join(shlex.split(self.text.replace("\\\n", " "), comments=True))
        return " ".join(self.text.split())


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of the README's ```bash blocks (a command ends where its quotes are closed
    and it does not end with a backslash; comment-only lines are skipped) and every ```python
    block whole."""
    lines = (README.read_text() if text is None else text).splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start, body = m.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang == "python":
            out.append(Command("python", "\n".join(body), start + 1))
        elif lang == "bash":
            out += _bash_commands(body, start + 1)
    return out


def _bash_commands(body: list[str], first_line: int) -> list[Command]:
    out, buf, at = [], "", None
    for n, line in enumerate(body):
        if not buf:
            at = first_line + n
        buf += line + "\n"
        if buf.rstrip().endswith("\\"):
            continue
        try:
            words = shlex.split(buf, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(Command("bash", buf.strip(), at))
        buf = ""
    assert not buf.strip(), f"README line {at}: unterminated command {buf!r}"
    return out


def instantiate(text: str, groups: dict[str, str], words: dict[str, str]) -> str:
    """A synopsis made runnable: each `[...]` group (innermost first) becomes `groups[group]`
    or nothing; then each placeholder word becomes `words[word]`."""
    pattern = re.compile(r"\[[^\[\]]*\]")
    while True:
        m = pattern.search(text)
        if not m:
            break
        text = text[: m.start()] + groups.get(m.group(0), "") + text[m.end() :]
    for word, value in words.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(word)}(?![\w/.-])", value, text)
    return text


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Entry:
    """How the commands whose key matches `pattern` are treated: skipped (`skip`: the
    reason), run as a server (`server`; `default_server`: the one the curl / openai commands
    talk to), or run (a `synopsis` instantiated with `groups`/`words`; `expect`/`refuse`:
    substrings of its output; `needs_server`)."""

    pattern: str
    skip: str | None = None
    synopsis: bool = False  # `[optional]` groups and placeholders to instantiate
    groups: dict = dataclasses.field(default_factory=dict)
    words: dict = dataclasses.field(default_factory=dict)
    server: bool = False
    default_server: bool = False
    needs_server: bool = False
    expect: tuple[str, ...] = ()
    refuse: tuple[str, ...] = ()


RUN = "runs/tiny"  # the one tiny train.py run the synopses' DIR stands for
LORA = "runs/tiny-lora"  # the LoRA block's run
CONVERTED = "out/hy_tiny"  # the conversion synopsis' OUT

TABLE: list[Entry] = [
    Entry(
        r"^bash scripts/setup\.sh && \.venv/bin/python -m (hunyuan_jax\.cli\.smoke|pytest)",
        skip="installs the environment, then runs the smoke run (tests/test_smoke.py runs it "
        "as written) or the whole test suite (CI: .ci/run)",
    ),
    Entry(
        r"^python train\.py --config configs/tiny\.yaml --devices 8 \[",
        synopsis=True,
        groups={
            # 2 steps on a 300 kB corpus (the tokenizer trained on it): the run the synopses'
            # DIR stands for (infer.py, the server, jax-to-hf)
            "[--set key=value ...]": "--set steps=2 --set corpus_max_bytes=300000 "
            "--set tokenizer_train_bytes=300000",
            "[--run-dir DIR]": f"--run-dir {RUN}",
        },
        expect=("[train] done at step 2",),
    ),
    Entry(
        r"^python train\.py .*--init-from hunyuan_jax/assets/hy_tiny/hf_st .*--run-dir runs/tiny-lora",
        expect=("trainable LoRA params", "[train] done at step 6"),
    ),
    Entry(r"^python infer\.py --adapter runs/tiny-lora ", expect=("sampling: ",)),
    Entry(r"^python -m hunyuan_jax\.cli\.serve --adapter runs/tiny-lora", server=True),
    Entry(r"^python -m hunyuan_jax\.cli\.convert merge-lora --run runs/tiny-lora --out "),
    Entry(r"^python -m hunyuan_jax\.cli\.convert jax-to-hf --ckpt runs/tiny-merged "),
    Entry(r"^printf .* > prefs\.jsonl$"),
    Entry(
        r"^python train\.py .*--run-dir runs/tiny-dpo .*--set objective=dpo",
        synopsis=True,
        expect=("| dpo ", "[train] done at step 20"),
        refuse=("ce 0.0000",),  # no cross-entropy term in plain DPO
    ),
    Entry(r"^printf .* > prompts\.jsonl$"),
    Entry(
        r"^python train\.py .*--run-dir runs/tiny-grpo .*--set objective=grpo",
        expect=("| reward ", "[train] done at step 32"),
    ),
    Entry(
        r"^python infer\.py --checkpoint DIR ",
        synopsis=True,
        words={"DIR": RUN},
        expect=("sampling: ",),
        refuse=("SamplingConfig(",),
    ),
    Entry(r"^python -m hunyuan_jax\.cli\.serve$", server=True, default_server=True),
    Entry(
        r"^python -m hunyuan_jax\.cli\.serve --checkpoint DIR ",
        synopsis=True,
        words={"DIR": RUN},
        server=True,
    ),
    Entry(r"^curl .*http://127\.0\.0\.1:8000/", needs_server=True, expect=('"choices"',)),
    Entry(
        r"^python -m hunyuan_jax\.cli\.serve --checkpoint /ckpt/",
        skip="needs the real A52B checkpoint; tests/test_serve.py runs lm_eval against the "
        "tiny server",
    ),
    Entry(r"^lm_eval ", skip="runs against the A52B server of the command before"),
    Entry(
        r"^python -m hunyuan_jax\.cli\.convert hf-to-jax --hf-dir HF_DIR --out OUT ",
        synopsis=True,
        words={"HF_DIR": "hunyuan_jax/assets/hy_tiny/hf_st", "OUT": CONVERTED},
    ),
    Entry(
        r"^python -m hunyuan_jax\.cli\.convert jax-to-hf --ckpt OUT_OR_RUN --out HF_DIR ",
        synopsis=True,
        words={"OUT_OR_RUN": RUN, "HF_DIR": "out/hf_from_run"},
    ),
    Entry(
        r"^python -m hunyuan_jax\.cli\.convert verify --ckpt DIR ",
        synopsis=True,
        words={"DIR": CONVERTED},
    ),
    Entry(
        r"^python -m hunyuan_jax\.cli\.convert merge-lora --run LORA_RUN --out DIR ",
        skip="the LoRA block's merge-lora command runs the same code on the same run",
    ),
    Entry(
        r"^python -m hunyuan_jax\.cli\.aot --config configs/hunyuan_a52b_instruct\.yaml ",
        skip="compiles the A52B for a v5p-256 slice (libtpu, minutes and tens of GB); "
        "tests/test_aot.py compiles the tiny config for v5p-8 with the same tool",
    ),
    Entry(r"ShardingPlan\.create\("),
    Entry(r"^from openai import OpenAI", needs_server=True, expect=("CompletionUsage",)),
]


def entry_for(cmd: Command) -> Entry | None:
    return next((e for e in TABLE if re.search(e.pattern, cmd.key)), None)


# ----------------------------------------------------------------------------- fast checks
def test_every_readme_command_is_run_or_listed():
    """Each command of the README matches one table entry; each entry matches a command."""
    cmds = readme_commands()
    assert len(cmds) > 20, "the README parser found too few commands"
    unlisted = [f"README line {c.line}: {c.key[:100]}" for c in cmds if entry_for(c) is None]
    assert not unlisted, "README commands neither run nor listed in TABLE:\n" + "\n".join(unlisted)
    stale = [e.pattern for e in TABLE if not any(re.search(e.pattern, c.key) for c in cmds)]
    assert not stale, f"TABLE entries that match no README command: {stale}"


def test_parser_splits_continuations_quotes_and_comments():
    text = """```bash
# a comment
python a.py --x 1 \\
    --y 2   # trailing comment
curl -d '{"a": 1,
  "b": 2}'
```
```python
print(1)
```"""
    cmds = readme_commands(text)
    assert [c.lang for c in cmds] == ["bash", "bash", "python"]
    assert cmds[0].key == "python a.py --x 1 --y 2" and cmds[0].line == 3
    assert cmds[1].text.endswith('"b": 2}\'') and cmds[2].text == "print(1)"
    assert instantiate("x DIR [--a N] [--b [--c]] --out DIR/y", {"[--a N]": "--a 3"}, {}) == (
        "x DIR --a 3  --out DIR/y"
    )
    assert instantiate("--ckpt OUT_OR_RUN --out OUT", {}, {"OUT": "o", "OUT_OR_RUN": "r"}) == (
        "--ckpt r --out o"
    )


def _parsers() -> dict[str, object]:
    """The argparse parser behind each CLI prefix of the README."""
    from hunyuan_jax.cli.aot import build_parser as aot_parser
    from hunyuan_jax.cli.convert import build_parser as convert_parser
    from hunyuan_jax.cli.infer import build_parser as infer_parser
    from hunyuan_jax.cli.serve import build_parser as serve_parser

    out = {
        "python infer.py": infer_parser(),
        "python -m hunyuan_jax.cli.serve": serve_parser(),
        "python -m hunyuan_jax.cli.aot": aot_parser(),
    }
    sub = next(a for a in convert_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        out[f"python -m hunyuan_jax.cli.convert {name}"] = parser
    return out


def test_synopsis_numbers_are_the_defaults():
    """A synopsis that shows an option with a number (`[--slots 4]`) shows its default."""
    parsers = _parsers()
    wrong = []
    for cmd in readme_commands():
        prefix = next(
            (p for p in sorted(parsers, key=len, reverse=True) if cmd.key.startswith(p)), None
        )
        if prefix is None:
            continue
        defaults = {flag: a.default for a in parsers[prefix]._actions for flag in a.option_strings}
        for group in re.findall(r"\[([^\[\]]*)\]", cmd.key):
            for flag, value in re.findall(r"(--[\w-]+) (-?\d+(?:\.\d+)?)(?=\s|$)", group):
                default = defaults.get(flag, "no such option")
                if not isinstance(default, int | float) or float(default) != float(value):
                    wrong.append(
                        f"line {cmd.line}: {prefix} [{flag} {value}] but the default is {default!r}"
                    )
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- promises
def test_run_from_a_checkpoint_uses_its_tokenizer_or_stops(tmp_path, capsys):
    """The README's LoRA command without its `--set tokenizer=`: hy_tiny has no tokenizer, so
    the run stops (exit 2, one line asking for one) instead of training a tokenizer whose ids
    mean nothing to the weights; a tokenizer with more ids than the model's vocabulary is
    refused the same way. Neither leaves a run directory behind."""
    from hunyuan_jax.cli import train as train_cli

    run = tmp_path / "lora"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run)]
    argv += ["--init-from", str(ROOT / "hunyuan_jax" / "assets" / "hy_tiny" / "hf_st")]
    argv += ["--set", "lora={rank: 8}", "--set", "steps=1"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tokenizer" in err and "--set tokenizer=" in err, err
    assert not run.exists()
    big = ROOT / "tests" / "data" / "hunyuan_tokenizer"  # the A52B's: 128,166 ids
    assert train_cli.main(argv + ["--set", f"tokenizer={big}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "128166 ids" in err and "vocab_size is 1024" in err, err
    assert not run.exists()


# ----------------------------------------------------------------------------- running them
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch directory that looks like the checkout (links to its files), with the
    prompts file the infer.py synopsis names."""
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "runs", "out") and not entry.name.startswith("."):
            (work / entry.name).symlink_to(entry)
    (work / "prompts.txt").write_text("def main(\nimport os\n")
    return work


class Server:
    """A README server command as a process on its own port; `stop` ends it with SIGINT."""

    def __init__(self, cmd: str, port: int, cwd: Path, env: dict):
        self.port, self.cmd = port, cmd
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd} --port {port}"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline, url = time.time() + SERVER_START_S, f"http://127.0.0.1:{port}/health"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{cmd}: exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{cmd}: not serving after {SERVER_START_S} s:\n{self.output()}")

    def output(self) -> str:
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out = self.output()
        return self.proc.returncode, out


def _run(cmd: Command, entry: Entry, work: Path, env: dict, port: int | None) -> str | None:
    """Runs one command; returns a failure description or None."""
    text = instantiate(cmd.text, entry.groups, entry.words) if entry.synopsis else cmd.text
    if port is not None:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    if cmd.lang == "python":
        script = work / f"readme_line_{cmd.line}.py"
        script.write_text(text)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-c", text]
    try:
        proc = subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"README line {cmd.line}: timed out after {TIMEOUT_S} s: {text}"
    out = proc.stdout + proc.stderr
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}")
    if "Traceback (most recent call last)" in out:
        problems.append("a traceback")
    problems += [f"no {s!r} in its output" for s in entry.expect if s not in out]
    problems += [f"{s!r} in its output" for s in entry.refuse if s in out]
    if problems:
        return f"README line {cmd.line}: {', '.join(problems)}: {text}\n{out[-3000:]}"
    return None


@pytest.mark.slow
def test_readme_commands_run(workdir):
    """Every README command the table does not skip, in README order, in one scratch checkout:
    exit 0, no traceback, the output the table expects. Servers start, answer /health and
    stop on SIGINT with exit 0; the default one stays up for the curl and openai commands."""
    env = _env()
    failures, servers, default = [], [], None
    cmds = readme_commands()
    # The default server first: the curl / openai commands after it need it.
    order = sorted(cmds, key=lambda c: not (entry_for(c) and entry_for(c).default_server))
    ran = 0
    for cmd in order:
        entry = entry_for(cmd)
        assert entry is not None, f"README line {cmd.line} is not in TABLE: {cmd.key}"
        if entry.skip:
            continue
        t0 = time.time()
        if entry.server:  # one line of words (its comment dropped) to add --port to
            text = instantiate(cmd.text, entry.groups, entry.words) if entry.synopsis else cmd.text
            text = shlex.join(shlex.split(text.replace("\\\n", " "), comments=True))
            try:
                server = Server(text, _free_port(), workdir, env)
            except AssertionError as e:
                failures.append(f"README line {cmd.line}: {e}")
                continue
            if entry.default_server:
                default = server
            else:
                rc, out = server.stop()
                if rc != 0 or "Traceback" in out:
                    failures.append(
                        f"README line {cmd.line}: stopped with {rc}: {text}\n{out[-3000:]}"
                    )
            servers.append(server)
        else:
            if entry.needs_server and default is None:
                failures.append(f"README line {cmd.line}: no default server to talk to")
                continue
            if cmd.key.startswith("curl ") and shutil.which("curl") is None:
                print(f"README line {cmd.line}: not run: no curl on this machine")
                continue
            port = default.port if entry.needs_server else None
            failure = _run(cmd, entry, workdir, env, port)
            if failure:
                failures.append(failure)
        ran += 1
        print(f"README line {cmd.line}: {time.time() - t0:.1f} s: {cmd.key[:90]}")
    if default is not None:
        rc, out = default.stop()
        if rc != 0 or "Traceback" in out:
            failures.append(f"the default server stopped with {rc}:\n{out[-3000:]}")
    assert ran >= 15, ran
    assert not failures, "\n\n".join(failures)

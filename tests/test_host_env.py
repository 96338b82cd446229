"""The entry points' start-up re-exec with glibc's huge-page malloc advice
(hunyuan_jax/host_env.py): when it applies, what environment it adds, and that the re-executed process gets the same
command line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_jax import host_env

ROOT = Path(__file__).resolve().parent.parent


def test_hugepage_env_adds_the_tunable_once():
    env = host_env.hugepage_env({"PATH": "/bin"}, thp=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # kept beside the user's other tunables
    env = host_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # never twice (the re-executed process sees it set), and the user's own value wins
    assert host_env.hugepage_env(env, thp=True) is None
    assert host_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp=True) is None


def test_hugepage_env_not_applied():
    assert host_env.hugepage_env({}, thp=False) is None  # transparent huge pages off
    assert host_env.hugepage_env({}, thp=True, libc=("", "")) is None  # musl, macOS
    assert host_env.hugepage_env({host_env.OPT_OUT: "1"}, thp=True) is None


def test_thp_mode_file(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert host_env._thp_available(mode)
    mode.write_text("always madvise [never]\n")
    assert not host_env._thp_available(mode)
    assert not host_env._thp_available(tmp_path / "missing")


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not host_env._thp_available(),
    reason="re-exec applies on Linux/glibc with transparent huge pages",
)
def test_reexec_keeps_the_command_line(tmp_path):
    """A script that calls it first thing runs again with the tunable set and the same
    arguments and working directory; the first run's output before the exec is flushed."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import json, os, sys\n"
        "print('start', os.environ.get('GLIBC_TUNABLES', ''))\n"
        "from hunyuan_jax.host_env import reexec_with_hugepage_malloc\n"
        "reexec_with_hugepage_malloc()\n"
        "print(json.dumps([os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], os.getcwd()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_env.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-u", str(script), "a b", "--flag=1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "start " and out[1] == "start glibc.malloc.hugetlb=1"
    assert json.loads(out[2]) == ["glibc.malloc.hugetlb=1", ["a b", "--flag=1"], str(tmp_path)]
    # opted out: runs once, as it is
    env[host_env.OPT_OUT] = "1"
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert len(out) == 2 and json.loads(out[1])[0] is None

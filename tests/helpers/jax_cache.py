"""A persistent JAX compilation cache shared by the test modules that run train.py in
subprocesses (they compile the same train step many times): one directory per pytest process,
removed at exit, passed to subprocesses as JAX_COMPILATION_CACHE_DIR."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

import jax

_ENV = "HUNYUAN_TEST_JAX_CACHE"


def cache_dir() -> str:
    """The shared cache directory (created on first use)."""
    if _ENV not in os.environ:
        os.environ[_ENV] = tempfile.mkdtemp(prefix="hy-jax-cache-")
        atexit.register(shutil.rmtree, os.environ[_ENV], ignore_errors=True)
    return os.environ[_ENV]


@contextlib.contextmanager
def persistent_compilation_cache():
    """Use the shared cache in this process for the duration (restored afterwards, so other
    modules' compiles, e.g. AOT TPU programs, are not affected)."""
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], cache_dir())
    jax.config.update(names[1], 0.5)
    cc.reset_cache()
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()

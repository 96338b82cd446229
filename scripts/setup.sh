#!/usr/bin/env bash
# Create .venv in the repository root and install hunyuan-jax with its torch, serve (the HTTP
# server), test and tpu-aot (libtpu for ahead-of-time TPU compiles on CPU) extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[torch,serve,test,tpu-aot]"

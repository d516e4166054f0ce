#!/usr/bin/env bash
# Sets up .venv from requirements.txt, installs the Debian packages (Fashion-MNIST,
# and a C++ compiler with oneDNN for the CPU kernels) and builds the CPU kernels.
#   bash launch/setup.sh          # what training needs
#   bash launch/setup.sh --test   # and what the tests and benchmarks need (requirements-test.txt)
# Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIREMENTS=requirements.txt
case "${1:-}" in
  "") ;;
  --test) REQUIREMENTS=requirements-test.txt ;;
  *) echo "usage: bash launch/setup.sh [--test]" >&2; exit 2 ;;
esac

missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v g++ >/dev/null || missing+=(g++)
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || missing+=(libdnnl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "Installing Debian packages: ${missing[*]}..."
  $SUDO apt-get install -y -q "${missing[@]}" \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "${missing[@]}"; } \
    || echo "warning: could not install ${missing[*]}; without dataset-fashion-mnist tfds" \
            "will try to download Fashion-MNIST, without g++ and libdnnl-dev convolutions" \
            "run on XLA's slower CPU kernels"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=".venv/.$REQUIREMENTS.installed"
if ! cat requirements.txt "$REQUIREMENTS" | cmp -s - "$STAMP"; then
  echo "Installing Python packages from $REQUIREMENTS into .venv (several minutes)..."
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
  cat requirements.txt "$REQUIREMENTS" > "$STAMP"
fi

# Compiles alexnet_jax/cpu/csrc/*.cc (oneDNN convolutions, fused ReLU-LRN-pool) once
# and checks them against the reference ops.
JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m alexnet_jax.cpu.onednn \
  || echo "warning: the CPU kernels could not be built; the reference (XLA) operations are used instead"

#!/usr/bin/env bash
# Sets up .venv from requirements.txt, installs the Debian packages (Fashion-MNIST,
# and a C++ compiler with oneDNN for the CPU convolutions) and builds the oneDNN
# convolution library. Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

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
if ! cmp -s requirements.txt .venv/.requirements.installed; then
  echo "Installing Python packages from requirements.txt into .venv (several minutes)..."
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi

# Compiles alexnet_jax/csrc/*.cc (oneDNN convolutions, fused ReLU-LRN-pool) once (a
# few seconds) and checks them.
JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m alexnet_jax.onednn \
  || echo "warning: the CPU kernels could not be built; XLA's operations are used instead"

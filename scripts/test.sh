#!/usr/bin/env bash
# The project's test command (README and CI): install if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# lm-evaluation-harness (~600 MB with datasets/pandas) so the adapter's offline local-task test runs too;
# compressed-tensors for the standard quantized export's reload test
pip install -q --disable-pip-version-check -e ".[lmeval,quant]"
python -m pytest -q -p no:cacheprovider "$@"

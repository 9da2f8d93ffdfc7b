#!/usr/bin/env bash
# Refresh requirements/constraints.txt: the exact versions the README's commands install.
# Run on purpose (an upgrade is its own commit), then run the test suite on a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "pip-tools>=7.4"
python -m piptools compile -q --strip-extras --extra test --extra bench --extra ray \
    --no-emit-find-links --no-emit-index-url \
    -o requirements/constraints.txt pyproject.toml requirements/pins.in
echo "wrote requirements/constraints.txt; review the diff and commit it with the reason for the upgrade"

#!/usr/bin/env bash
# Install checkov into its own virtual environment, .venv-checkov/ at the repository root.
#
# Not in the project's venv: checkov pins packaging<24 (and ~60 other packages, boto3 among them), which would
# downgrade packaging 26 that the Ray/torch stack runs with. tests/test_k8s.py finds it at
# .venv-checkov/bin/checkov (or $RAG_CHECKOV, or a `checkov` on PATH) and skips its scan, saying so, without it.
#   bash k8s/install-checkov.sh            # idempotent; CHECKOV_VERSION=3.3.30 by default
set -euo pipefail
cd "$(dirname "$0")/.."
version="${CHECKOV_VERSION:-3.3.30}"
venv="${CHECKOV_VENV:-.venv-checkov}"
python="${PYTHON:-python3}"
if [[ -x "$venv/bin/checkov" ]] && [[ "$("$venv/bin/checkov" --version 2>/dev/null)" == "$version" ]]; then
  echo "checkov $version already in $venv"
  exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$version"
"$venv/bin/checkov" --version

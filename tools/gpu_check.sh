#!/usr/bin/env bash
# The one-call GPU validation run (docs/gpu.md). On the GPU machine, which has no network:
# install the wheels carried with the call (.gpu-wheels, made here by `make gpu-wheels`) into a
# temporary site folder, then run python -m msgfm.bench.gpu_check with this script's arguments
# (e.g. --mode smoke on a CPU). PYTHON picks the interpreter (default python3), GPU_WHEELS the
# wheel folder, OUT the report folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-$REPO/.gpu-wheels}"
SITE="$(mktemp -d "${TMPDIR:-/tmp}/msgfm-site-XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
ARGS=()
PATHS="$REPO"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    PATHS="$REPO:$SITE"
    ARGS=(--wheels "$WHEELS")
else
    echo "gpu_check.sh: no wheels in $WHEELS; using the installed packages"
fi
# The checkout first (msgfm is not installed there), then the carried wheels, then what was set.
export PYTHONPATH="$PATHS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO"
status=0
"$PY" -m msgfm.bench.gpu_check ${ARGS[@]+"${ARGS[@]}"} "$@" || status=$?
exit "$status"

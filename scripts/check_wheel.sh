#!/usr/bin/env bash
# `make package-check` (run by .ci/run): kdx works installed from a wheel, not only from this clone.
#
# Builds the wheel, installs it into a fresh venv, and from an unrelated folder runs
# `kdx-train debug=fdr`, composes kdx-eval's and kdx-bench's configs, tables the run with kdx-table,
# and runs docs/extending.md's user config folder example. The fresh venv borrows the dependencies
# already installed in .venv (one path line in a .pth file, instead of a second multi-GB download);
# a plain path line does not run .venv's own .pth files, so .venv's editable kdx stays out of it and
# the script checks that `kdx` is imported from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdx-package-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1 KDX_CACHE_DIR=$WORK/cache

step() { echo "== package-check: $*"; }

step "build the wheel"
# with build isolation: pip fetches the setuptools that pyproject.toml asks for (a fresh .venv has
# only the setuptools of python -m venv, which cannot build a wheel by itself)
"$PYTHON" -m pip wheel --disable-pip-version-check --no-deps -q -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/kdx-*.whl)
"$PYTHON" - "$WHEEL" <<'EOF'
import sys
import zipfile
from pathlib import Path

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
configs = {f"kdx/conf/{p.relative_to('conf').as_posix()}" for p in Path("conf").rglob("*.yaml")}
missing = sorted(configs - names)
assert not missing, f"the wheel lacks {len(missing)} configs, e.g. {missing[:3]}"
assert "kdx/py.typed" in names, "the wheel lacks kdx/py.typed"
print(f"{Path(sys.argv[1]).name}: {len(names)} files, all {len(configs)} configs of conf/")
EOF

step "install it into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
VENV_BIN=$WORK/venv/bin
deps=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$VENV_BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" >"$site/_kdx_dependencies_from_dotvenv.pth"
"$VENV_BIN/python" -m pip install --disable-pip-version-check --no-deps --no-index -q "$WHEEL"

mkdir -p "$WORK/elsewhere" && cd "$WORK/elsewhere"
"$VENV_BIN/python" - <<'EOF'
import sys
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import kdx

where = Path(kdx.__file__).resolve()
assert where.is_relative_to(Path(sys.prefix).resolve()), f"kdx was imported from {where}, not from the wheel"
assert files("kdx.conf").joinpath("train.yaml").is_file(), "kdx.conf has no train.yaml"
assert version("kdx") == kdx.__version__, (version("kdx"), kdx.__version__)
print(f"kdx {kdx.__version__} from {where.parent}")
EOF

check_run() {  # the one metrics.json under $1 says status ok
    "$VENV_BIN/python" - "$1" <<'EOF'
import json
import sys
from pathlib import Path

(path,) = Path(sys.argv[1]).rglob("metrics.json")
metrics = json.loads(path.read_text())
assert metrics["status"] == "ok", f"{path}: {metrics.get('error')}"
print(f"{path.parent.name}: status ok, method={metrics['method']} student={metrics['student']}")
EOF
}

step "kdx-train debug=fdr from $PWD"
KDX_ROOT_DIR=$WORK/run "$VENV_BIN/kdx-train" debug=fdr >"$WORK/train.out" 2>&1 || {
    cat "$WORK/train.out"
    exit 1
}
check_run "$WORK/run/logs"

step "kdx-eval and kdx-bench compose their configs; kdx-table reads the run"
"$VENV_BIN/kdx-eval" --cfg job >/dev/null
"$VENV_BIN/kdx-bench" --cfg job >/dev/null
"$VENV_BIN/kdx-table" "$WORK/run/logs" --out "$WORK/table" --no-plot --include-debug >/dev/null  # the run is a debug run: tables leave those out unless asked

step "docs/extending.md: a user's method, model and data set from their own folder"
PYTHONPATH=$REPO/docs/examples KDX_ROOT_DIR=$WORK/user "$VENV_BIN/kdx-train" \
    "hydra.searchpath=[file://$REPO/docs/examples/conf]" \
    method=logit_mse student=tiny_conv1d dataset=waves debug=fdr >"$WORK/user.out" 2>&1 || {
    cat "$WORK/user.out"
    exit 1
}
check_run "$WORK/user/logs"
step "ok"

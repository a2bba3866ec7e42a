#!/usr/bin/env bash
# One built wheel beside several torch releases: the C++ extension is on the LibTorch stable ABI, so
# the wheel built once against the lowest supported torch must load, and pass the op, packing and
# packed-runtime tests (tests/ops), beside each later one without a rebuild.
#
#   scripts/check_torch_compat.sh                     # torch 2.13.0 and 2.14.1
#   TORCH_VERSIONS="2.14.1" scripts/check_torch_compat.sh
#
# Builds the wheel with the project's .venv (`make install` first: its torch 2.13 is the build's), then
# for each version makes a fresh virtual environment under $WORK (default /tmp/sgsc-torch-compat),
# installs that torch, then the wheel WITH its dependencies (pip must keep that torch: the package asks
# for torch>=2.13 and nothing above), then the test tools, and runs tests/ops from a copy outside the
# checkout, so `import sgsc` is the installed wheel. A torch 2.14 from PyPI is the CUDA build with its
# nvidia-* dependencies (about 5.5 GB per environment); the tests run on the CPU either way.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_PYTHON=${BUILD_PYTHON:-$ROOT/.venv/bin/python}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/sgsc-torch-compat}
TORCH_VERSIONS=${TORCH_VERSIONS:-"2.13.0 2.14.1"}
TEST_TOOLS=(pytest "hypothesis>=6.100")  # and the wheel's [train] extra: some runtime tests score on digits

mkdir -p "$WORK/wheel"
rm -f "$WORK"/wheel/sgsc-*.whl
echo "== building the wheel once, against $("$BUILD_PYTHON" -c 'import torch; print("torch", torch.__version__)')"
# from the files a clone would have (tracked, and new ones git does not ignore): a checkout's build/ can
# hold a stale extension or deleted modules, which setuptools would put in the wheel
rm -rf "$WORK/source" && mkdir -p "$WORK/source"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/source" 2>/dev/null || true)
"$BUILD_PYTHON" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/wheel" "$WORK/source"
WHEEL=$(ls "$WORK"/wheel/sgsc-*.whl)
echo "   $WHEEL ($(sha256sum "$WHEEL" | cut -c1-16))"

# the tests, outside the checkout: its sgsc/ folder must not shadow the installed wheel
rm -rf "$WORK/suite" && mkdir -p "$WORK/suite"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/suite/"

status=0
for version in $TORCH_VERSIONS; do
    env="$WORK/venv-$version"
    echo "== torch $version in $env"
    if [ ! -x "$env/bin/python" ] || ! "$env/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')"; then
        rm -rf "$env"
        "$PYTHON" -m venv "$env"
        "$env/bin/python" -m pip install -q --upgrade pip
        "$env/bin/python" -m pip install -q "torch==$version"
    fi
    "$env/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
    "$env/bin/python" -m pip install -q "$WHEEL"  # with dependencies: must leave torch as it is
    kept=$("$env/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
    echo "   pip install of the wheel with its dependencies: torch $version -> $kept"
    "$env/bin/python" -m pip install -q "$WHEEL[train]" "${TEST_TOOLS[@]}"
    kept=$("$env/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
    if [ "$kept" != "$version" ]; then
        echo "FAIL: installing the wheel changed torch $version to $kept"
        status=1
        continue
    fi
    (cd "$WORK/suite" && "$env/bin/python" - <<'EOF'
import sgsc, torch
from sgsc.ops import native
assert "site-packages" in sgsc.__file__, sgsc.__file__
assert native.available(), native.load_error
print(f"   torch {torch.__version__} kept; sgsc from {sgsc.__file__}; C++ extension loaded "
      f"({native._extension.__file__.rsplit('/', 1)[-1]}, {native.cpu_isa()}, {native.parallel_threads()} threads)")
EOF
    ) || { status=1; continue; }
    (cd "$WORK/suite" && "$env/bin/python" -m pytest -q -p no:cacheprovider tests/ops 2>&1 | tail -n 3 || true) \
        | tee "$WORK/tests-$version.log"
    grep -q " passed" "$WORK/tests-$version.log" && ! grep -qE "[0-9]+ (failed|error)" "$WORK/tests-$version.log" \
        || status=1
done
exit $status

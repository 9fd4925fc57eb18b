#!/usr/bin/env bash
# Create .venv with vemscale[dev] installed. The environment itself is cached under
# ~/.cache/vemscale/venv-<hash of pyproject.toml> (override with VEMSCALE_ENV_CACHE), so a second clone
# or a CI rerun links it in seconds instead of reinstalling ~6 GB; a fresh machine builds it once.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
cache=${VEMSCALE_ENV_CACHE:-$HOME/.cache/vemscale}
key=$( (cat pyproject.toml; $PY --version) | sha256sum | cut -c1-16)
env="$cache/venv-$key"
if [ ! -f "$env/.complete" ]; then
    echo "setup: building environment in $env (first time on this machine: several minutes)"
    rm -rf "$env"
    mkdir -p "$cache"
    $PY -m venv "$env"
    "$env/bin/python" -m pip install --upgrade pip >/dev/null
    "$env/bin/python" -m pip install -e ".[dev]"
    touch "$env/.complete"
fi
if [ -e .venv ] && [ ! -L .venv ]; then
    echo "setup: .venv exists and is not a link; using it as it is" >&2
    env="$(pwd)/.venv"
else
    ln -sfn "$env" .venv
fi
# point the (possibly shared) environment's editable install at this checkout
.venv/bin/python -m pip install --no-deps --no-build-isolation -e . >/dev/null
.venv/bin/python -c "import vemscale, torch, torchvision, timm, ray, tensorstore; print('setup: ok, vemscale', vemscale.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"

# Shared by scripts/test and scripts/demo: create .venv and install sdcore with pinned deps.
# The package (pyproject.toml) declares version ranges only, so that installing it beside a user's CUDA/MPS torch
# keeps that torch. The exact versions this repository's numbers come from live in constraints.txt, and every pip
# install here goes through `-c constraints.txt`: torch/torchvision pinned to the builds that lie on these machines'
# disk (torch==2.14.1, torchvision==0.29.1), plus the numeric libraries and test oracles.
# The install is redone when pyproject.toml or constraints.txt is newer than the stamp.
ensure_venv() {
  local extra="${1:-}"
  local stamp=".venv/.sdcore-installed-${extra:-base}"
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt torch torchvision
    if [ "$extra" = "test" ]; then
      # the test extra plus the optional engines the tests exercise: the HTTP API (serve) and Ray Data (ray)
      .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,serve,ray]"
      # Oracle only: k-diffusion's sampling.py needs torch, scipy, torchsde, torchdiffeq, tqdm; its package
      # dependencies (wandb, clip, accelerate, ...) are not needed, hence --no-deps (version from constraints.txt).
      .venv/bin/python -m pip install -q -c constraints.txt --no-deps k-diffusion
    else
      .venv/bin/python -m pip install -q -c constraints.txt -e .
    fi
    touch "$stamp"
  fi
}

# Shared by scripts/test and scripts/demo: create .venv and install sdcore with pinned deps.
# torch/torchvision are pinned to the builds that lie on these machines' disk (torch==2.14.1, torchvision==0.29.1).
ensure_venv() {
  local extra="${1:-}"
  local stamp=".venv/.sdcore-installed-${extra:-base}"
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
    if [ "$extra" = "test" ]; then
      .venv/bin/python -m pip install -q -e ".[test]"
      # Oracle only: k-diffusion's sampling.py needs torch, scipy, torchsde, torchdiffeq, tqdm; its package
      # dependencies (wandb, clip, accelerate, ...) are not needed, hence --no-deps.
      .venv/bin/python -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
    else
      .venv/bin/python -m pip install -q -e .
    fi
    touch "$stamp"
  fi
}

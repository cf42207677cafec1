#!/usr/bin/env bash
# The recipe of the bundled tiny model (weights/README.md, "Recipe", numbered as its steps): the phases of
# scripts/train_tiny.py in order, with the options the shipped file was made with. Every training phase resumes
# from its saved state and an export that already exists is kept, so rerunning this script after an interruption
# continues where it stopped.
# Each workdir's cpu_seconds.json adds up the CPU time of its phases (the card's budget table).
# Usage: scripts/train_tiny_recipe.sh [WORKDIR] [OUT]    (defaults: runs/tiny, WORKDIR/sdcore-tiny.safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv
W=${1:-runs/tiny}
OUT=${2:-$W/sdcore-tiny.safetensors}
T=(.venv/bin/python scripts/train_tiny.py)
mkdir -p "$W"

# 1. VAE (3,000 steps, bf16 autocast); its file carries only the VAE that every later phase encodes with.
"${T[@]}" vae --workdir "$W/vae"
[ -f "$W/vae.safetensors" ] || "${T[@]}" export --workdir "$W/vae" --out "$W/vae.safetensors"

# 2-3. Latents of 16,000 scenes (scale_factor kept: 0.2086) and the UNet with two ResBlocks per level.
[ -f "$W/main/latents.pt" ] || "${T[@]}" latents --base "$W/vae.safetensors" --workdir "$W/main" --no-bf16
"${T[@]}" unet --unet-res-blocks 2 --workdir "$W/main"
[ -f "$W/unet.safetensors" ] || \
    "${T[@]}" export --base "$W/vae.safetensors" --unet-res-blocks 2 --workdir "$W/main" --out "$W/unet.safetensors"

# 4. Text encoder trained jointly with the UNet; 15 % of the samples are photo crops under the empty caption.
"${T[@]}" joint --base "$W/unet.safetensors" --unet-res-blocks 2 --no-bf16 --joint-steps 800 --unet-batch 32 \
    --joint-lr 2e-4 --te-lr 1e-3 --photo-p 0.15 --workdir "$W/main"

# 5. Decoder corners on the frozen encoder: the corner loss on the 8 px corner blocks while every other pixel is
#    held to the starting decoder's output (--corner-distill), sizes 32-80 px, two plain images per batch.
"${T[@]}" corners --base "$W/vae.safetensors" --workdir "$W/main" --corner-steps 2600 \
    --no-bf16 --stage2-ema 0.995 --decoder-batch 8 --corner-warmup 50 --corner-lr 1e-3 \
    --corner-sizes 32,48,64,80 --corner-gain 10 --corner-block 8 --corner-flat 2 --corner-distill 5

# 6. The file: the VAE of step 1 with step 5's decoder, the UNet and text encoder of step 4.
"${T[@]}" export --base "$W/unet.safetensors" --unet-res-blocks 2 --workdir "$W/main" --out "$OUT"

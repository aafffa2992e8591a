#!/usr/bin/env bash
# Table 2, ArceeVim: Vision Mamba with a state chain per direction.
# Published as L40runs/vision_mamba_grad_acc.sh, scan type V2RC (4 GPUs x 24 x accumulation 2, 50,051 updates).
# The settings are common.sh's; train_fm.py flags given to this script win (README.md).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
train_row arcee-vim "$@"

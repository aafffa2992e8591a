#!/usr/bin/env bash
# Table 2, Vision Mamba: Vim-B/2, forward and backward row-major scans, no state chain.
# Published as L40runs/vision_mamba_grad_acc.sh, scan type V2 (4 GPUs x 24 x accumulation 2, 50,051 updates).
# The settings are common.sh's; train_fm.py flags given to this script win (README.md).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
train_row vim "$@"

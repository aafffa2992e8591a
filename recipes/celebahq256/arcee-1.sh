#!/usr/bin/env bash
# Table 2, Arcee-1: Zigma-1 with the state chain.
# Published as scripts/Arcee1-b2-celeba256.sh (2 GPUs x 96, 50,050 updates).
# The settings are common.sh's; train_fm.py flags given to this script win (README.md).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
train_row arcee-1 "$@"

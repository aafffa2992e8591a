#!/usr/bin/env bash
# eval.sh ROW [eval_fid.py flags...]: FID and KIDx10^3 (clean-fid) of ROW's EMA weights after $EVAL_STEP
# updates (the table's "step-50000" checkpoint): 50k samples, dopri5 at atol 1e-6 / rtol 1e-3 with the true
# NFE reported, against the real images of FID_REF_DIR. Writes <run>/fid-step<EVAL_STEP>.json (README.md).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -ge 1 ]] || fail "usage: eval.sh ROW [eval_fid.py flags...]"
eval_row "$@"

"""Reproduce the paper's Table 2 at small scale: every row × seed trained on a matched budget, then scored.

    python train_scripts/reproduce_table2.py --output_dir outputs/table2            # ten rows × seeds 0 1 2
    python train_scripts/reproduce_table2.py --output_dir outputs/table2-256 --tier 256 --rows zigma-1 arcee-1
    python train_scripts/reproduce_table2.py --output_dir outputs/table2 --jobs 2   # two cells at a time

Rows: zigma-1 arcee-1 zigma-2 arcee-2 zigma-4 arcee-4 zigma-8 arcee-8 vim arcee-vim (--rows picks some).
Every train_fm.py option (--max_train_steps, --train_batch_size, --learning_rate, --train_data_dir, --vae,
...) applies to every cell. Rerunning the command skips finished cells and resumes interrupted ones; the
folder ends with results.json, results.md, samples/ and plots/ (see docs/reproduction.md); --from_results
takes the cells of another folder's results.json as finished (a committed grid carried on elsewhere).
"""

from __future__ import annotations

import logging

from diffusers.utils import logging as diffusers_logging

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.experiments import CellsFailed, parse_grid_args, run_grid

if __name__ == "__main__":
    with user_errors_exit("reproduce_table2.py", CellsFailed):
        arguments = parse_grid_args(description=__doc__)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
        diffusers_logging.disable_progress_bar()  # the bars over cells and steps are the ones to watch
        run_grid(arguments)

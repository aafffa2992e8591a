# The paper's Table 2 runs on CelebA-HQ 256 (SPEC.md §5-6), shared by the launch scripts <row>.sh and
# eval.sh of this folder: what they expect on disk, each published run's settings, and the commands.
# Sourced, not run; README.md says how to use them.

RECIPE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$RECIPE_DIR/../.." && pwd)"
SCRIPT_NAME="$(basename "$0")"

# What the scripts expect on disk (relative paths are taken from the current folder).
DATA_DIR="${DATA_DIR:-data/celebahq256}"                          # the 30,000 CelebA-HQ 256x256 images
VAE="${VAE:-stabilityai/sd-vae-ft-ema}"                           # an AutoencoderKL folder or Hub repo id
FID_REF_DIR="${FID_REF_DIR:-$DATA_DIR}"                           # real images of FID/KID (the paper's: the training set)
OUTPUT_ROOT="${OUTPUT_ROOT:-outputs/celebahq256}"                 # one run folder per row: $OUTPUT_ROOT/<row>
LATENT_CACHE_DIR="${LATENT_CACHE_DIR:-$OUTPUT_ROOT/latent_cache}" # SD-VAE latents, encoded once for every row
EVAL_STEP="${EVAL_STEP:-50001}"                                   # the table's "step-50000": weights after 50,001 updates

# The published runs, one per row (docs/training.md, "The paper's runs, row by row"). Updates: train.py
# runs --train-steps updates, the Vision Mamba rows' train_grad_acc.py one more.
#   row        hub_configs/  updates  processes  batch per process  accumulation  sampling batch
ROW_TABLE="
    zigma-1    zigma-1-b2    50050    2          96                 1             40
    arcee-1    arcee-1-b2    50050    2          96                 1             40
    zigma-2    zigma-2-b2    50050    2          96                 1             40
    arcee-2    arcee-2-b2    50050    2          96                 1             40
    zigma-4    zigma-4-b2    55001    2          96                 1             40
    arcee-4    arcee-4-b2    50050    2          96                 1             40
    zigma-8    zigma-8-b2    60050    2          96                 1             40
    arcee-8    arcee-8-b2    60050    2          96                 1             40
    vim        vim-b2        50051    4          24                 2             8
    arcee-vim  arcee-vim-b2  50051    4          24                 2             8
"

fail() {
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 1
}

# Sets MODEL_CONFIG UPDATES PROCESSES BATCH ACCUMULATION SAMPLING_BATCH for row $1.
load_row() {
    local name config
    while read -r name config UPDATES PROCESSES BATCH ACCUMULATION SAMPLING_BATCH; do
        if [[ "$name" == "$1" ]]; then
            MODEL_CONFIG="$REPO_DIR/hub_configs/$config/transformer"
            return 0
        fi
    done <<<"$ROW_TABLE"
    fail "unknown row '$1'; expected one of: $(awk 'NF { printf "%s%s", sep, $1; sep = " " }' <<<"$ROW_TABLE")"
}

require_folder() { # variable name, its value, what it should hold
    [[ -d "$2" ]] || fail "$1 '$2' is not a folder: set $1 to $3"
}

require_command() {
    command -v "$1" >/dev/null || fail "'$1' not found: activate the environment arcee-diffusers is installed in"
}

require_vae() { # a local AutoencoderKL folder, or a Hub repo id (downloaded on first use)
    if [[ -d "$VAE" ]]; then
        [[ -f "$VAE/config.json" ]] || fail "VAE '$VAE' has no config.json: set VAE to an AutoencoderKL folder"
    elif [[ ! "$VAE" =~ ^[[:alnum:]][[:alnum:]._-]*/[[:alnum:]._-]+$ ]]; then
        fail "VAE '$VAE' is neither a folder nor a Hub repo id: set VAE to an AutoencoderKL folder or repo id"
    fi
}

# DRY_RUN=1 prints the command instead of running it.
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local quoted
        printf -v quoted '%q ' "$@"
        echo "${quoted% }"
    else
        exec "$@"
    fi
}

# train_row ROW [train_fm.py flags...]: the published run of ROW; flags given after it win over the
# row's. NUM_PROCESSES overrides the process count (1: one process, without --multi_gpu).
train_row() {
    local row="$1"
    shift
    load_row "$row"
    require_folder DATA_DIR "$DATA_DIR" "the folder of CelebA-HQ 256 training images"
    require_vae
    require_command accelerate
    local processes="${NUM_PROCESSES:-$PROCESSES}"
    local launch=(accelerate launch --num_machines 1 --num_processes "$processes" --mixed_precision no
        --dynamo_backend no)
    if ((processes > 1)); then
        launch+=(--multi_gpu)
    fi
    if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then # two multi-GPU runs on one machine need two ports
        launch+=(--main_process_port "$MAIN_PROCESS_PORT")
    fi
    local flags=(
        --output_dir "$OUTPUT_ROOT/$row" --model_config "$MODEL_CONFIG"
        --max_train_steps "$UPDATES" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUMULATION"
        --train_data_dir "$DATA_DIR" --resolution 256 --random_flip --dataloader_drop_last
        --vae "$VAE" --latent_cache_dir "$LATENT_CACHE_DIR" --no-class_conditional
        --path gvp --weighting_scheme uniform
        --learning_rate 3e-4 --lr_scheduler constant --lr_warmup_steps 0
        --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 0 --max_grad_norm 2.0
        --ema_decay 0.9999 --ema_schedule constant
        --mixed_precision no --allow_tf32 --seed 0
        --checkpointing_steps 5000 --checkpoints_total_limit 2 --checkpoint_at_steps "$EVAL_STEP"
        --resume_from_checkpoint latest --final_eval none
    )
    run "${launch[@]}" "$REPO_DIR/train_scripts/train_fm.py" "${flags[@]}" "$@"
}

# eval_row ROW [eval_fid.py flags...]: FID/KID of ROW's EMA weights at checkpoint-$EVAL_STEP.
eval_row() {
    local row="$1"
    shift
    load_row "$row"
    local run_dir="$OUTPUT_ROOT/$row"
    local weights="$run_dir/checkpoint-$EVAL_STEP/transformer_ema"
    require_folder FID_REF_DIR "$FID_REF_DIR" "the folder of real CelebA-HQ 256 images"
    [[ -f "$run_dir/model_index.json" ]] || fail "'$run_dir' holds no finished run: train it with $row.sh first"
    [[ -d "$weights" ]] || fail "'$weights' is missing: $row.sh saves it after $EVAL_STEP updates (EVAL_STEP)"
    require_command python
    local flags=(
        --pipeline "$run_dir" --transformer "$weights" --reference_dir "$FID_REF_DIR"
        --sample_dir "$run_dir/samples-step$EVAL_STEP" --output_json "$run_dir/fid-step$EVAL_STEP.json"
        --num_samples 50000 --batch_size "$SAMPLING_BATCH" --seed 0 --guidance_scale 1
        --num_inference_steps 0 --atol 1e-6 --rtol 1e-3 --allow_tf32
    )
    run python "$REPO_DIR/train_scripts/eval_fid.py" "${flags[@]}" "$@"
}

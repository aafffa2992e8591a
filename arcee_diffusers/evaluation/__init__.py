"""Evaluation: clean-fid FID/KID with content-keyed reference caches, seeded sample folders, digit metrics,
per-row denoising loss and influence maps."""

from .digits import evaluate_digit_samples, evaluate_digits_pipeline, train_digit_classifier
from .fid import compute_fid_kid, folder_content_key, reference_features
from .sampling import describe_solver, generate_samples, mean_model_calls, sample_images, save_image_grid
from .spatial import heldout_triples, influence_map, per_row_denoising_loss

__all__ = [
    "compute_fid_kid",
    "describe_solver",
    "evaluate_digit_samples",
    "evaluate_digits_pipeline",
    "folder_content_key",
    "generate_samples",
    "heldout_triples",
    "influence_map",
    "mean_model_calls",
    "per_row_denoising_loss",
    "reference_features",
    "sample_images",
    "save_image_grid",
    "train_digit_classifier",
]

"""Evaluation: clean-fid FID/KID with content-keyed reference caches, seeded sample folders, digit metrics."""

from .digits import evaluate_digit_samples, evaluate_digits_pipeline, train_digit_classifier
from .fid import compute_fid_kid, folder_content_key, reference_features
from .sampling import generate_samples, sample_images, save_image_grid

__all__ = [
    "compute_fid_kid",
    "evaluate_digit_samples",
    "evaluate_digits_pipeline",
    "folder_content_key",
    "generate_samples",
    "reference_features",
    "sample_images",
    "save_image_grid",
    "train_digit_classifier",
]

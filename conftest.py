"""Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``arcee_scan.triton_scan`` is first
imported, so it is set here, in the first file pytest (and every pytest-xdist worker) loads. This lives at the
repository root rather than in tests/: a tests/conftest.py would put tests/ on sys.path, where the
tests/arcee_scan folder would shadow the arcee_scan package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Import the installed package before pytest puts tests/ on sys.path for a test module at tests/'s root, where
# the tests/arcee_scan folder would shadow it (running such a module with others then failed to import).
import arcee_scan  # noqa: E402, F401

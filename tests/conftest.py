"""Test-wide settings: one torch thread per worker (xdist runs one worker per core)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

"""Test-wide settings: one torch thread per worker (xdist runs one worker per core), and one for every
subprocess a test starts (the peers' runners, the CLI): two threads per process on two busy cores make a
run many times slower."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

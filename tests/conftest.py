import os

import torch

if not torch.cuda.is_available():  # Triton kernels on CPU tensors (test_triton_kernel), set
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any test imports triton

import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared test models (test_oracles.TinyLlama)

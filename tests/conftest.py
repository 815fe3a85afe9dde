import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (test_triton_kernel)

import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared test models (test_oracles.TinyLlama)

"""Test-session setup.

- Without a GPU, Triton kernels run in the interpreter (must be set before triton is imported).
- Under pytest-xdist each worker gets one intra-op thread: the workers already fill the cores, and oversubscribed
  small matmuls spend their time waiting on each other.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

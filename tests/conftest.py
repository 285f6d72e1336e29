import os
import sys

# kernels.py reads TRITON_INTERPRET at import: set it before anything imports triton, so that the
# kernel tests run the Triton kernels on CPU tensors. The suite needs no environment of its own.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

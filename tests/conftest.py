import os
import sys

# kernels.py reads TRITON_INTERPRET at import: set it before anything imports triton, so that the
# kernel tests run the Triton kernels on CPU tensors. The suite needs no environment of its own.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests use tiny models, where OpenMP's thread synchronisation costs more than it saves, and on a
# busy machine a waiting thread can stall every matmul for milliseconds (seen: 300x slower). One thread,
# here and in the train.py/sample.py subprocesses, which inherit the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

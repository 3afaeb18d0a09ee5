import os
import sys

import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on before any kernel is defined.
    os.environ.setdefault('TRITON_INTERPRET', '1')
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    import pytest
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA device')
        for item in items:
            if 'gpu' in item.keywords:
                item.add_marker(skip)

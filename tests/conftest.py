import os
import sys

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on before any kernel is defined.
    os.environ.setdefault('TRITON_INTERPRET', '1')
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def triton_mode(request):
    """Kernel tests need Triton's interpreter on the CPU; ``gpu`` tests need CUDA and compiled kernels."""
    if request.node.get_closest_marker('gpu'):
        if not torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET') == '1':
            pytest.skip('needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)')
    elif os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('CPU kernel tests need TRITON_INTERPRET=1 in the environment before Python starts')


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA device')
        for item in items:
            if 'gpu' in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=['torch', 'triton'])
def backend(request, monkeypatch):
    """Runs a test with ``GREENMIM_BACKEND=torch`` and ``=triton`` (CUDA, or the interpreter on the CPU)."""
    if request.param == 'triton' and os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available():
        pytest.skip('Triton needs CUDA or TRITON_INTERPRET=1 at start-up')
    monkeypatch.setenv('GREENMIM_BACKEND', request.param)
    return request.param

"""pyflat's TF32 switch: products run with TF32 off unless pyflat allows it, and restore the
caller's settings."""
import pytest
import torch

import pyflat
from pyflat.precision import full_precision


def test_full_precision_sets_and_restores_torch_switches():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with full_precision(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        pyflat.set_allow_tf32(True)
        with full_precision(torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32
        with full_precision(torch.device("cpu")):  # nothing to switch on the CPU
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        pyflat.set_allow_tf32(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert pyflat.get_allow_tf32() is False


def test_set_allow_tf32_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        pyflat.set_allow_tf32(1)

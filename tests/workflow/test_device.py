"""tifactory.device: the device a training or sampling job computes on."""

from __future__ import annotations

import pytest
import torch

from tifactory.device import DeviceError, pick_device


def test_auto_picks_cuda_when_there_is_one():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named():
    with pytest.raises(DeviceError, match="'cuda:1' asked for, but no CUDA device is available"):
        pick_device("cuda:1")


def test_unknown_device_name_is_named():
    with pytest.raises(DeviceError, match="'gpu' is not a torch device name"):
        pick_device("gpu")

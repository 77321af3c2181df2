"""Every conformance case runs twice: with the acceleration layer (uio.accel) and on the plain
torch reference path (uio.accel.disable()), with the same tolerances."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module", params=["accelerated", "reference"])
def accel_mode(request):
    """The path the module's tests run on: its fast operations registered, or the reference ones."""
    from uio import accel

    if request.param == "reference":
        with accel.disabled():
            yield request.param
    else:
        accel.switched_on()
        yield request.param


@pytest.fixture(scope="module")
def tiny_model(accel_mode, conformance):
    """The reference's tiny random checkpoint loaded into our model (fp32, CPU), built on this
    module's path (laid out by uio.accel, or plain)."""
    import torch

    from uio.runner import build_model

    torch.manual_seed(0)
    return build_model(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin")

"""The acceleration layer's tests run with its fast operations registered, whatever ``UIO_ACCEL``
or an earlier test left, and put back what was registered before."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fast_ops():
    """Every fast operation of uio.accel registered for the test (``uio.accel.enable``)."""
    from uio import accel
    from uio.model import ops

    before, was_switched_off = ops.registered(), accel._switched_off
    accel.enable()
    yield
    ops.reset()
    for name, function in before.items():
        ops.register(name, function)
    accel._switched_off = was_switched_off

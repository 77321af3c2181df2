"""What identifies a tensor's current values cheaply, for caches of forms derived from weights."""
from __future__ import annotations

from torch import Tensor


def tensor_state(t: Tensor) -> tuple[int, int]:
    """(address, version) of ``t``: one or the other changes when ``t`` is replaced or updated in
    place. The version counts a tensor's in-place updates (autograd's own check that saved tensors
    are unchanged); tensors made in inference mode have none (0), and asking raises."""
    return t.data_ptr(), 0 if t.is_inference() else t._version

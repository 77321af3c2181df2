"""The one owner of every form the acceleration layer derives from weights.

Packed copies, fused views, prepacked convolution weights, step traces and the encoder's position
biases all live in :data:`FORMS`, under one rule: a form is made on first use (or ahead, at load)
from its source tensors and a key, and made again when a source is replaced or updated in place
(its address, version or storage changes, see :func:`tensor_state`); it is dropped when a source
is freed.
The model's weights therefore stay plain parameters: converting, copying, pickling or loading
into a model needs nothing from this layer, which catches up at the next call.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor


def tensor_state(t: Tensor) -> tuple[int, int]:
    """(address, version) of ``t``: one or the other changes when ``t`` is replaced or updated in
    place. The version counts a tensor's in-place updates (autograd's own check that saved tensors
    are unchanged); tensors made in inference mode have none (0), and asking raises."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # an inference tensor
        return t.data_ptr(), 0


class DerivedForms:
    """Forms derived from tensors, each kept with the state of its sources when it was made.

    A form is named by its ``kind``, the identity of its source tensors and a ``key`` (shapes,
    dtypes, options); :meth:`limit` bounds how many forms of a kind are kept, or their bytes
    (the least recently used go first)."""

    def __init__(self):
        # name -> (the sources' states, the form, weak references to the sources' storages)
        self._forms: OrderedDict[tuple, tuple[tuple, object, list]] = OrderedDict()
        self._limits: dict[str, tuple[int | None, int | None]] = {}
        self._watched: set[tuple] = set()  # names whose sources drop them when freed
        # Calls may run from several threads at once; freeing a form can free a source, whose
        # finalizer drops its forms from within a locked section.
        self._lock = threading.RLock()

    def get(self, kind: str, sources: Sequence[Tensor], make: Callable[[], object], key: Hashable = (),
            create: bool = True) -> object:
        """The form ``make()`` made from ``sources`` (kept, or made now if they changed since); where
        none was ever made and not ``create``, None."""
        name = (kind, *map(id, sources), key)
        state = tuple(map(tensor_state, sources))
        kept = self._forms.get(name)  # dict reads need no lock
        if kept is not None and kept[0] == state and _same_storages(kept[2], sources):
            if kind in self._limits:  # least recently used first
                with self._lock:
                    if name in self._forms:
                        self._forms.move_to_end(name)
            return kept[1]
        if kept is None and not create:
            return None
        # A normal tensor whatever mode this call runs in: later calls may run outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            form = make()
        with self._lock:
            if sources and name not in self._watched:
                self._watched.add(name)
                for source in sources:  # its forms go with it (and no later tensor reuses its id while kept)
                    weakref.finalize(source, self._drop, name)
            self._forms[name] = (state, form, [weakref.ref(source.untyped_storage()) for source in sources])
            self._enforce_limit(kind)
        return form

    def limit(self, kind: str, count: int | None = None, nbytes: int | None = None) -> None:
        """Keep at most ``count`` forms of ``kind``, of at most ``nbytes`` together (forms being tensors)."""
        self._limits[kind] = (count, nbytes)

    def forms(self, kind: str) -> list:
        """The forms of ``kind`` kept now, least recently used first."""
        with self._lock:
            return [form for (k, *_), (_, form, _) in list(self._forms.items()) if k == kind]

    def discard(self, kind: str, sources: Sequence[Tensor], key: Hashable = ()) -> None:
        """Forget the form :meth:`get` keeps under these names, if any."""
        with self._lock:
            self._forms.pop((kind, *map(id, sources), key), None)

    def clear(self, kind: str | None = None) -> None:
        """Forget every form (of ``kind``): they are made again on their next use."""
        with self._lock:
            for name in [name for name in self._forms if kind is None or name[0] == kind]:
                del self._forms[name]

    def _drop(self, name: tuple) -> None:
        with self._lock:
            self._forms.pop(name, None)
            self._watched.discard(name)

    def _enforce_limit(self, kind: str) -> None:
        count, nbytes = self._limits.get(kind, (None, None))
        if count is None and nbytes is None:
            return
        names = [name for name in self._forms if name[0] == kind]
        sizes = {name: getattr(self._forms[name][1], "nbytes", 0) for name in names}
        total = sum(sizes.values())
        while len(names) > 1 and ((count is not None and len(names) > count) or (nbytes is not None and total > nbytes)):
            oldest = names.pop(0)
            total -= sizes[oldest]
            self._forms.pop(oldest, None)


def _same_storages(storages: list[weakref.ref], sources: Sequence[Tensor]) -> bool:
    """Whether each source still has the storage it had: a conversion (``.to()``) gives a parameter
    new storage, which may lie where the freed old one was (same address) with the version kept."""
    return all(kept() is source.untyped_storage() for kept, source in zip(storages, sources))


FORMS = DerivedForms()

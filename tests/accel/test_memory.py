"""Weight memory in transparent huge pages (uio.accel.memory)."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from uio.accel import memory

needs_huge_pages = pytest.mark.skipif(not memory.huge_pages_available(),
                                      reason="this system offers no transparent huge pages")


def mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping holding ``address`` (None if none does)."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            if inside:
                return fields
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside:
            fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields if inside else None


def is_huge_page_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in memory marked for transparent huge pages."""
    fields = mapping_of(tensor.data_ptr())
    return fields is not None and fields.get("THPeligible") == "1"


MiB = 1 << 20


@needs_huge_pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(200, 300), (1000, 1537)])  # 117 KiB to 5.9 MiB
def test_tensors_from_64_kib_lie_in_huge_page_memory(dtype, shape):
    tensor = memory.empty(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert is_huge_page_memory(tensor) and is_huge_page_memory(tensor.view(-1)[-1:])
    tensor.copy_(torch.arange(tensor.numel()).view(shape))
    gc.collect()
    assert tensor[-1, -1].item() == float(torch.tensor(tensor.numel() - 1, dtype=dtype))


@needs_huge_pages
def test_tensors_are_carved_one_after_another_from_a_huge_page_aligned_map():
    maps = memory.HugePageMaps()
    first, second = maps.empty((1000,), torch.float32), maps.empty((3 * MiB,), torch.uint8)
    assert first.data_ptr() % memory.HUGE_PAGE == 0
    assert second.data_ptr() == first.data_ptr() + 4000 // memory.ALIGNMENT * memory.ALIGNMENT + memory.ALIGNMENT
    assert mapping_of(second.data_ptr()) == mapping_of(first.data_ptr())


@needs_huge_pages
def test_a_tensor_that_does_not_fit_gets_a_new_map_and_the_roomier_one_is_carved_next():
    maps = memory.HugePageMaps()
    first = maps.empty((memory.HUGE_PAGE_MAP_BYTES - 4 * MiB,), torch.uint8)  # 4 MiB left
    larger = maps.empty((memory.HUGE_PAGE_MAP_BYTES + MiB,), torch.uint8)  # its map has 1 MiB left
    assert maps.empty((MiB,), torch.uint8).data_ptr() == first.data_ptr() + memory.HUGE_PAGE_MAP_BYTES - 4 * MiB
    assert larger.data_ptr() % memory.HUGE_PAGE == 0 and is_huge_page_memory(larger[-1:])
    wider = maps.empty((8 * MiB,), torch.uint8)  # does not fit: its new map has 56 MiB left
    assert maps.empty((MiB,), torch.uint8).data_ptr() == wider.data_ptr() + 8 * MiB


@needs_huge_pages
def test_a_map_is_unmapped_with_the_last_tensor_carved_from_it():
    maps = memory.HugePageMaps()
    first, second = maps.empty((MiB,), torch.uint8), maps.empty((MiB,), torch.uint8)
    view = second[1:]
    address = first.data_ptr()
    del first, second
    gc.collect()
    assert mapping_of(address) is not None  # a view of the second keeps it
    del view
    gc.collect()
    assert mapping_of(address) is None
    assert maps.empty((MiB,), torch.uint8).data_ptr() % memory.HUGE_PAGE == 0  # a new map


def test_small_tensors_and_systems_without_huge_pages_get_ordinary_memory(monkeypatch):
    assert memory.empty((100, 100), torch.float32).untyped_storage().resizable()
    monkeypatch.setattr(memory, "huge_pages_available", lambda: False)
    tensor = memory.empty((1024, 1024), torch.float32)
    assert tensor.shape == (1024, 1024) and tensor.untyped_storage().resizable()


def test_loaded_weights_lie_in_huge_page_memory(tiny_model):
    if not memory.huge_pages_available():
        pytest.skip("this system offers no transparent huge pages")
    weights = [w for w in tiny_model.parameters() if w.numel() * w.element_size() >= memory.HUGE_PAGE_SHARED_FROM]
    assert len(weights) > 10 and tiny_model.token_embedder.weight in weights
    assert all(is_huge_page_memory(w) for w in weights)


def test_the_environment_can_turn_huge_pages_off(monkeypatch):
    monkeypatch.setenv("UIO_HUGE_PAGES", "0")
    memory.huge_pages_available.cache_clear()
    try:
        assert not memory.huge_pages_available()
        assert memory.empty((1024, 1024), torch.float32).untyped_storage().resizable()
    finally:
        memory.huge_pages_available.cache_clear()

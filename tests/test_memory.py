"""Weight memory in transparent huge pages (uio.model.memory)."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from uio.model import memory

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
    """Whether ``tensor`` starts on a 2 MiB boundary in memory marked for transparent huge pages."""
    fields = mapping_of(tensor.data_ptr())
    return tensor.data_ptr() % memory.HUGE_PAGE == 0 and fields is not None and fields.get("THPeligible") == "1"


@needs_huge_pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_lie_in_huge_page_memory(dtype):
    tensor = memory.empty((1000, 1537), dtype)  # 2.9-5.9 MiB: whole huge pages and a tail
    assert tensor.shape == (1000, 1537) and tensor.dtype == dtype and tensor.is_contiguous()
    assert is_huge_page_memory(tensor)
    tail = tensor.view(-1)[-1:]
    tail_page = tail.data_ptr() // memory.HUGE_PAGE * memory.HUGE_PAGE
    assert tail_page != tensor.data_ptr() and mapping_of(tail_page).get("THPeligible") == "0"
    tensor.copy_(torch.arange(tensor.numel()).view(tensor.shape))
    gc.collect()
    assert tensor[-1, -1].item() == float(torch.tensor(tensor.numel() - 1, dtype=dtype))


@needs_huge_pages
def test_memory_is_unmapped_with_its_tensor():
    tensor = memory.empty((3 << 20,), torch.uint8)
    view = tensor[1:]
    address = tensor.data_ptr()
    del tensor
    gc.collect()
    assert mapping_of(address) is not None  # a view keeps it
    del view
    gc.collect()
    assert mapping_of(address) is None


def test_small_tensors_and_systems_without_huge_pages_get_ordinary_memory(monkeypatch):
    assert memory.empty((100, 100), torch.float32).untyped_storage().resizable()
    monkeypatch.setattr(memory, "huge_pages_available", lambda: False)
    tensor = memory.empty((1024, 1024), torch.float32)
    assert tensor.shape == (1024, 1024) and tensor.untyped_storage().resizable()


def test_loaded_output_embedding_lies_in_huge_page_memory(tiny_model):
    """The largest weight a decoding step streams (in ``tiny``, the only one of 2 MiB or more)."""
    if not memory.huge_pages_available():
        pytest.skip("this system offers no transparent huge pages")
    assert is_huge_page_memory(tiny_model.token_embedder.weight)


def test_the_environment_can_turn_huge_pages_off(monkeypatch):
    monkeypatch.setenv("UIO_HUGE_PAGES", "0")
    memory.huge_pages_available.cache_clear()
    try:
        assert not memory.huge_pages_available()
        assert memory.empty((1024, 1024), torch.float32).untyped_storage().resizable()
    finally:
        memory.huge_pages_available.cache_clear()

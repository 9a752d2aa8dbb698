"""Big CPU tensors on 2 MiB pages.

A CPU decode step reads every weight matrix and the whole KV cache from memory: hundreds of megabytes a step for
a model of GPT-2 small's size, on 4 KiB pages far more pages than the TLB holds, so most pages cost a page-table
walk and the hardware prefetchers stop at every page boundary. On 2 MiB pages the same bytes are 512 times fewer
pages. `zeros` asks Linux for them (transparent huge pages in `madvise` mode, the common default, give them
only to memory that asks); where the kernel has none to give, or on another OS, the memory is ordinary pages.
Only whole 2 MiB pages are advised, so the resident memory stays that of `torch.zeros`
(docs/performance.md has the measurements).
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype)` on the CPU, starting on a 2 MiB boundary of memory advised to use 2 MiB
    pages up to its last whole one, for tensors of at least 2 MiB (smaller ones: plain `torch.zeros`). Fresh
    anonymous memory reads as zeros, and pages are only allocated when first touched. The tensor keeps its
    mapping alive."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to `region`
    start = -raw.data_ptr() % HUGE_PAGE
    try:  # the whole 2 MiB pages only: a partly used one at the end would hold up to 2 MiB for nothing
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages, same tensor
        pass
    return raw[start:start + nbytes].view(dtype).view(shape)

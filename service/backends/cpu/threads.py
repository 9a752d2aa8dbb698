"""OpenMP worker threads: who holds them, and letting go of them."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    try:  # by soname: the libgomp torch loaded (its CPU builds use OpenMP threads)
        library = ctypes.CDLL("libgomp.so.1")
        library.omp_pause_resource_all.argtypes, library.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return library


def release_cpu_threads() -> None:
    """Frees the calling thread's OpenMP worker threads (`omp_pause_resource_all`); its next parallel region makes
    new ones. libgomp keeps a pool per thread that ever ran a parallel region, and once the pools hold more
    threads than there are cores, every worker sleeps between regions instead of spinning: each of the many
    parallel regions of a decode step then pays a wake-up. So the thread that loaded the model lets go of its pool
    when the engine starts, and the engine thread of its own whenever it runs out of work."""
    library = _openmp()
    if library is not None:
        library.omp_pause_resource_all(2)  # omp_pause_hard

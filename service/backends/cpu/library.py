"""Builds and loads lmserve's CPU kernels (kernels/*.c) with the system C compiler on first use.

The compiled library is cached under `$LMSERVE_KERNEL_DIR` (default `~/.cache/lmserve/kernels`), named by a
hash of the sources and flags. Where it cannot be built or run (no compiler, no AVX2, not x86-64), or it
disagrees with Python's mirror of its constants and structs (abi.py), `kernels()` is None, a log line says why,
and the engine runs on PyTorch.

    python -m service.backends.cpu.library    # build now (the Docker image does)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from service.backends.cpu import abi

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("kernels") / name
           for name in ("cpu.h", "cpu.c", "attention.c", "decode_step.c")]
CFLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_pointer, _int64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "lmserve_linear_f32": [_pointer] * 4 + [_int64] * 3 + [ctypes.c_int] + [_pointer] * 2 + [ctypes.c_int, _pointer],
    "lmserve_activation_f32": [_pointer] * 2 + [_int64, ctypes.c_int, ctypes.c_int],
    "lmserve_decode_attention_f32": [_pointer] * 5 + [_int64] * 9 + [ctypes.c_float, _pointer, ctypes.c_int],
    "lmserve_write_kv_f32": [_pointer] * 5 + [_int64] * 10,
    "lmserve_norm_f32": [_pointer] * 4 + [_int64] * 2 + [ctypes.c_float, ctypes.c_int, ctypes.c_int],
    "lmserve_decode_step_f32": [_pointer] * 3 + [_int64] * 2 + [_pointer] * 2 + [ctypes.c_int],
    "lmserve_argmax_f32": [_pointer] + [_int64] * 2 + [_pointer, ctypes.c_int],
}


class Unavailable(Exception):
    """Why the kernels can't run here."""


def kernel_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmserve" / "kernels"
    return Path(os.environ.get("LMSERVE_KERNEL_DIR", default))


def library_name() -> str:
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(CFLAGS).encode()).hexdigest()[:16]
    return f"cpu-{digest}.so"


def cpu_supported() -> bool:
    """The kernel is AVX2 + FMA code for x86-64."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


def build(directory: Path, compiler: str | None = None) -> Path:
    """Compiles the kernel into `directory` (atomically: concurrent builds don't see half a file)."""
    compiler = compiler or os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found)")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / library_name()
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / target.name
        sources = [str(s) for s in SOURCES if s.suffix == ".c"]
        done = subprocess.run([compiler, *CFLAGS, *sources, "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class CpuKernels:
    """The loaded library's functions: process-wide, so copies of a model share them."""

    linear: ctypes._CFuncPtr
    activation: ctypes._CFuncPtr
    decode_attention: ctypes._CFuncPtr
    write_kv: ctypes._CFuncPtr
    norm: ctypes._CFuncPtr
    decode_step: ctypes._CFuncPtr
    argmax: ctypes._CFuncPtr

    def __deepcopy__(self, memo: dict) -> CpuKernels:
        return self


def check_abi(library: ctypes.CDLL) -> None:
    """Raises Unavailable unless the library's constants and struct layouts are those Python mirrors."""
    report = library.lmserve_abi
    report.argtypes, report.restype = [_pointer, _int64], _int64
    want = abi.expected()
    values = (_int64 * len(want))()
    count = report(values, len(want))
    for (name, expected), got in zip(want.items(), values[:count]):
        if got != expected:
            raise Unavailable(f"the library's {name} is {got}, Python's mirror (service/backends/cpu/abi.py) "
                              f"has {expected}")
    if count != len(want):
        raise Unavailable(f"the library reports {count} ABI values, Python's mirror (abi.py) knows {len(want)}")


def open_kernels(directory: Path, compiler: str | None = None) -> CpuKernels:
    """The kernels from `directory`, built there if missing; raises Unavailable where they can't be."""
    try:
        path = directory / library_name()
        if not path.exists():
            path = build(directory, compiler)
            log.info("CPU kernels: built %s", path)
        library = ctypes.CDLL(str(path))  # torch has loaded libgomp already: the kernels share its threads
    except (OSError, RuntimeError) as e:
        raise Unavailable(str(e)) from e
    check_abi(library)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return CpuKernels(*(getattr(library, name) for name in _SIGNATURES))


def load(directory: Path, compiler: str | None = None) -> CpuKernels | None:
    """The kernels from `directory`, built there if missing; None (with a log line) where they can't be."""
    library = _load(directory, compiler)
    return library if isinstance(library, CpuKernels) else None


def _load(directory: Path, compiler: str | None = None) -> CpuKernels | str:
    if not cpu_supported():
        log.info("CPU kernels: need an x86-64 CPU with AVX2; using PyTorch's")
        return "they need an x86-64 CPU with AVX2"
    try:
        return open_kernels(directory, compiler)
    except Unavailable as e:
        log.warning("CPU kernels unavailable (%s); using PyTorch's", e)
        return str(e)


@functools.cache
def loaded() -> CpuKernels | str:
    """The process's kernels, loaded (built if need be) on first use; where they can't be, why not."""
    return _load(kernel_dir())


def kernels() -> CpuKernels | None:
    library = loaded()
    return library if isinstance(library, CpuKernels) else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kernels() is None:
        raise SystemExit(1)
    print(kernel_dir() / library_name())

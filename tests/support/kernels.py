"""Whether this machine can build and run the CPU kernels."""

from __future__ import annotations

import shutil

import pytest

from service.backends.cpu import library as cpu_library

CAN_BUILD = cpu_library.cpu_supported() and shutil.which("cc") is not None
# like the CUDA tests: where the hardware (or the compiler) is missing there is nothing to run them on
needs_kernels = pytest.mark.skipif(not CAN_BUILD, reason="needs an x86-64 CPU with AVX2 and a C compiler")

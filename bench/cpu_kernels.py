"""lmserve's CPU linear kernel (on its packed weights) vs oneDNN's packed weights vs PyTorch's F.linear (MKL),
side by side.

    python bench/cpu_kernels.py                 # rows 1 2 4 8 32 64 128 512
    python bench/cpu_kernels.py --rows 1 32

Every weight matrix of a GPT-2-small-shaped model (12 layers of q, k, v, o, up, down, plus the 50257-row output
layer: 498 MB of float32) times `rows` activation rows, best of 3 passes; reports ms per pass, GB/s of weights
read and GFLOP/s. Reports, never asserts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from decode import read_bandwidth
from torch import nn

from service.backends.cpu.layers import KernelLinear
from service.backends.cpu.library import kernels

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # (out, in) per layer
LAYERS, VOCAB = 12, 50257


def best_of(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 64, 128, 512])
    args = parser.parse_args()
    library = kernels()
    if library is None:
        raise SystemExit("the CPU kernels are not available here (see the log line above)")
    torch.manual_seed(0)
    linears = [nn.Linear(i, o) for _ in range(LAYERS) for o, i in SHAPES] + [nn.Linear(768, VOCAB, bias=False)]
    ours = [KernelLinear(linear, library) for linear in linears]
    weight_bytes = sum(linear.weight.numel() * 4 for linear in linears)
    flops_per_row = 2 * weight_bytes / 4
    print(f"{torch.get_num_threads()} threads; {len(linears)} matrices, {weight_bytes / 1e6:.0f} MB of float32 "
          f"weights; a plain sum over 1 GB reads {read_bandwidth(torch.device('cpu')) / 1e9:.1f} GB/s")
    print("| rows | lmserve ms | oneDNN packed ms | F.linear ms | lmserve GB/s | lmserve GFLOP/s | "
          "oneDNN / lmserve | F.linear / lmserve |")
    print("|---|---|---|---|---|---|---|---|")

    def run_ours(x: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x[layer.in_features]) for layer in ours]

    with torch.inference_mode():
        for rows in args.rows:
            inputs = {n: torch.randn(rows, n) for n in (768, 3072)}
            packed = [torch.ops.mkldnn._reorder_linear_weight(linear.weight, rows) for linear in linears]
            times = {
                "lmserve": best_of(run_ours, inputs),
                "onednn": best_of(lambda x, w: [torch.ops.mkldnn._linear_pointwise(
                    x[linear.in_features], weight, linear.bias, "none", [], "")
                    for linear, weight in zip(linears, w)], inputs, packed),
                "mkl": best_of(lambda x: [F.linear(x[linear.in_features], linear.weight, linear.bias)
                                          for linear in linears], inputs),
            }
            t = times["lmserve"]
            print(f"| {rows} | {t * 1e3:.1f} | {times['onednn'] * 1e3:.1f} | {times['mkl'] * 1e3:.1f} | "
                  f"{weight_bytes / t / 1e9:.1f} | {flops_per_row * rows / t / 1e9:.0f} | "
                  f"{times['onednn'] / t:.2f} | {times['mkl'] / t:.2f} |")

if __name__ == "__main__":
    main()

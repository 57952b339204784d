#!/usr/bin/env python3
r"""Kernels whose engine the conventions table asserts, for Nsight Compute to read.

Usage (on the GPU machine, from scripts/device-check):
    ncu --profile-from-start off --clock-control none --metrics ... --csv --page raw \
        python3 device-probe.py PROBE

Each probe runs its kernels once to warm up, then once more between cudaProfilerStart
and cudaProfilerStop, so ncu sees exactly the measured launches (one CSV row each).

Probes:
  efficient_fp32  SDPA forced to the memory-efficient kernel, fp32, B=1 H=10 S=512 d=128,
                  causal: does fp32 attention use tensor cores with TF32 off?
  decode_gemm     bf16 F.linear x[m, 1280] @ W[6848, 1280]^T for m = 1, 2, 3, 4, 8, 16:
                  do decode-sized GEMMs (cuBLAS may pick GEMV) use tensor cores?
  gate_fp32       the MoE gate's fp32 GEMM x[512, 1280] @ W[64, 1280]^T (TF32 off).
  conv_fp32       an fp32 cuDNN convolution with PyTorch's default switches (matmul TF32
                  off, cuDNN TF32 on): Conv2d(64->128, 3x3) on [8, 64, 56, 56].
"""
import sys

import torch
import torch.nn.functional as F


def profiled(fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def efficient_fp32():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    q, k, v = (torch.randn(1, 10, 512, 128, device="cuda") for _ in range(3))

    def run():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    profiled(run)
    full = 4 * 1 * 10 * 512 * 512 * 128
    print(f"probe efficient_fp32: analytic full rectangle {full} FLOPs ({full // 2} MACs)")


def decode_gemm():
    ms = [1, 2, 3, 4, 8, 16]
    w = torch.randn(6848, 1280, device="cuda", dtype=torch.bfloat16)
    xs = [torch.randn(m, 1280, device="cuda", dtype=torch.bfloat16) for m in ms]

    def run():
        for x in xs:
            F.linear(x, w)

    profiled(run)
    for m in ms:
        print(f"probe decode_gemm: m={m} analytic {2 * m * 1280 * 6848} FLOPs")


def gate_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    w = torch.randn(64, 1280, device="cuda")
    x = torch.randn(512, 1280, device="cuda")
    profiled(lambda: F.linear(x, w))
    print(f"probe gate_fp32: analytic {2 * 512 * 1280 * 64} FLOPs")


def conv_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, said out loud
    x = torch.randn(8, 64, 56, 56, device="cuda")
    w = torch.randn(128, 64, 3, 3, device="cuda")
    profiled(lambda: F.conv2d(x, w, padding=1))
    print(f"probe conv_fp32: analytic {2 * 8 * 128 * 64 * 9 * 56 * 56} FLOPs")


PROBES = {"conv_fp32": conv_fp32, "efficient_fp32": efficient_fp32, "decode_gemm": decode_gemm, "gate_fp32": gate_fp32}

if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] not in PROBES:
        print(f"usage: device-probe.py {'|'.join(PROBES)}", file=sys.stderr)
        sys.exit(2)
    PROBES[sys.argv[1]]()

#!/usr/bin/env python3
"""What each scaled_dot_product_attention kernel hands back, as torch itself runs it.

An independent witness for the analytic attention core's op list (io_bytes and the
allocations of the outputs): every aten op that F.scaled_dot_product_attention reaches on
this machine, under torch's own TorchDispatchMode, with each output's shape, dtype,
device, bytes and whether it shares storage with an input. Inference (no grad), q/k/v laid
out as the vendor code makes them (projections viewed [B, S, H, d], transposed).

Usage: python3 sdpa-outputs.py [cuda|cpu]      (prints one block per case)
"""
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def describe(t, inputs):
    if not isinstance(t, torch.Tensor):
        return repr(t)
    storage = t.untyped_storage()
    alias = any(storage.data_ptr() == i.untyped_storage().data_ptr() and storage.nbytes() > 0 for i in inputs)
    return (f"{str(t.dtype).replace('torch.', '')}@{t.device.type}{list(t.shape)} "
            f"stride={list(t.stride())} bytes={t.numel() * t.element_size()} "
            f"storage={storage.nbytes()}{' ALIAS' if alias else ''}")


class Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.lines = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0]]
        self.lines.append(f"  {func}: in [" + "; ".join(
            f"{str(i.dtype).replace('torch.', '')}{list(i.shape)}" for i in inputs) + "]")
        for n, o in enumerate(outs):
            self.lines.append(f"    out{n}: {describe(o, inputs)}")
        return out


def case(name, device, dtype, b, h, sq, skv, d, causal):
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, skv, h, d, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, skv, h, d, device=device, dtype=dtype).transpose(1, 2)
    if sq == 1 and skv > 1:  # a decode step: keys from the cache cat, contiguous [B, H, S, d]
        k, v = k.contiguous(), v.contiguous()
    log = Log()
    with torch.no_grad(), log:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=causal)
    print(f"{name}: {dtype} B={b} H={h} S_q={sq} S_kv={skv} d={d} causal={causal}")
    print("\n".join(log.lines))


def main():
    args = sys.argv[1:]
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(args) > 1 or (args and args[0] not in ("cuda", "cpu")):
        print(f"sdpa-outputs: {' '.join(args)} is invalid: expected one of cuda, cpu, or nothing (cuda) (see --help)", file=sys.stderr)
        sys.exit(2)
    device = args[0] if args else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("sdpa-outputs: cuda is invalid here: torch sees no CUDA GPU on this machine "
              "(run it on the GPU machine, or give cpu)", file=sys.stderr)
        sys.exit(2)
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    bf16, fp32 = torch.bfloat16, torch.float32
    case("cudnn prefill", device, bf16, 1, 10, 512, 512, 128, True)
    case("cudnn decode", device, bf16, 1, 10, 1, 513, 128, False)
    case("cudnn batch 2", device, bf16, 2, 4, 40, 40, 64, True)
    case("flash d20 prefill", device, bf16, 1, 4, 40, 40, 20, True)
    case("flash d20 decode", device, bf16, 1, 4, 1, 41, 20, False)
    case("flash one token", device, bf16, 1, 10, 1, 1, 128, True)
    case("flash d6 batch 2", device, bf16, 2, 4, 40, 40, 6, True)
    case("efficient prefill", device, fp32, 1, 10, 512, 512, 128, True)
    case("efficient decode", device, fp32, 1, 10, 1, 513, 128, False)
    case("efficient d20 S40", device, fp32, 1, 4, 40, 40, 20, True)
    case("math d6 prefill", device, fp32, 1, 4, 40, 40, 6, True)
    case("math d6 decode", device, fp32, 1, 4, 1, 41, 6, False)
    case("math d6 batch 2", device, fp32, 2, 4, 40, 40, 6, True)


if __name__ == "__main__":
    main()

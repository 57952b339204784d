#!/usr/bin/env python3
"""The Python way of counting DeepSeek-OCR's decoder-layer FLOPs: the baseline that
`verify-decoder`'s whole-process time is compared with (issue 15: at most 0.25x of this).

Usage: flopcounter-baseline.py [--device D] [--dtype T] [--batch B] [--seq-len S]
                               [--attn sdpa|eager] [--seed N] [--init model|constructor]
                               [--json FILE]

Example (the default workload, timed as the benchmark times it):
    /usr/bin/time -f "%e s %M KB" .venv/bin/python scripts/flopcounter-baseline.py \\
        --json target/bench/flopcounter-baseline.json

One Python process does what a user with transformers would do for the seven layers that
`verify-decoder` checks by default (DeepSeek-OCR's language model, B=1, prefill S=512, fp32 on
the CPU), in verify-decoder's order: build the transformers module from the config in code (its
constructor, then the `_init_weights` that `PreTrainedModel.post_init` applies, so the weights
are random as in `DeepseekV2Model(config)`; `--init constructor` skips that pass, leaving the
router at zeros, so every token picks the same experts, and the experts `torch.empty`), draw a
random input, and run one forward under
`torch.no_grad()` and `torch.utils.flop_counter.FlopCounterMode(display=False)`. The configs and
the attention setup (causal mask, cache; the rotary tables computed inside the counted region,
as the vendor code does) come from reference/parity/parity.py, the independent transformers
check. Attention, dense and MoE decoder layers are transformers' Llama-style DeepSeek-OCR text
classes (DeepseekOcr2TextAttention / DecoderLayer), as in parity.py: DeepseekV2Attention is MLA.

Per layer it prints FlopCounterMode's total, the build seconds (module, weights, inputs, mask)
and the forward seconds (the counted region only); then the process's phases: interpreter
start, import of torch + transformers, all builds, all counted forwards, and the total since
the process started (not its exit: torch's interpreter shutdown, about 1-1.5 s on the 2-core
build machine, shows only in a wall time measured outside). `--json FILE` writes the same as "modelmeter.flopcounter-baseline/1":
    {"schema", "workload": {...}, "environment": {...},
     "layers": [{"layer", "hf_class", "fcm_flops", "build_s", "forward_s"}, ...],
     "phases": {"startup_s", "import_s", "build_s", "forward_s", "other_s", "total_s"}}
The benchmark runs it next to verify-decoder and compares the two processes' wall times.
DeepseekV2MLP reads 26,927,431,680 (6 * 512 * 1280 * 6848), as verify-decoder measures. On the
CPU FlopCounterMode does not see the SDPA kernel, so the attention rows read the projections
only; they are 65,536 below verify-decoder's (B * S * d), as transformers builds the rotary
tables with an elementwise product where the vendor code (and verify-decoder) has a matmul.

Exit status: 0 done, 2 usage error or torch/transformers missing (run scripts/setup-libtorch).
"""

import time

T0 = time.time()  # before anything heavy is imported: the script's own start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "fixtures", "deepseek-ocr", "config.json")  # what src/config.rs builds in
SCHEMA = "modelmeter.flopcounter-baseline/1"
INIT = "model"  # --init
sys.path.insert(0, os.path.join(ROOT, "reference", "parity"))
import parity  # noqa: E402  (stdlib only at import; torch comes with parity._import_hf)


def process_age():
    """Seconds since this process started (Linux /proc, 10 ms ticks); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


AGE_AT_T0 = process_age()


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="flopcounter-baseline.py",
        description=__doc__.split("\n\n")[0],
        epilog="example (the default workload, timed as the benchmark times it):\n"
        "  /usr/bin/time -f '%e s %M KB' .venv/bin/python scripts/flopcounter-baseline.py \\\n"
        "      --json target/bench/flopcounter-baseline.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default fp32")
    p.add_argument("--batch", type=int, default=1, help="B (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="prefill S (default 512)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention core (default sdpa)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default 0)")
    p.add_argument("--init", default="model", choices=("model", "constructor"),
                   help="weights: the model's _init_weights after the constructor (default), or the constructor's only")
    p.add_argument("--json", metavar="FILE", help=f"also write the results as {SCHEMA}")
    a = p.parse_args(argv)
    if a.batch < 1 or a.seq_len < 1:
        p.error("--batch and --seq-len must be at least 1")
    # Checked before the layers run (minutes), not when the results are written.
    if a.json is not None and (a.json == "" or os.path.isdir(a.json) or a.json.endswith("/")):
        p.error(f"--json {a.json!r} is not a file path (a folder, or empty); give a file path")
    return a


# --------------------------------------------------------------------------------------------
# The seven layers: (name as verify-decoder prints it, builder); a builder returns
# (module, inputs to call it with, rotary or None). Modules are built the transformers way.
# --------------------------------------------------------------------------------------------
def initialise(module, pretrained_class, config):
    """Constructor init, then (--init model) the family's `_init_weights` on every submodule:
    what `post_init` does for a model built from a config (the router's zeros and the experts'
    `torch.empty` become normal(0, initializer_range), as in `DeepseekV2Model(config)`)."""
    if INIT == "model":
        module.apply(pretrained_class(config)._init_weights)
    return module.eval()


def layer_builders(cfg, attn, batch, seq_len):
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextPreTrainedModel
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2PreTrainedModel

    h = cfg["hidden_size"]

    def x():
        return torch.randn(batch, seq_len, h)

    def v2(ctor, moe):
        c = parity.v2_config(cfg, moe=moe)
        return lambda: (initialise(ctor(c), DeepseekV2PreTrainedModel, c), (x(),), None)

    def rms_norm():
        c = parity.v2_config(cfg, moe=False)
        m = parity.DeepseekV2RMSNorm(h, eps=parity.cget(cfg, "rms_norm_eps", float, 1e-6))
        return initialise(m, DeepseekV2PreTrainedModel, c), (x(),), None

    def with_attention(layer_idx, mlp_kind):
        """The attention alone (mlp_kind None) or a decoder layer, set up as
        DeepseekOcr2TextModel.forward does it (parity.attention_setup)."""

        def build():
            tc = parity.text_config(cfg, attn, layer_idx, mlp_kind)
            Module = parity.DeepseekOcr2TextAttention if mlp_kind is None else parity.DeepseekOcr2TextDecoderLayer
            m = initialise(Module(tc, layer_idx=layer_idx), DeepseekOcr2TextPreTrainedModel, tc)
            tensors = {"input": x(), "position_ids": torch.arange(seq_len).expand(batch, -1)}
            hs, pos, cache, mask, rotary, _ = parity.attention_setup(cfg, tensors, "prefill", attn, layer_idx, tc, {})
            kw = dict(attention_mask=mask, position_ids=pos, cache=cache)
            if mlp_kind is not None:
                kw["use_cache"] = True
            return m, (hs, kw), rotary

        return build

    attn_name = "LlamaFlashAttention2" if attn == "sdpa" else "LlamaAttention"
    return [
        ("DeepseekV2MLP", v2(parity.DeepseekV2MLP, moe=False)),
        ("MoEGate", v2(parity.DeepseekV2TopkRouter, moe=True)),
        ("DeepseekV2MoE", v2(parity.DeepseekV2Moe, moe=True)),
        ("DeepseekV2RMSNorm", rms_norm),
        # DeepSeek-OCR: first_k_dense_replace 1, so layer 0 is dense and layer 1 MoE.
        ("DeepseekV2DecoderLayer_dense", with_attention(0, "dense")),
        ("DeepseekV2DecoderLayer_moe", with_attention(1, "sparse")),
        (attn_name, with_attention(0, None)),
    ]


def place(module, inputs, rotary, device, dtype):
    """Module and inputs on the device in the dtype (a no-op for the CPU in fp32)."""

    def to(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

    inputs = tuple({k: to(v) for k, v in a.items()} if isinstance(a, dict) else to(a) for a in inputs)
    return module.to(device=device, dtype=dtype), inputs, None if rotary is None else rotary.to(device=device)


def run_counted(module, inputs, rotary):
    """One forward under FlopCounterMode; the rotary tables are computed inside it."""
    with FlopCounterMode(display=False) as fcm:
        if rotary is None:
            module(*inputs)
        else:
            hs, kw = inputs
            module(hs, position_embeddings=rotary(hs, kw["position_ids"]), **kw)
    return int(fcm.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv):
    global torch, FlopCounterMode, INIT
    args = parse_args(argv)
    INIT = args.init
    t_import = time.time()
    try:
        parity._import_hf()
    except Exception as e:  # ImportError when missing; RuntimeError when transformers' dispatch moved
        hint = "; run scripts/setup-libtorch (torch, transformers, safetensors into .venv/)" \
            " and use .venv/bin/python" if isinstance(e, ImportError) else ""
        print(f"flopcounter-baseline.py: cannot set up torch/transformers: {type(e).__name__}: {e}{hint}",
              file=sys.stderr)
        return 2
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import transformers

    torch.use_deterministic_algorithms(False)  # parity turns it on; keep torch's defaults here
    import_s = time.time() - t_import
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except Exception as e:
        print(f"flopcounter-baseline.py: --device {args.device!r} is unusable: {e}", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with open(CONFIG) as f:
        cfg = json.load(f)["language_config"]
    torch.manual_seed(args.seed)

    rows = []
    print(f"{'layer':<30}{'FlopCounterMode FLOPs':>24}{'build s':>10}{'forward s':>11}")
    with torch.no_grad():
        for name, build in layer_builders(cfg, args.attn, args.batch, args.seq_len):
            t = time.time()
            module, inputs, rotary = place(*build(), device, dtype)
            sync(device)
            t_built = time.time()
            flops = run_counted(module, inputs, rotary)
            sync(device)
            t_done = time.time()
            rows.append(dict(layer=name, hf_class=type(module).__name__, fcm_flops=flops,
                             build_s=t_built - t, forward_s=t_done - t_built))
            print(f"{name:<30}{flops:>24,}{t_built - t:>10.3f}{t_done - t_built:>11.3f}", flush=True)
            del module, inputs, rotary

    total = time.time() - T0 + (AGE_AT_T0 or 0.0)
    phases = dict(startup_s=AGE_AT_T0, import_s=import_s, build_s=sum(r["build_s"] for r in rows),
                  forward_s=sum(r["forward_s"] for r in rows))
    phases["other_s"] = total - sum(v or 0.0 for v in phases.values())
    phases["total_s"] = total
    print("phases: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in phases.items() if v is not None)
          + " (startup: interpreter start to the script's first line, 10 ms ticks; exit not included)")
    if args.json:
        doc = {
            "schema": SCHEMA,
            "workload": dict(config="deepseek-ocr-v1-base", batch=args.batch, seq_len=args.seq_len, phase="prefill",
                             dtype=args.dtype, device=str(device), attn=args.attn, seed=args.seed, init=args.init),
            "environment": dict(python=sys.version.split()[0], torch=torch.__version__,
                                transformers=transformers.__version__, threads=torch.get_num_threads()),
            "layers": rows,
            "phases": phases,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

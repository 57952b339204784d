#!/usr/bin/env python3
"""Independent parity check of modelmeter-reference cases against Hugging Face transformers.

Usage: parity.py CASE_DIR [CASE_DIR ...]
       parity.py --oracle DEVICE DTYPE CASE_DIR [CASE_DIR ...]
       parity.py --known-differences

With --oracle (cpu, cuda or cuda:N; fp32, bf16 or fp16) each case runs on that device in that
dtype under torch.utils.flop_counter.FlopCounterMode, and its line also carries "fcm_total"
(FlopCounterMode's total) and "fcm_ops" ({"aten::mm": FLOPs, ...}); "ok" is then left to the
caller, which knows the bound for the dtype. The rotary table of attention and decoder cases is
computed inside the counted region (the vendor code computes it inside the attention).

Each CASE_DIR holds `case.json` and `case.safetensors` written by the Rust reference crate
(format: see README.md next to this file). For every case this script builds the matching
*independent* transformers module (DeepSeek-V2 RMSNorm / MLP / TopkRouter / Moe and the MLA
attention and decoder layer from `transformers.models.deepseek_v2`, the V3 TopkRouter / MoE /
MLA attention / decoder layer from `transformers.models.deepseek_v3`, Llama-style attention
and decoder layer from `transformers.models.deepseek_ocr2`), loads the case's weights into it,
runs it in fp32 on CPU in eval mode under `torch.no_grad()`, and prints one JSON line per case:

    {"case": DIR, "module": KIND, "rel_err": FLOAT|null, "ok": BOOL, ...}

rel_err = ||out - ref||_F / ||ref||_F (computed in float64), ok = rel_err < 1e-5. For
`moe_gate`, the selected expert indices must match exactly after sorting each row by index, and
rel_err is measured on the weights permuted the same way.

Exit status: 0 all cases ok, 1 some case failed, 2 usage error or a case that could not be
loaded/run (a message naming the case goes to stderr; the remaining cases still run).

Where transformers differs from the vendor code, the line names the adapter that bridged it
("adapters": [...]) or the case is rejected with the reason. --known-differences probes each
named difference on the installed transformers and prints one JSON line per difference
(exit 0 when all are present, 1 when one is gone and its adapter is stale).

Targets transformers 5.24 and torch 2.11; needs only torch, transformers and safetensors.
Nothing is downloaded: configs are built in code, never with `from_pretrained`.
"""

import json
import math
import os
import sys
import warnings

# No network, ever: configs are built in code, but make sure nothing tries the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TOL = 1e-5
# (device, dtype) in --oracle mode; None otherwise.
ORACLE = None
# FlopCounterMode's counts of the last counted region (--oracle mode).
FCM = {}
KINDS = ("rms_norm", "mlp", "moe_gate", "moe", "attention", "decoder_layer")
# Case tensors that are inputs/references rather than module parameters.
IO_KEYS = {
    "input",
    "output",
    "topk_idx",
    "topk_weight",
    "position_ids",
    "attention_mask",
    "past_key",
    "past_value",
    "context",
    "context_position_ids",
    "tokens_per_expert",
}
INDEX_KEYS = ("topk_idx", "position_ids", "context_position_ids", "tokens_per_expert")
# Anything at or below this in the case's additive mask counts as "masked out".
MASKED_BELOW = -1.0e4


class CaseError(Exception):
    """The case could not be loaded or run (exit status 2)."""


_MISSING = object()


def _die_usage(msg):
    print(f"parity.py: {msg}", file=sys.stderr)
    print("usage: parity.py [--oracle DEVICE DTYPE] CASE_DIR [CASE_DIR ...] | --known-differences", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------
# Imports (deferred so that `--help` and usage errors are instant)
# --------------------------------------------------------------------------------------------
def _import_hf():
    global torch, load_file, DeepseekV2Config, DeepseekV2RMSNorm, DeepseekV2MLP, DeepseekV2TopkRouter
    global DeepseekV2Moe, DeepseekOcr2TextConfig, DeepseekOcr2TextAttention, DeepseekOcr2TextRotaryEmbedding
    global DeepseekOcr2TextDecoderLayer, DynamicCache, create_causal_mask
    global DeepseekV2Attention, DeepseekV2RotaryEmbedding, DeepseekV2DecoderLayer
    global DeepseekV3Config, DeepseekV3Attention, DeepseekV3RotaryEmbedding, DeepseekV3DecoderLayer
    global DeepseekV3TopkRouter, DeepseekV3MoE
    import torch  # noqa: F401
    from safetensors.torch import load_file  # noqa: F401
    import transformers
    from transformers.cache_utils import DynamicCache  # noqa: F401
    from transformers.masking_utils import create_causal_mask  # noqa: F401
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config  # noqa: F401
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (  # noqa: F401
        DeepseekV2Attention,
        DeepseekV2DecoderLayer,
        DeepseekV2MLP,
        DeepseekV2Moe,
        DeepseekV2RMSNorm,
        DeepseekV2RotaryEmbedding,
        DeepseekV2TopkRouter,
    )
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config  # noqa: F401
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: F401
        DeepseekV3Attention,
        DeepseekV3DecoderLayer,
        DeepseekV3MoE,
        DeepseekV3RotaryEmbedding,
        DeepseekV3TopkRouter,
    )
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig  # noqa: F401
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (  # noqa: F401
        DeepseekOcr2TextAttention,
        DeepseekOcr2TextDecoderLayer,
        DeepseekOcr2TextRotaryEmbedding,
    )
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transformers.utils.logging.set_verbosity_error()
    if not transformers.__version__.startswith("5."):
        print(f"parity.py: warning: written for transformers 5.24, found {transformers.__version__}", file=sys.stderr)

    # Pin the dispatch this script relies on: "eager" experts = the module's own per-expert loop,
    # "eager"/"sdpa" attention = the reference eager function / torch SDPA wrapper.
    sentinel = object()
    if ALL_EXPERTS_FUNCTIONS.get_interface("eager", sentinel) is not sentinel:
        raise RuntimeError("transformers no longer maps experts_implementation='eager' to the module's own forward")
    if ALL_ATTENTION_FUNCTIONS.get_interface("eager", sentinel) is not sentinel:
        raise RuntimeError("transformers no longer maps attn_implementation='eager' to the eager fallback")
    if ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", sentinel) is not sdpa_attention_forward:
        raise RuntimeError("transformers no longer maps attn_implementation='sdpa' to sdpa_attention_forward")

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------------------------
# Case loading
# --------------------------------------------------------------------------------------------
def load_case(case_dir):
    jpath = os.path.join(case_dir, "case.json")
    spath = os.path.join(case_dir, "case.safetensors")
    if not os.path.isdir(case_dir):
        raise CaseError("not a directory")
    for p in (jpath, spath):
        if not os.path.isfile(p):
            raise CaseError(f"missing {os.path.basename(p)}")
    try:
        with open(jpath) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CaseError(f"cannot parse case.json: {e}") from e
    if not isinstance(meta, dict):
        raise CaseError("case.json is not a JSON object")
    kind = meta.get("module")
    if kind not in KINDS:
        raise CaseError(f"case.json: unknown module {kind!r} (expected one of {', '.join(KINDS)})")
    phase = meta.get("phase", "prefill")
    if phase not in ("prefill", "decode"):
        raise CaseError(f"case.json: phase must be 'prefill' or 'decode', got {phase!r}")
    attn = meta.get("attn", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise CaseError(f"case.json: attn must be 'sdpa' or 'eager', got {attn!r}")
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CaseError("case.json: 'config' must be an object")
    form = meta.get("mla_form")
    if is_mla(cfg):
        form = form or "naive"
        if form not in ("naive", "absorb"):
            raise CaseError(f"case.json: mla_form must be 'naive' or 'absorb', got {form!r}")
    elif form is not None:
        raise CaseError("case.json: mla_form is set but the config has no kv_lora_rank (not MLA)")
    try:
        tensors = load_file(spath, device="cpu")
    except Exception as e:  # safetensors raises several types
        raise CaseError(f"cannot read case.safetensors: {e}") from e
    for name, t in tensors.items():
        want = torch.int64 if name in INDEX_KEYS else torch.float32
        if t.dtype != want:
            raise CaseError(f"tensor {name!r} has dtype {t.dtype}, expected {want}")
    return kind, phase, attn, form, cfg, tensors


def cget(cfg, key, typ, default=_MISSING):
    """Read a config value with a type check (JSON ints are accepted for floats)."""
    if key not in cfg or cfg[key] is None:
        if default is _MISSING:
            raise CaseError(f"config key {key!r} is required for this module")
        return default
    v = cfg[key]
    if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if typ is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if typ is bool and isinstance(v, bool):
        return v
    if typ is str and isinstance(v, str):
        return v
    raise CaseError(f"config key {key!r} should be {typ.__name__}, got {v!r}")


def need(tensors, name, ndim=None):
    if name not in tensors:
        raise CaseError(f"tensor {name!r} missing from case.safetensors")
    t = tensors[name]
    if ndim is not None and t.dim() != ndim:
        raise CaseError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {ndim} dims")
    return t


def place(t):
    """A case tensor on the oracle's device (floats also in its dtype); as is otherwise."""
    if ORACLE is None:
        return t
    device, dtype = ORACLE
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def place_module(m):
    if ORACLE is None:
        return m
    device, dtype = ORACLE
    return m.to(device=device, dtype=dtype)


class counting:
    """The counted region: FlopCounterMode in --oracle mode (its counts go to FCM), nothing
    otherwise."""

    def __enter__(self):
        self.mode = None
        if ORACLE is not None:
            from torch.utils.flop_counter import FlopCounterMode

            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is None:
            return False
        self.mode.__exit__(*exc)
        if exc[0] is None:
            FCM.clear()
            FCM["total"] = int(self.mode.get_total_flops())
            ops = self.mode.get_flop_counts().get("Global", {})
            FCM["ops"] = {str(op).replace("aten.", "aten::", 1): int(n) for op, n in ops.items()}
        return False


# --------------------------------------------------------------------------------------------
# Configs (built in code; HF key names)
# --------------------------------------------------------------------------------------------
def is_mla(cfg):
    """An MLA config (DeepSeek-V2/V2-Lite/V3): it sets kv_lora_rank."""
    return cfg.get("kv_lora_rank") is not None


# Why a routing has no transformers 5.24 class (see README "Routers").
NO_ROUTER = (
    "DeepseekV2TopkRouter scores with softmax only and implements greedy and group_limited_greedy, "
    "with no noaux_tc branch (modeling_deepseek_v2.py:101-115); DeepseekV3TopkRouter always scores "
    "with sigmoid + e_score_correction_bias, noaux_tc-style, and reads neither topk_method nor "
    "scoring_func (modeling_deepseek_v3.py:133-158)"
)


def router_family(cfg):
    """The transformers family whose router implements the case's routing: "v2" for softmax
    with greedy or group_limited_greedy, "v3" for sigmoid with noaux_tc. Any other vendor
    combination has no transformers counterpart: the case is rejected with the reason."""
    sf = cget(cfg, "scoring_func", str, "softmax")
    tm = cget(cfg, "topk_method", str, "greedy")
    if sf == "softmax" and tm in ("greedy", "group_limited_greedy"):
        return "v2"
    if (sf, tm) == ("sigmoid", "noaux_tc"):
        return "v3"
    raise CaseError(f"no transformers router implements scoring_func {sf!r} with topk_method {tm!r}: {NO_ROUTER}")


def config_family(cfg):
    """V3 for a config that routes like DeepSeek-V3, V2 otherwise (dense layers, MLA
    attention of a config without experts)."""
    if cfg.get("n_routed_experts") is None:
        return "v2"
    try:
        return router_family(cfg)
    except CaseError:
        return "v2"


def moe_kwargs(cfg, required, family="v2"):
    d = {"hidden_act": cget(cfg, "hidden_act", str, "silu")}
    if required:
        if router_family(cfg) != family:
            raise CaseError(
                f"the case routes like DeepSeek-{router_family(cfg).upper()}, not like this {family} module"
            )
        d.update(
            n_routed_experts=cget(cfg, "n_routed_experts", int),
            num_experts_per_tok=cget(cfg, "num_experts_per_tok", int),
            # vendor `n_shared_experts: null` (no shared experts) == HF zero-width shared MLP
            n_shared_experts=cget(cfg, "n_shared_experts", int, 0),
            moe_intermediate_size=cget(cfg, "moe_intermediate_size", int),
            routed_scaling_factor=cget(cfg, "routed_scaling_factor", float, 1.0),
            # DeepseekV2Config keeps the key (nothing reads it); DeepseekV3TopkRouter reads it.
            norm_topk_prob=cget(cfg, "norm_topk_prob", bool, False),
        )
        if family == "v2":
            d["topk_method"] = cget(cfg, "topk_method", str, "greedy")
            if d["topk_method"] == "group_limited_greedy":
                d["n_group"] = cget(cfg, "n_group", int)
                d["topk_group"] = cget(cfg, "topk_group", int)
        else:
            # DeepseekV3Config has no topk_method / scoring_func: V3's router is always noaux_tc.
            d["n_group"] = cget(cfg, "n_group", int)
            d["topk_group"] = cget(cfg, "topk_group", int)
    return d


def yarn_get_mscale(scale, mscale=1.0):
    """The vendor's (and transformers') yarn_get_mscale."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg, adapters):
    """transformers 5 `rope_parameters` for the case's rotary: plain, or the vendor's YaRN
    (`rope_scaling` with `type: yarn`), key for key."""
    theta = cget(cfg, "rope_theta", float, 10000.0)
    ys = cfg.get("rope_scaling")
    if ys is None:
        return {"rope_type": "default", "rope_theta": theta}
    if not isinstance(ys, dict) or ys.get("type", ys.get("rope_type")) != "yarn":
        raise CaseError(f"rope_scaling {ys!r}: only YaRN (the DeepSeek-V2/V3 scaling) is supported")
    factor = cget(ys, "factor", float)
    mscale = cget(ys, "mscale", float, 1.0)
    mscale_all_dim = cget(ys, "mscale_all_dim", float, 0.0)
    rp = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": cget(ys, "original_max_position_embeddings", int, 4096),
        "beta_fast": cget(ys, "beta_fast", float, 32.0),
        "beta_slow": cget(ys, "beta_slow", float, 1.0),
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }
    # The factor the cos/sin tables are multiplied by. The vendor always divides the two
    # mscales; transformers does so only when both are non-zero, else uses
    # yarn_get_mscale(factor) (modeling_rope_utils.py:436-440). They differ only when
    # mscale_all_dim is 0 and mscale is not 1 (no DeepSeek checkpoint): then the vendor's
    # value is passed explicitly, as a named adapter.
    vendor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    hf = vendor if (mscale and mscale_all_dim) else yarn_get_mscale(factor)
    if vendor != hf:
        rp["attention_factor"] = vendor
        adapters.append("yarn_attention_factor")
    return rp


def mla_classes(family):
    """(config, attention, rotary, decoder layer) classes of a transformers family."""
    if family == "v2":
        return DeepseekV2Config, DeepseekV2Attention, DeepseekV2RotaryEmbedding, DeepseekV2DecoderLayer
    return DeepseekV3Config, DeepseekV3Attention, DeepseekV3RotaryEmbedding, DeepseekV3DecoderLayer


def mla_config(cfg, family, attn, layer_idx, mlp_kind, adapters):
    """DeepseekV2Config / DeepseekV3Config for an MLA case. `mlp_kind` None: the attention
    alone. The layer at `layer_idx` is made MoE or dense with first_k_dense_replace (HF
    picks the MLP by that alone, ignoring moe_layer_freq)."""
    heads = cget(cfg, "num_attention_heads", int)
    sparse = mlp_kind == "sparse"
    kw = dict(
        hidden_size=cget(cfg, "hidden_size", int),
        num_attention_heads=heads,
        # MLA decompresses a key and a value per head: HF's repeat_kv must be a no-op
        # (the vendor MLA never reads num_key_value_heads).
        num_key_value_heads=heads,
        q_lora_rank=cget(cfg, "q_lora_rank", int, None),
        kv_lora_rank=cget(cfg, "kv_lora_rank", int),
        qk_nope_head_dim=cget(cfg, "qk_nope_head_dim", int),
        qk_rope_head_dim=cget(cfg, "qk_rope_head_dim", int),
        v_head_dim=cget(cfg, "v_head_dim", int),
        attention_bias=cget(cfg, "attention_bias", bool, False),
        attention_dropout=0.0,
        rms_norm_eps=cget(cfg, "rms_norm_eps", float, 1e-6),
        rope_parameters=rope_parameters(cfg, adapters),
        num_hidden_layers=layer_idx + 1,
        first_k_dense_replace=0 if sparse else layer_idx + 1,
    )
    if cfg.get("max_position_embeddings") is not None:
        kw["max_position_embeddings"] = cget(cfg, "max_position_embeddings", int)
    if mlp_kind == "dense":
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    elif "intermediate_size" in cfg:
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    kw.update(moe_kwargs(cfg, sparse, family))
    if family == "v2":
        kw["mlp_bias"] = False
    else:
        kw["rope_interleave"] = True  # the vendor's layout of the rotary dims (its default)
    Config = mla_classes(family)[0]
    try:
        c = Config(**kw)
    except Exception as e:
        raise CaseError(f"{Config.__name__} rejected the case config: {e}") from e
    c._attn_implementation = attn
    c._experts_implementation = "eager"
    return c


def v3_moe_config(cfg):
    h = cget(cfg, "hidden_size", int)
    heads = cget(cfg, "num_attention_heads", int, 1)
    kw = dict(hidden_size=h, num_attention_heads=heads if h % heads == 0 else 1)
    if "intermediate_size" in cfg:
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    kw.update(moe_kwargs(cfg, True, "v3"))
    try:
        c = DeepseekV3Config(**kw)
    except Exception as e:
        raise CaseError(f"DeepseekV3Config rejected the case config: {e}") from e
    c._experts_implementation = "eager"
    c._attn_implementation = "eager"
    return c


def v2_config(cfg, moe):
    h = cget(cfg, "hidden_size", int)
    heads = cget(cfg, "num_attention_heads", int, 1)
    kw = dict(hidden_size=h, num_attention_heads=heads if h % heads == 0 else 1, mlp_bias=False)
    if "intermediate_size" in cfg:
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    kw.update(moe_kwargs(cfg, moe, "v2"))
    try:
        c = DeepseekV2Config(**kw)
    except Exception as e:
        raise CaseError(f"DeepseekV2Config rejected the case config: {e}") from e
    c._experts_implementation = "eager"  # the module's own per-expert loop, no grouped_mm etc.
    c._attn_implementation = "eager"
    return c


def text_config(cfg, attn, layer_idx, mlp_kind):
    h = cget(cfg, "hidden_size", int)
    heads = cget(cfg, "num_attention_heads", int)
    kv = cget(cfg, "num_key_value_heads", int, heads)
    if heads <= 0 or h % heads:
        raise CaseError(f"hidden_size {h} is not a multiple of num_attention_heads {heads}")
    if kv <= 0 or heads % kv:
        raise CaseError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = cget(cfg, "head_dim", int, h // heads)
    if head_dim != h // heads:
        # DeepseekOcr2TextConfig.__post_init__ forces head_dim = hidden_size // num_attention_heads
        # (as does the vendor's LlamaAttention), so such a config has no HF counterpart.
        raise CaseError(
            f"head_dim {head_dim} != hidden_size // num_attention_heads = {h // heads}; "
            "the HF DeepSeek-OCR text config cannot express that"
        )
    sparse = mlp_kind == "sparse"
    kw = dict(
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        attention_bias=cget(cfg, "attention_bias", bool, False),
        attention_dropout=0.0,
        rms_norm_eps=cget(cfg, "rms_norm_eps", float, 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": cget(cfg, "rope_theta", float, 10000.0)},
        num_hidden_layers=layer_idx + 1,
        mlp_layer_types=[mlp_kind or "dense"] * (layer_idx + 1),
        mlp_bias=False,
    )
    if mlp_kind == "dense":
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    elif "intermediate_size" in cfg:
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    mk = moe_kwargs(cfg, sparse, "v2")
    mk.pop("norm_topk_prob", None)  # DeepseekOcr2TextConfig has no such key (see README)
    kw.update(mk)
    try:
        c = DeepseekOcr2TextConfig(**kw)
    except Exception as e:
        raise CaseError(f"DeepseekOcr2TextConfig rejected the case config: {e}") from e
    if c.head_dim != head_dim:
        raise CaseError(f"HF config derived head_dim {c.head_dim}, case says {head_dim}")
    c._attn_implementation = attn
    c._experts_implementation = "eager"
    return c


# --------------------------------------------------------------------------------------------
# Weights: map vendor names/layouts to the HF module, load strictly
# --------------------------------------------------------------------------------------------
def fuse_experts(params, prefix, n_experts, n_shared, h):
    """Vendor `experts.{i}.{gate,up,down}_proj.weight` -> HF fused `experts.gate_up_proj`
    [E, 2m, h] (gate rows first, then up: HF splits with .chunk(2)) and `experts.down_proj` [E, h, m].
    Also supplies zero-width shared-expert weights when n_shared_experts == 0 (HF always builds
    the shared MLP, with width m * n_shared)."""
    out = dict(params)
    gate_up, down, missing = [], [], []
    for i in range(n_experts):
        names = [f"{prefix}experts.{i}.{p}_proj.weight" for p in ("gate", "up", "down")]
        if any(n not in out for n in names):
            missing += [n for n in names if n not in out]
            continue
        g, u, d = (out.pop(n) for n in names)
        if g.shape != u.shape:
            raise CaseError(f"{names[0]} {tuple(g.shape)} and {names[1]} {tuple(u.shape)} differ in shape")
        gate_up.append(torch.cat([g, u], dim=0))
        down.append(d)
    if missing:
        raise CaseError(f"missing routed-expert weights: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    try:
        out[f"{prefix}experts.gate_up_proj"] = torch.stack(gate_up).contiguous()
        out[f"{prefix}experts.down_proj"] = torch.stack(down).contiguous()
    except RuntimeError as e:
        raise CaseError(f"routed experts have inconsistent shapes: {e}") from e
    if n_shared == 0:
        for p, shape in (("gate", (0, h)), ("up", (0, h)), ("down", (h, 0))):
            out.setdefault(f"{prefix}shared_experts.{p}_proj.weight", torch.zeros(shape))
    return out


def load_module(module, state, what):
    """Strict, shape-checked load that also replaces the meta-device placeholders."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        msg = str(e).replace("\n", " ").replace("\t", " ")
        raise CaseError(f"loading weights into {what} failed (case names mapped to HF names): {msg}") from e
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise CaseError(f"{what}: {name} was not provided")
        if t.dtype != torch.float32:
            raise CaseError(f"{what}: {name} ended up as {t.dtype}")
    module.eval()
    return module


def build(ctor):
    """Construct on the meta device (no wasted random init); weights come from the case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element shared experts warn on init
        with torch.device("meta"):
            return ctor()


# --------------------------------------------------------------------------------------------
# Documented adapter: vendor norm_topk_prob, absent from the HF DeepSeek-V2 router
# --------------------------------------------------------------------------------------------
def apply_norm_topk_adapter(router, top_k, norm_topk_prob, rsf, adapters):
    """HF `DeepseekV2TopkRouter` deletes `norm_topk_prob` and always returns
    `topk_scores * routed_scaling_factor`. The vendor MoEGate, when top_k > 1 and
    norm_topk_prob, returns `topk_scores / (sum + 1e-20) * routed_scaling_factor`. We keep HF's
    logits and indices and recompute only the weights the vendor way, from HF's own softmax.
    With group_limited_greedy both zero the experts outside the chosen groups before the
    top-k (HF's masked_fill at modeling_deepseek_v2.py:114, the vendor's likewise), so a
    top-k wider than the chosen groups picks some at weight 0: HF's weight of 0 marks them,
    and they stay 0 here (an unmasked expert whose softmax is 0 is 0 either way)."""
    if not (top_k > 1 and norm_topk_prob):
        return
    orig = router.forward

    def forward(hidden_states):
        router_logits, hf_weights, topk_indices = orig(hidden_states)
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        topk = scores.gather(-1, topk_indices).masked_fill(hf_weights == 0, 0.0)
        denominator = topk.sum(dim=-1, keepdim=True) + 1e-20
        return router_logits, topk / denominator * rsf, topk_indices

    router.forward = forward
    adapters.append("norm_topk_prob")


def v3_fill_sensitive_rows(router, router_logits):
    """Tokens whose experts would differ between HF's and the vendor's fill of the experts
    outside the chosen groups. HF masks them with -inf (modeling_deepseek_v3.py:151), the
    vendor `MoEGate` (noaux_tc) with 0.0; the two top-k choices differ exactly when fewer
    than top_k in-group choice scores (sigmoid + e_score_correction_bias) are positive, as
    the vendor then picks masked experts at 0.0. Recomputed from HF's own logits, the HF
    way."""
    n_group, n_exp = router.num_group, router.num_experts
    choice = router_logits.sigmoid() + router.e_score_correction_bias
    group_scores = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    in_group = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp).bool()
    positive = ((choice > 0) & in_group).sum(dim=-1)
    return int((positive < router.top_k).sum().item())


def apply_v3_router_adapters(router, adapters, extra):
    """`DeepseekV3TopkRouter` divides the top-k weights by their sum whenever
    norm_topk_prob is set (modeling_deepseek_v3.py:154-156); the vendor only when
    top_k > 1. With top_k == 1 and norm_topk_prob the adapter keeps HF's logits and indices
    and recomputes the weight the vendor way: `sigmoid(logits).gather(idx) *
    routed_scaling_factor`. Every call also counts the tokens where HF's -inf fill could
    choose other experts than the vendor's 0.0 (`v3_fill_sensitive_rows`)."""
    orig = router.forward
    top1 = router.top_k == 1 and bool(router.norm_topk_prob)
    if top1:
        adapters.append("v3_norm_topk_prob_top1")
    extra.setdefault("v3_fill_sensitive_rows", 0)

    def forward(hidden_states):
        router_logits, topk_weights, topk_indices = orig(hidden_states)
        extra["v3_fill_sensitive_rows"] += v3_fill_sensitive_rows(router, router_logits)
        if top1:
            topk_weights = router_logits.sigmoid().gather(1, topk_indices) * router.routed_scaling_factor
        return router_logits, topk_weights, topk_indices

    router.forward = forward


def count_routing(router):
    """Wraps `router.forward` (after its adapters) to count the tokens transformers'
    router sends to each expert; returns the list each call's counts go to."""
    orig = router.forward
    calls = []

    def forward(hidden_states):
        router_logits, topk_weights, topk_indices = orig(hidden_states)
        experts = router_logits.shape[-1]
        calls.append(torch.bincount(topk_indices.flatten().cpu(), minlength=experts))
        return router_logits, topk_weights, topk_indices

    router.forward = forward
    return calls


def compare_routing(calls, tensors, extra):
    """`routed_count_mismatched_experts`: on how many experts transformers' router and the
    reference's gate (the exported `tokens_per_expert`) disagree about the number of tokens
    routed there, over the counted call. Not part of `ok`: the output comparison is the
    check; this says whether the per-expert counts agree (two flips that cancel leave them
    equal), which explains a MoE output that differs because its routing flipped."""
    ref = tensors.get("tokens_per_expert")
    if ref is None:  # not a MoE: nothing routed
        return
    if len(calls) != 1:
        raise CaseError(f"internal: the router ran {len(calls)} times in the counted call, not once")
    hf = calls[0]
    if tuple(hf.shape) != tuple(ref.shape):
        raise CaseError(f"HF routes over {hf.shape[0]} experts, the reference over {ref.shape[0]}")
    extra["routed_count_mismatched_experts"] = int((hf != ref.long()).sum().item())


def adapt_router(router, family, cfg, adapters, extra):
    """The named adapters of the family's router (see README)."""
    if family == "v2":
        apply_norm_topk_adapter(
            router,
            router.top_k,
            cget(cfg, "norm_topk_prob", bool, False),
            router.routed_scaling_factor,
            adapters,
        )
    else:
        apply_v3_router_adapters(router, adapters, extra)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
def rel_err(out, ref):
    if tuple(out.shape) != tuple(ref.shape):
        raise CaseError(f"HF output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def finite_or_none(x):
    return x if (x is not None and math.isfinite(x)) else None


# --------------------------------------------------------------------------------------------
# Per-kind runners; each returns (hf_output, reference, extra_fields)
# --------------------------------------------------------------------------------------------
def split(tensors):
    return {k: v for k, v in tensors.items() if k not in IO_KEYS}


def run_rms_norm(cfg, tensors, adapters):
    h = cget(cfg, "hidden_size", int)
    eps = cget(cfg, "rms_norm_eps", float)
    m = build(lambda: DeepseekV2RMSNorm(h, eps=eps))
    m = place_module(load_module(m, split(tensors), "DeepseekV2RMSNorm"))
    x = place(need(tensors, "input"))
    with counting():
        out = m(x)
    return out, need(tensors, "output"), {}


def run_mlp(cfg, tensors, adapters):
    c = v2_config(cfg, moe=False)
    width = cget(cfg, "mlp_width", int, None)
    if width is None:
        width = cget(cfg, "intermediate_size", int)
    m = build(lambda: DeepseekV2MLP(c, intermediate_size=width))
    m = place_module(load_module(m, split(tensors), "DeepseekV2MLP"))
    x = place(need(tensors, "input"))
    with counting():
        out = m(x)
    return out, need(tensors, "output"), {}


def moe_setup(cfg):
    """(family, config, router class, MoE class) for the case's routing."""
    family = router_family(cfg)
    if family == "v2":
        return family, v2_config(cfg, moe=True), DeepseekV2TopkRouter, DeepseekV2Moe
    return family, v3_moe_config(cfg), DeepseekV3TopkRouter, DeepseekV3MoE


def run_moe_gate(cfg, tensors, adapters):
    family, c, Router, _ = moe_setup(cfg)
    extra = {"hf_class": Router.__name__}
    m = build(lambda: Router(c))
    m = place_module(load_module(m, split(tensors), Router.__name__))
    adapt_router(m, family, cfg, adapters, extra)
    x = place(need(tensors, "input"))
    with counting():
        _, w, idx = m(x)
    w, idx = w.float().cpu(), idx.cpu()
    ref_idx, ref_w = need(tensors, "topk_idx", 2), need(tensors, "topk_weight", 2)
    if tuple(idx.shape) != tuple(ref_idx.shape) or tuple(ref_w.shape) != tuple(ref_idx.shape):
        raise CaseError(
            f"HF topk shape {tuple(idx.shape)} vs reference topk_idx {tuple(ref_idx.shape)} / "
            f"topk_weight {tuple(ref_w.shape)}"
        )
    # Order-insensitive: sort each row by expert index, permute the weights alongside.
    idx_s, perm = idx.sort(dim=-1)
    ref_idx_s, ref_perm = ref_idx.sort(dim=-1)
    w_s, ref_w_s = w.gather(-1, perm), ref_w.gather(-1, ref_perm)
    mismatched_rows = int((idx_s != ref_idx_s).any(dim=-1).sum().item())
    extra.update(idx_match=mismatched_rows == 0, idx_mismatched_rows=mismatched_rows)
    return w_s, ref_w_s, extra


def run_moe(cfg, tensors, adapters):
    family, c, _, Moe = moe_setup(cfg)
    extra = {"hf_class": Moe.__name__}
    m = build(lambda: Moe(c))
    state = fuse_experts(split(tensors), "", c.n_routed_experts, c.n_shared_experts, c.hidden_size)
    m = place_module(load_module(m, state, Moe.__name__))
    assert m.experts.config._experts_implementation == "eager"
    adapt_router(m.gate, family, cfg, adapters, extra)
    routed = count_routing(m.gate)
    x = place(need(tensors, "input"))
    with counting():
        out = m(x)
    compare_routing(routed, tensors, extra)
    return out, need(tensors, "output"), extra


def mask_pattern_check(case_mask, hf_mask, extra):
    """Compare which positions the case's additive mask masks out with HF's own causal mask."""
    if case_mask is None:
        return True
    if case_mask.dim() != 4:
        raise CaseError(f"attention_mask has shape {tuple(case_mask.shape)}, expected [B, 1, S_q, S_kv]")
    allowed = case_mask == 0
    masked = case_mask <= MASKED_BELOW
    if not bool((allowed | masked).all()):
        extra["mask_note"] = "attention_mask has entries that are neither 0 nor very negative"
        return False
    if hf_mask is None:  # HF relies on is_causal / full attention: every query sees its causal prefix
        raise CaseError("internal: HF produced no eager mask")
    hf_allowed = hf_mask if hf_mask.dtype == torch.bool else (hf_mask == 0)
    try:
        hf_allowed = hf_allowed.expand(case_mask.shape)
    except RuntimeError:
        extra["mask_note"] = f"attention_mask shape {tuple(case_mask.shape)} vs HF mask {tuple(hf_mask.shape)}"
        return False
    return bool((hf_allowed == allowed).all())


def attention_setup(cfg, tensors, phase, attn, layer_idx, tc, extra):
    """Rotary (computed outside the attention module in HF), the DynamicCache pre-filled for
    `layer_idx`, and HF's own causal mask, exactly as DeepseekOcr2TextModel.forward builds them."""
    x = place(need(tensors, "input", 3))
    pos = place(need(tensors, "position_ids", 2))
    b, s_q, _ = x.shape
    if tuple(pos.shape) != (b, s_q):
        raise CaseError(f"position_ids shape {tuple(pos.shape)} != [B, S_q] = {(b, s_q)}")
    cache = DynamicCache()
    past_len = 0
    if phase == "decode":
        pk, pv = need(tensors, "past_key", 4), need(tensors, "past_value", 4)
        want = (b, tc.num_key_value_heads, pk.shape[2], tc.head_dim)
        if tuple(pk.shape) != want or tuple(pv.shape) != want:
            raise CaseError(
                f"past_key {tuple(pk.shape)} / past_value {tuple(pv.shape)} should be [B, H_kv, C, d] = {want}"
            )
        cache.update(place(pk), place(pv), layer_idx)  # lazily creates empty layers 0..layer_idx-1
        past_len = pk.shape[2]
    if cache.get_seq_length(layer_idx) != past_len:
        raise CaseError("internal: cache pre-fill landed on the wrong layer")
    mask = create_causal_mask(
        config=tc, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=pos, layer_idx=layer_idx
    )
    if attn == "eager":
        extra["mask_match"] = mask_pattern_check(tensors.get("attention_mask"), mask, extra)
    rotary = DeepseekOcr2TextRotaryEmbedding(tc)
    if ORACLE is not None:
        rotary = rotary.to(device=ORACLE[0])
    return x, pos, cache, mask, rotary, past_len


def check_cache_after(cache, layer_idx, past_len, s_q, tensors):
    keys = cache.layers[layer_idx].keys
    if keys is None or keys.shape[-2] != past_len + s_q:
        raise CaseError("internal: KV cache was not updated at layer_idx")
    if past_len and not torch.equal(keys[:, :, :past_len], place(tensors["past_key"])):
        raise CaseError("internal: KV cache past keys were altered")


def run_attention(cfg, tensors, adapters, phase, attn):
    layer_idx = cget(cfg, "layer_idx", int, 0)
    tc = text_config(cfg, attn, layer_idx, mlp_kind=None)
    extra = {}
    x, pos, cache, mask, rotary, past_len = attention_setup(cfg, tensors, phase, attn, layer_idx, tc, extra)
    m = build(lambda: DeepseekOcr2TextAttention(tc, layer_idx=layer_idx))
    m = place_module(load_module(m, split(tensors), "DeepseekOcr2TextAttention"))
    with counting():
        pe = rotary(x, pos)
        out, _ = m(hidden_states=x, position_embeddings=pe, attention_mask=mask, cache=cache, position_ids=pos)
    check_cache_after(cache, layer_idx, past_len, x.shape[1], tensors)
    return out, need(tensors, "output"), extra


def run_decoder_layer(cfg, tensors, adapters, phase, attn):
    layer_idx = cget(cfg, "layer_idx", int, 0)
    kind = cget(cfg, "mlp_kind", str)
    if kind not in ("dense", "sparse"):
        raise CaseError(f"mlp_kind must be 'dense' or 'sparse', got {kind!r}")
    tc = text_config(cfg, attn, layer_idx, mlp_kind=kind)
    extra = {}
    x, pos, cache, mask, rotary, past_len = attention_setup(cfg, tensors, phase, attn, layer_idx, tc, extra)
    m = build(lambda: DeepseekOcr2TextDecoderLayer(tc, layer_idx=layer_idx))
    state = split(tensors)
    if kind == "sparse":
        state = fuse_experts(state, "mlp.", tc.n_routed_experts, tc.n_shared_experts, tc.hidden_size)
    m = place_module(load_module(m, state, "DeepseekOcr2TextDecoderLayer"))
    if kind == "sparse":
        assert m.mlp.experts.config._experts_implementation == "eager"
        apply_norm_topk_adapter(
            m.mlp.gate,
            tc.num_experts_per_tok,
            cget(cfg, "norm_topk_prob", bool, False),
            tc.routed_scaling_factor,
            adapters,
        )
    routed = count_routing(m.mlp.gate) if kind == "sparse" else []
    with counting():
        pe = rotary(x, pos)
        out = m(
            x,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            position_embeddings=pe,
        )
    check_cache_after(cache, layer_idx, past_len, x.shape[1], tensors)
    compare_routing(routed, tensors, extra)
    return out, need(tensors, "output"), extra


# --------------------------------------------------------------------------------------------
# MLA (DeepSeek-V2 / V2-Lite / V3): DeepseekV2Attention, DeepseekV3Attention, their layers
# --------------------------------------------------------------------------------------------
def vendor_rope_layout(k_rot):
    """DeepseekV2's rotary (complex, modeling_deepseek_v2.py:259-272) leaves each rotated
    pair (2i, 2i+1) in place; the vendor de-interleaves first (view/transpose/reshape, then
    rotate_half), so its pair i sits at (i, i + d/2). Same values, permuted."""
    return torch.cat([k_rot[..., 0::2], k_rot[..., 1::2]], dim=-1)


def mla_cache_rel_err(att, cache, layer_idx, tensors, form, family):
    """HF's cache after its prefill holds the latent: keys = kv_a_layernorm(c_kv)
    [B, 1, C, r_kv], values = the rotated shared key [B, 1, C, d_r]
    (modeling_deepseek_v2.py:394-396, modeling_deepseek_v3.py:458-460). The vendor naive
    form caches decompressed per-head keys [B, H, C, d_qk] and values [B, H, C, d_v] (flash:
    padded to d_qk); the absorbed form caches k_pe and c_kv. Decompressed with HF's own
    kv_b_proj, HF's cache must equal the exported one."""
    layer = cache.layers[layer_idx]
    latent, rot = layer.keys, layer.values
    if latent.shape[-1] != att.kv_lora_rank or rot.shape[-1] != att.qk_rope_head_dim:
        raise CaseError(f"internal: HF cache holds {tuple(latent.shape)} / {tuple(rot.shape)}, not the MLA latent")
    if family == "v2":
        rot = vendor_rope_layout(rot)
    pk, pv = place(need(tensors, "past_key", 4)), place(need(tensors, "past_value", 4))
    b, _, c_len, _ = latent.shape
    if form == "absorb":
        got, want = [rot, latent], [pk, pv]
    else:
        heads, d_n, d_v = att.num_heads, att.qk_nope_head_dim, att.v_head_dim
        kv = att.kv_b_proj(latent).view(b, c_len, heads, d_n + d_v).transpose(1, 2)
        k_nope, values = torch.split(kv, [d_n, d_v], dim=-1)
        keys = torch.cat([k_nope, rot.expand(b, heads, c_len, -1)], dim=-1)
        if pv.shape[-1] > d_v:  # the vendor flash form caches the values padded to d_qk
            values = torch.nn.functional.pad(values, [0, pv.shape[-1] - d_v])
        got, want = [keys, values], [pk, pv]
    for g, w, name in zip(got, want, ("past_key", "past_value")):
        if tuple(g.shape) != tuple(w.shape):
            raise CaseError(f"{name} {tuple(w.shape)} does not match HF's cache decompressed: {tuple(g.shape)}")
    return rel_err(torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want]))


def run_mla(cfg, tensors, adapters, phase, attn, form, family, mlp_kind):
    """One MLA case on one transformers family: the attention alone (`mlp_kind` None) or the
    decoder layer. Set up as DeepseekV2Model/DeepseekV3Model.forward does (rotary computed
    by the family's rotary class and passed as position_embeddings, create_causal_mask,
    DynamicCache passed as `cache=`). A decode case first prefills HF's own cache from the
    exported context tokens (named adapter `mla_latent_cache`), checks it against the
    exported cache, then runs the step."""
    layer_idx = cget(cfg, "layer_idx", int, 0)
    # The vendor's absorbed form is eager only (it asserts a mask); HF has no absorbed form,
    # so its one (decompressing) form runs eager against it.
    hf_attn = "eager" if form == "absorb" else attn
    _, Attn, Rotary, Layer = mla_classes(family)
    c = mla_config(cfg, family, hf_attn, layer_idx, mlp_kind, adapters)
    state = split(tensors)
    extra = {}
    if mlp_kind is None:
        what = Attn.__name__
        m = build(lambda: Attn(c, layer_idx=layer_idx))
    else:
        what = Layer.__name__
        m = build(lambda: Layer(c, layer_idx=layer_idx))
        if mlp_kind == "sparse":
            state = fuse_experts(state, "mlp.", c.n_routed_experts, c.n_shared_experts, c.hidden_size)
    m = place_module(load_module(m, state, what))
    extra["hf_class"] = what
    routed = []
    if mlp_kind == "sparse":
        assert m.mlp.experts.config._experts_implementation == "eager"
        adapt_router(m.mlp.gate, family, cfg, adapters, extra)
        routed = count_routing(m.mlp.gate)
    att = m if mlp_kind is None else m.self_attn
    rotary = Rotary(c)
    if ORACLE is not None:
        rotary = rotary.to(device=ORACLE[0])

    def step(x, pos, mask, cache):
        pe = rotary(x, pos)
        if mlp_kind is None:
            return m(hidden_states=x, position_embeddings=pe, attention_mask=mask, cache=cache)[0]
        return m(x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=pe)

    x = place(need(tensors, "input", 3))
    pos = place(need(tensors, "position_ids", 2))
    b, s_q, _ = x.shape
    if tuple(pos.shape) != (b, s_q):
        raise CaseError(f"position_ids shape {tuple(pos.shape)} != [B, S_q] = {(b, s_q)}")
    cache = DynamicCache()
    past_len = 0
    if phase == "decode":
        ctx = place(need(tensors, "context", 3))
        ctx_pos = place(need(tensors, "context_position_ids", 2))
        if ctx.shape[0] != b or tuple(ctx_pos.shape) != tuple(ctx.shape[:2]):
            raise CaseError(
                f"context {tuple(ctx.shape)} / context_position_ids {tuple(ctx_pos.shape)} vs input {tuple(x.shape)}"
            )
        ctx_mask = create_causal_mask(
            config=c, inputs_embeds=ctx, attention_mask=None, cache=cache, position_ids=ctx_pos, layer_idx=layer_idx
        )
        step(ctx, ctx_pos, ctx_mask, cache)
        past_len = ctx.shape[1]
        if cache.get_seq_length(layer_idx) != past_len:
            raise CaseError("internal: HF's prefill did not fill the cache at layer_idx")
        extra["cache_rel_err"] = finite_or_none(mla_cache_rel_err(att, cache, layer_idx, tensors, form, family))
        if "mla_latent_cache" not in adapters:
            adapters.append("mla_latent_cache")
        if "v3_fill_sensitive_rows" in extra:  # count the step's tokens only
            extra["v3_fill_sensitive_rows"] = 0
        routed.clear()  # likewise
    past_latent = cache.layers[layer_idx].keys.clone() if past_len else None
    mask = create_causal_mask(
        config=c, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=pos, layer_idx=layer_idx
    )
    if hf_attn == "eager":
        extra["mask_match"] = mask_pattern_check(tensors.get("attention_mask"), mask, extra)
    # Tokens kv_b_proj decompresses in the step: HF re-runs it over every cached token
    # (expand_kv after cache.update); the vendor naive form over the new tokens only, the
    # absorbed form never (it folds the weight into the query and the output).
    rows = []
    hook = att.kv_b_proj.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].numel() // inp[0].shape[-1]))
    try:
        with counting():
            out = step(x, pos, mask, cache)
    finally:
        hook.remove()
    extra["hf_kv_b_proj_tokens"] = sum(rows)
    extra["vendor_kv_b_proj_tokens"] = 0 if form == "absorb" else b * s_q
    keys = cache.layers[layer_idx].keys
    if keys is None or keys.shape[-2] != past_len + s_q:
        raise CaseError("internal: HF's latent cache was not updated at layer_idx")
    if past_latent is not None and not torch.equal(keys[:, :, :past_len], past_latent):
        raise CaseError("internal: HF's cached latent was altered by the step")
    compare_routing(routed, tensors, extra)
    return out, extra


def run_mla_attention(cfg, tensors, adapters, phase, attn, form):
    """Both DeepseekV2Attention and DeepseekV3Attention: the same MLA, with the rotary in
    complex interleaved pairs (V2) or rotate_half on de-interleaved dims (V3,
    rope_interleave). The case's family (by its routing) runs first; the --oracle counts
    only that one. rel_err is the worse of the two."""
    first = config_family(cfg)
    families = [first] if ORACLE is not None else [first] + [f for f in ("v2", "v3") if f != first]
    ref = need(tensors, "output")
    worst, by_class, merged = None, {}, {}
    for family in families:
        out, extra = run_mla(cfg, tensors, adapters, phase, attn, form, family, None)
        err = rel_err(out, ref)
        by_class[extra.pop("hf_class")] = finite_or_none(err)
        for k, v in extra.items():
            if k == "mask_match":
                merged[k] = merged.get(k, True) and v
            elif k == "cache_rel_err":
                merged.setdefault(k, []).append(v)
            else:
                merged.setdefault(k, v)
        if worst is None or not err <= worst[0]:
            worst = (err, out)
    if "cache_rel_err" in merged:
        errs = merged["cache_rel_err"]
        merged["cache_rel_err"] = None if None in errs else max(errs)
    merged["rel_err_by_class"] = by_class
    return worst[1], ref, merged


def run_mla_decoder_layer(cfg, tensors, adapters, phase, attn, form):
    kind = cget(cfg, "mlp_kind", str)
    if kind not in ("dense", "sparse"):
        raise CaseError(f"mlp_kind must be 'dense' or 'sparse', got {kind!r}")
    family = router_family(cfg) if kind == "sparse" else config_family(cfg)
    out, extra = run_mla(cfg, tensors, adapters, phase, attn, form, family, kind)
    return out, need(tensors, "output"), extra


def run_case(case_dir):
    FCM.clear()
    kind, phase, attn, form, cfg, tensors = load_case(case_dir)
    adapters = []
    if kind in ("attention", "decoder_layer") and form is not None:
        runner = {"attention": run_mla_attention, "decoder_layer": run_mla_decoder_layer}[kind]
        out, ref, extra = runner(cfg, tensors, adapters, phase, attn, form)
    elif kind in ("attention", "decoder_layer"):
        runner = {"attention": run_attention, "decoder_layer": run_decoder_layer}[kind]
        out, ref, extra = runner(cfg, tensors, adapters, phase, attn)
    else:
        runner = {"rms_norm": run_rms_norm, "mlp": run_mlp, "moe_gate": run_moe_gate, "moe": run_moe}[kind]
        out, ref, extra = runner(cfg, tensors, adapters)
    err = rel_err(out, ref)
    cache_err = extra.get("cache_rel_err", 0.0)
    ok = (
        err < TOL
        and extra.get("idx_match", True)
        and extra.get("mask_match", True)
        and cache_err is not None
        and cache_err < TOL
    )
    rec = {"case": case_dir, "module": kind, "rel_err": finite_or_none(err), "ok": bool(ok)}
    rec.update(phase=phase, attn=attn if kind in ("attention", "decoder_layer") else None)
    if form is not None:
        rec["mla_form"] = form
    rec["max_abs_err"] = finite_or_none(
        (out.detach().double().cpu() - ref.double()).abs().max().item() if out.numel() else 0.0
    )
    if ORACLE is not None:
        if "total" not in FCM:
            raise CaseError("internal: the module ran outside the counted region")
        rec["fcm_total"] = FCM["total"]
        rec["fcm_ops"] = FCM["ops"]
        rec["device"], rec["dtype"] = str(ORACLE[0]), str(ORACLE[1]).replace("torch.", "")
    if adapters:
        rec["adapters"] = list(dict.fromkeys(adapters))
    rec.update(extra)
    return rec


# --------------------------------------------------------------------------------------------
# --known-differences: each difference the adapters name, probed on the installed transformers
# --------------------------------------------------------------------------------------------
def _tiny_mla_config(family, **over):
    kw = dict(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_hidden_layers=1,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        moe_intermediate_size=16,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
    )
    kw.update(over)
    c = mla_classes(family)[0](**kw)
    c._attn_implementation = "eager"
    c._experts_implementation = "eager"
    return c


def _probe_mla_latent_cache():
    found = []
    for family in ("v2", "v3"):
        c = _tiny_mla_config(family)
        _, Attn, Rotary, _ = mla_classes(family)
        att, rotary, cache = Attn(c, layer_idx=0).eval(), Rotary(c), DynamicCache()
        b, ctx_len = 2, 5
        x = torch.randn(b, ctx_len + 1, c.hidden_size)
        pos = torch.arange(ctx_len + 1).expand(b, -1)
        rows = []
        att.kv_b_proj.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].numel() // inp[0].shape[-1]))
        for sl in (slice(0, ctx_len), slice(ctx_len, ctx_len + 1)):
            xs, ps = x[:, sl], pos[:, sl]
            mask = create_causal_mask(config=c, inputs_embeds=xs, attention_mask=None, cache=cache, position_ids=ps)
            att(hidden_states=xs, position_embeddings=rotary(xs, ps), attention_mask=mask, cache=cache)
        keys, values = cache.layers[0].keys, cache.layers[0].values
        found.append(
            tuple(keys.shape) == (b, 1, ctx_len + 1, c.kv_lora_rank)
            and tuple(values.shape) == (b, 1, ctx_len + 1, c.qk_rope_head_dim)
            and rows == [b * ctx_len, b * (ctx_len + 1)]
        )
    return all(found), (
        "cache holds [B, 1, T, r_kv] + [B, 1, T, d_r]; kv_b_proj rows per call: prefill B*C, decode B*(C+1)"
    )


def _router_input(c, n=16):
    return torch.randn(n, c.hidden_size)


def _probe_v2_norm_topk_prob():
    c = DeepseekV2Config(hidden_size=64, num_attention_heads=1, n_routed_experts=8, num_experts_per_tok=3,
                         norm_topk_prob=True, routed_scaling_factor=1.0)
    r = DeepseekV2TopkRouter(c)
    torch.nn.init.normal_(r.weight, std=0.02)  # near-uniform softmax: 3 of 8 experts hold about 3/8
    _, w, _ = r(_router_input(c))
    summed = w.sum(-1)
    return (not hasattr(r, "norm_topk_prob")) and bool((summed < 0.999).all()), \
        f"norm_topk_prob=True, top_k=3: weight sums {summed.min().item():.3f}..{summed.max().item():.3f} (vendor: 1)"


def _probe_v2_no_noaux_tc():
    c = DeepseekV2Config(hidden_size=64, num_attention_heads=1, n_routed_experts=8, num_experts_per_tok=2,
                         topk_method="noaux_tc", n_group=4, topk_group=2)
    r = DeepseekV2TopkRouter(c)
    try:
        r(_router_input(c))
    except (UnboundLocalError, NameError) as e:
        return not hasattr(r, "e_score_correction_bias"), f"topk_method='noaux_tc': {type(e).__name__}"
    return False, "topk_method='noaux_tc' ran"


def _probe_v3_ignores_topk_method():
    base = _tiny_mla_config("v3")
    other = _tiny_mla_config("v3", topk_method="greedy", scoring_func="softmax")
    r1, r2 = DeepseekV3TopkRouter(base), DeepseekV3TopkRouter(other)
    torch.nn.init.normal_(r1.weight)
    r2.load_state_dict(r1.state_dict())
    x = _router_input(base)
    logits, w1, i1 = r1(x)
    _, w2, i2 = r2(x)
    sig = logits.sigmoid().gather(1, i1)
    sig = sig / (sig.sum(-1, keepdim=True) + 1e-20) * base.routed_scaling_factor
    same = torch.equal(w1, w2) and torch.equal(i1, i2) and torch.allclose(w1, sig)
    return same, "topk_method='greedy', scoring_func='softmax' route exactly as the default (sigmoid, noaux_tc)"


def _probe_v3_top1_norm():
    c = _tiny_mla_config("v3", num_experts_per_tok=1, norm_topk_prob=True)
    r = DeepseekV3TopkRouter(c)
    torch.nn.init.normal_(r.weight)
    _, w, _ = r(_router_input(c))
    ok = torch.allclose(w, torch.full_like(w, c.routed_scaling_factor))
    return ok, "top_k=1, norm_topk_prob: every weight is routed_scaling_factor (vendor: sigmoid * rsf)"


def _probe_v3_minus_inf_fill():
    c = _tiny_mla_config("v3")
    r = DeepseekV3TopkRouter(c)
    torch.nn.init.normal_(r.weight)
    r.e_score_correction_bias.fill_(-2.0)  # every choice score negative
    x = _router_input(c)
    logits, _, idx = r(x)
    choice = logits.sigmoid() + r.e_score_correction_bias
    per = r.num_experts // r.num_group
    group_scores = choice.view(-1, r.num_group, per).topk(2, dim=-1)[0].sum(-1)
    groups = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
    in_chosen = (idx // per).unsqueeze(-1).eq(groups.unsqueeze(1)).any(-1).all()
    sensitive = v3_fill_sensitive_rows(r, logits)
    return bool(in_chosen) and sensitive == x.shape[0], \
        f"bias -2: HF keeps every choice in the chosen groups; {sensitive}/{x.shape[0]} tokens where the " \
        "vendor's 0.0 fill picks others"


def _probe_v2_rotary_interleaved():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    c = _tiny_mla_config("v2")
    d = c.qk_rope_head_dim
    q = torch.randn(1, 2, 4, d)
    pos = torch.arange(4).unsqueeze(0)
    hf_q, _ = apply_rotary_emb(q, q[:, :1], DeepseekV2RotaryEmbedding(c)(q, pos))
    cos, sin = DeepseekV3RotaryEmbedding(_tiny_mla_config("v3"))(q, pos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xv = q.view(1, 2, 4, d // 2, 2).transpose(4, 3).reshape(1, 2, 4, d)  # the vendor's de-interleave
    vendor = xv * cos + torch.cat([-xv[..., d // 2:], xv[..., : d // 2]], dim=-1) * sin
    return (not torch.allclose(hf_q, vendor)) and torch.allclose(vendor_rope_layout(hf_q), vendor, atol=1e-6), \
        "DeepseekV2 rotates pairs (2i, 2i+1) in place; the vendor's output holds them at (i, i + d/2)"


def _probe_yarn_attention_factor():
    rp = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.0}
    hf = DeepseekV3RotaryEmbedding(_tiny_mla_config("v3", rope_parameters=rp)).attention_scaling
    vendor = yarn_get_mscale(40.0, 0.707) / yarn_get_mscale(40.0, 0.0)
    return hf != vendor and hf == yarn_get_mscale(40.0), \
        f"factor 40, mscale 0.707, mscale_all_dim 0: HF scales the tables by {hf:.4f}, the vendor by {vendor:.4f}"


DIFFERENCES = [
    ("mla_latent_cache", "modeling_deepseek_v2.py:394-400, modeling_deepseek_v3.py:458-464", _probe_mla_latent_cache),
    ("v2_rotary_interleaved", "modeling_deepseek_v2.py:214-219, 259-272", _probe_v2_rotary_interleaved),
    ("v2_router_ignores_norm_topk_prob", "modeling_deepseek_v2.py:86-117 (116)", _probe_v2_norm_topk_prob),
    ("v2_router_has_no_noaux_tc", "modeling_deepseek_v2.py:102-115", _probe_v2_no_noaux_tc),
    ("v3_router_ignores_topk_method_and_scoring_func",
     "modeling_deepseek_v3.py:120-158; configuration_deepseek_v3.py:81-116", _probe_v3_ignores_topk_method),
    ("v3_router_normalises_top1", "modeling_deepseek_v3.py:154-156", _probe_v3_top1_norm),
    ("v3_router_fills_minus_inf", "modeling_deepseek_v3.py:151", _probe_v3_minus_inf_fill),
    ("yarn_attention_factor", "modeling_rope_utils.py:436-440", _probe_yarn_attention_factor),
]


def known_differences():
    """One JSON line per named difference: {"difference", "present", "evidence", "detail"}.
    Exit 0 when every one is present in the installed transformers, 1 otherwise (an
    adapter would then be stale)."""
    torch.manual_seed(0)
    status = 0
    for name, evidence, probe in DIFFERENCES:
        try:
            present, detail = probe()
        except Exception as e:
            present, detail = False, f"probe failed: {type(e).__name__}: {e}"
        present = bool(present)
        print(json.dumps({"difference": name, "present": present, "evidence": evidence, "detail": detail}), flush=True)
        if not present:
            status = 1
    return status


def peek_module(case_dir):
    """Best-effort module kind for the JSON line of a case that failed to load."""
    try:
        with open(os.path.join(case_dir, "case.json")) as f:
            kind = json.load(f).get("module")
        return kind if isinstance(kind, str) else None
    except Exception:
        return None


def error_line(case_dir, msg):
    print(f"parity.py: case {case_dir}: {msg}", file=sys.stderr)
    print(json.dumps({"case": case_dir, "module": peek_module(case_dir), "rel_err": None, "ok": False, "error": msg}),
          flush=True)


def main(argv):
    if len(argv) < 1:
        _die_usage("no case directories given")
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--known-differences":
        if len(argv) != 1:
            _die_usage("--known-differences takes no case directories")
        try:
            _import_hf()
        except Exception as e:
            print(f"parity.py: cannot set up torch/transformers: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        with torch.no_grad():
            return known_differences()
    oracle = None
    if argv[0] == "--oracle":
        if len(argv) < 4:
            _die_usage("--oracle needs DEVICE DTYPE and at least one case directory")
        oracle, argv = (argv[1], argv[2]), argv[3:]
        if oracle[1] not in ("fp32", "bf16", "fp16"):
            _die_usage(f"--oracle dtype {oracle[1]!r}: expected fp32, bf16 or fp16")
    for a in argv:
        if a.startswith("-"):
            _die_usage(f"unknown option {a!r}")
    try:
        _import_hf()
    except Exception as e:
        print(f"parity.py: cannot set up torch/transformers: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if oracle is not None:
        global ORACLE
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[oracle[1]]
        try:
            device = torch.device(oracle[0])
            torch.empty(1, device=device)
        except Exception as e:
            print(f"parity.py: --oracle device {oracle[0]!r} is unusable: {e}", file=sys.stderr)
            return 2
        ORACLE = (device, dtype)
    status = 0
    for case_dir in argv:
        try:
            rec = run_case(case_dir)
        except CaseError as e:
            error_line(case_dir, str(e))
            status = 2
            continue
        except Exception as e:  # a transformers/torch failure while running the module
            error_line(case_dir, f"running the HF module failed: {type(e).__name__}: {e}")
            status = 2
            continue
        print(json.dumps(rec), flush=True)
        if not rec["ok"] and status == 0:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

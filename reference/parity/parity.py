#!/usr/bin/env python3
"""Independent parity check of modelmeter-reference cases against Hugging Face transformers.

Usage: parity.py CASE_DIR [CASE_DIR ...]
       parity.py --oracle DEVICE DTYPE CASE_DIR [CASE_DIR ...]

With --oracle (cpu, cuda or cuda:N; fp32, bf16 or fp16) each case runs on that device in that
dtype under torch.utils.flop_counter.FlopCounterMode, and its line also carries "fcm_total"
(FlopCounterMode's total) and "fcm_ops" ({"aten::mm": FLOPs, ...}); "ok" is then left to the
caller, which knows the bound for the dtype. The rotary table of attention and decoder cases is
computed inside the counted region (the vendor code computes it inside the attention).

Each CASE_DIR holds `case.json` and `case.safetensors` written by the Rust reference crate
(format: see README.md next to this file). For every case this script builds the matching
*independent* transformers module (DeepSeek-V2 RMSNorm / MLP / TopkRouter / Moe from
`transformers.models.deepseek_v2`, Llama-style attention and decoder layer from
`transformers.models.deepseek_ocr2`), loads the case's weights into it, runs it in fp32 on CPU
in eval mode under `torch.no_grad()`, and prints one JSON line per case:

    {"case": DIR, "module": KIND, "rel_err": FLOAT|null, "ok": BOOL, ...}

rel_err = ||out - ref||_F / ||ref||_F (computed in float64), ok = rel_err < 1e-5. For
`moe_gate`, the selected expert indices must match exactly after sorting each row by index, and
rel_err is measured on the weights permuted the same way.

Exit status: 0 all cases ok, 1 some case failed, 2 usage error or a case that could not be
loaded/run (a message naming the case goes to stderr; the remaining cases still run).

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
IO_KEYS = {"input", "output", "topk_idx", "topk_weight", "position_ids", "attention_mask", "past_key", "past_value"}
# Anything at or below this in the case's additive mask counts as "masked out".
MASKED_BELOW = -1.0e4


class CaseError(Exception):
    """The case could not be loaded or run (exit status 2)."""


_MISSING = object()


def _die_usage(msg):
    print(f"parity.py: {msg}", file=sys.stderr)
    print("usage: parity.py CASE_DIR [CASE_DIR ...]", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------
# Imports (deferred so that `--help` and usage errors are instant)
# --------------------------------------------------------------------------------------------
def _import_hf():
    global torch, load_file, DeepseekV2Config, DeepseekV2RMSNorm, DeepseekV2MLP, DeepseekV2TopkRouter
    global DeepseekV2Moe, DeepseekOcr2TextConfig, DeepseekOcr2TextAttention, DeepseekOcr2TextRotaryEmbedding
    global DeepseekOcr2TextDecoderLayer, DynamicCache, create_causal_mask
    import torch  # noqa: F401
    from safetensors.torch import load_file  # noqa: F401
    import transformers
    from transformers.cache_utils import DynamicCache  # noqa: F401
    from transformers.masking_utils import create_causal_mask  # noqa: F401
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config  # noqa: F401
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (  # noqa: F401
        DeepseekV2MLP,
        DeepseekV2Moe,
        DeepseekV2RMSNorm,
        DeepseekV2TopkRouter,
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
    try:
        tensors = load_file(spath, device="cpu")
    except Exception as e:  # safetensors raises several types
        raise CaseError(f"cannot read case.safetensors: {e}") from e
    for name, t in tensors.items():
        want = torch.int64 if name in ("topk_idx", "position_ids") else torch.float32
        if t.dtype != want:
            raise CaseError(f"tensor {name!r} has dtype {t.dtype}, expected {want}")
    return kind, phase, attn, cfg, tensors


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
def moe_kwargs(cfg, required):
    d = {"hidden_act": cget(cfg, "hidden_act", str, "silu")}
    if required:
        d.update(
            n_routed_experts=cget(cfg, "n_routed_experts", int),
            num_experts_per_tok=cget(cfg, "num_experts_per_tok", int),
            # vendor `n_shared_experts: null` (no shared experts) == HF zero-width shared MLP
            n_shared_experts=cget(cfg, "n_shared_experts", int, 0),
            moe_intermediate_size=cget(cfg, "moe_intermediate_size", int),
            routed_scaling_factor=cget(cfg, "routed_scaling_factor", float, 1.0),
            topk_method=cget(cfg, "topk_method", str, "greedy"),
        )
        if d["topk_method"] not in ("greedy", "group_limited_greedy"):
            raise CaseError(f"topk_method {d['topk_method']!r} is not implemented by the HF DeepSeek-V2 router")
        if d["topk_method"] == "group_limited_greedy":
            d["n_group"] = cget(cfg, "n_group", int)
            d["topk_group"] = cget(cfg, "topk_group", int)
        if cget(cfg, "scoring_func", str, "softmax") != "softmax":
            raise CaseError("only scoring_func 'softmax' is implemented by the HF DeepSeek-V2 router")
    return d


def v2_config(cfg, moe):
    h = cget(cfg, "hidden_size", int)
    heads = cget(cfg, "num_attention_heads", int, 1)
    kw = dict(hidden_size=h, num_attention_heads=heads if h % heads == 0 else 1, mlp_bias=False)
    if "intermediate_size" in cfg:
        kw["intermediate_size"] = cget(cfg, "intermediate_size", int)
    kw.update(moe_kwargs(cfg, moe))
    if moe:
        kw["norm_topk_prob"] = cget(cfg, "norm_topk_prob", bool, False)
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
    kw.update(moe_kwargs(cfg, sparse))
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
    logits and indices and recompute only the weights the vendor way, from HF's own softmax."""
    if not (top_k > 1 and norm_topk_prob):
        return
    orig = router.forward

    def forward(hidden_states):
        router_logits, _hf_weights, topk_indices = orig(hidden_states)
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        topk = scores.gather(-1, topk_indices)
        denominator = topk.sum(dim=-1, keepdim=True) + 1e-20
        return router_logits, topk / denominator * rsf, topk_indices

    router.forward = forward
    adapters.append("norm_topk_prob")


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


def run_moe_gate(cfg, tensors, adapters):
    c = v2_config(cfg, moe=True)
    m = build(lambda: DeepseekV2TopkRouter(c))
    m = place_module(load_module(m, split(tensors), "DeepseekV2TopkRouter"))
    apply_norm_topk_adapter(m, c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor, adapters)
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
    return w_s, ref_w_s, {"idx_match": mismatched_rows == 0, "idx_mismatched_rows": mismatched_rows}


def run_moe(cfg, tensors, adapters):
    c = v2_config(cfg, moe=True)
    m = build(lambda: DeepseekV2Moe(c))
    state = fuse_experts(split(tensors), "", c.n_routed_experts, c.n_shared_experts, c.hidden_size)
    m = place_module(load_module(m, state, "DeepseekV2Moe"))
    assert m.experts.config._experts_implementation == "eager"
    apply_norm_topk_adapter(m.gate, c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor, adapters)
    x = place(need(tensors, "input"))
    with counting():
        out = m(x)
    return out, need(tensors, "output"), {}


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
    return out, need(tensors, "output"), extra


def run_case(case_dir):
    FCM.clear()
    kind, phase, attn, cfg, tensors = load_case(case_dir)
    adapters = []
    if kind in ("attention", "decoder_layer"):
        runner = {"attention": run_attention, "decoder_layer": run_decoder_layer}[kind]
        out, ref, extra = runner(cfg, tensors, adapters, phase, attn)
    else:
        runner = {"rms_norm": run_rms_norm, "mlp": run_mlp, "moe_gate": run_moe_gate, "moe": run_moe}[kind]
        out, ref, extra = runner(cfg, tensors, adapters)
    err = rel_err(out, ref)
    ok = err < TOL and extra.get("idx_match", True) and extra.get("mask_match", True)
    rec = {"case": case_dir, "module": kind, "rel_err": finite_or_none(err), "ok": bool(ok)}
    rec.update(phase=phase, attn=attn if kind in ("attention", "decoder_layer") else None)
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
        rec["adapters"] = adapters
    rec.update(extra)
    return rec


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

//! Properties of the analytic layers over generated configurations and workloads.

use modelmeter::layers::{
    AttentionImpl, DeepseekV2Decoder, DeepseekV2DecoderLayer, DeepseekV2MoE, Generation,
    GenerationMetrics, Layer, LlamaAttention, MoEGate, ATTENTION_CORE_ROLE,
};
use modelmeter::{
    Cost, Dtype, Metrics, MlaForm, MlpKind, ModelConfig, MoeConfig, Phase, Platform, Workload,
};
use proptest::prelude::*;
use serde_json::json;

#[derive(Clone, Debug)]
struct Dims {
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    intermediate: u64,
    moe_intermediate: u64,
    experts: u64,
    k: u64,
    shared: u64,
    layers: u64,
    bias: bool,
}

fn dims() -> impl Strategy<Value = Dims> {
    (
        1u64..=8,
        // Head dims across the kernels' boundaries: flash pads 2, 4, 6 and 12 to a multiple
        // of 8 in bf16/fp16; above 256 it cannot run (264: the efficient kernel; 262: the
        // math path); fp32's efficient kernel wants d % 4 == 0 (6, 262: the math path).
        prop::sample::select(vec![2u64, 4, 6, 8, 12, 16, 32, 262, 264]),
        1u64..=64,
        1u64..=96,
        1u64..=48,
        1u64..=16,
        0u64..=3,
        1u64..=4,
        any::<bool>(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(
            |(
                heads,
                head_dim,
                hidden_mul,
                i,
                m,
                experts,
                shared,
                layers,
                bias,
                kv_pick,
                k_pick,
            )| {
                let divisors: Vec<u64> = (1..=heads).filter(|d| heads % d == 0).collect();
                Dims {
                    hidden: hidden_mul * 8,
                    heads,
                    kv_heads: *kv_pick.get(&divisors),
                    head_dim,
                    intermediate: i,
                    moe_intermediate: m,
                    experts,
                    k: 1 + k_pick.index(experts as usize) as u64,
                    shared,
                    layers,
                    bias,
                }
            },
        )
}

fn config(d: &Dims) -> ModelConfig {
    ModelConfig::from_json_value("generated", &config_json(d)).expect("generated configs are valid")
}

fn config_json(d: &Dims) -> serde_json::Value {
    json!({
            "hidden_size": d.hidden,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim,
            "intermediate_size": d.intermediate,
            "moe_intermediate_size": d.moe_intermediate,
            "n_routed_experts": d.experts,
            "num_experts_per_tok": d.k,
            // No shared experts is null (an explicit 0 is refused: the vendor code would
            // run a zero-width MLP).
            "n_shared_experts": MoeConfig::n_shared_experts_field(d.shared),
            "num_hidden_layers": d.layers,
            "first_k_dense_replace": 1,
            "vocab_size": 97,
            "attention_bias": d.bias,
    })
}

/// MLA dimensions of a generated config (the vendor `DeepseekV2Attention`).
#[derive(Clone, Debug)]
struct Mla {
    q_lora_rank: Option<u64>,
    kv_lora_rank: u64,
    nope: u64,
    rope: u64,
    v: u64,
}

/// The MoE gate's routing method, with its expert groups where it has them.
#[derive(Clone, Debug)]
enum Route {
    Greedy,
    GroupLimited { groups: u64, keep: u64 },
    NoauxTc { groups: u64, keep: u64 },
}

/// A generated config of the wider DeepSeek family: multi-head or MLA attention (either
/// query path), and any of the three routing methods (groups dividing the experts).
fn family() -> impl Strategy<Value = (Dims, Option<Mla>, Route)> {
    dims().prop_flat_map(|d| {
        let mla = prop::option::of(
            (
                prop::option::of(1u64..=24),
                1u64..=24,
                1u64..=4,
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                any::<bool>(),
            )
                .prop_map(
                    |(q_lora_rank, kv_lora_rank, eights, rope_pick, v_pick, pad)| {
                        // d_qk a multiple of 8, as in every DeepSeek checkpoint (192), or of
                        // 4 only (CUDA flash pads it in bf16/fp16): the domain of the fused
                        // SDPA kernels, which the MLA model requires (it refuses the math
                        // path); d_r even, d_n ≥ 2.
                        let d_qk = 8 * eights - if pad { 4 } else { 0 };
                        let rope = 2 * (1 + rope_pick.index((d_qk / 2 - 1) as usize) as u64);
                        Mla {
                            q_lora_rank,
                            kv_lora_rank,
                            nope: d_qk - rope,
                            rope,
                            // d_v ≤ d_qk: the flash form pads values to d_qk (refuses wider).
                            v: 1 + v_pick.index(d_qk as usize) as u64,
                        }
                    },
                ),
        );
        let experts = d.experts;
        let route = (
            0u8..3,
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
        )
            .prop_map(move |(method, group_pick, keep_pick)| {
                // noaux_tc scores a group by its top two experts: ≥ 2 per group.
                let per_group = if method == 2 { 2 } else { 1 };
                let groups: Vec<u64> = (1..=experts)
                    .filter(|g| experts % g == 0 && experts / g >= per_group)
                    .collect();
                if method == 0 || groups.is_empty() {
                    return Route::Greedy;
                }
                let groups = *group_pick.get(&groups);
                let keep = 1 + keep_pick.index(groups as usize) as u64;
                if method == 1 {
                    Route::GroupLimited { groups, keep }
                } else {
                    Route::NoauxTc { groups, keep }
                }
            });
        (Just(d), mla, route)
    })
}

fn family_config(d: &Dims, mla: &Option<Mla>, route: &Route) -> ModelConfig {
    let mut v = config_json(d);
    if let Some(m) = mla {
        v["use_mla"] = json!(true);
        v["q_lora_rank"] = json!(m.q_lora_rank);
        v["kv_lora_rank"] = json!(m.kv_lora_rank);
        v["qk_nope_head_dim"] = json!(m.nope);
        v["qk_rope_head_dim"] = json!(m.rope);
        v["v_head_dim"] = json!(m.v);
    }
    let (method, scoring, groups) = match route {
        Route::Greedy => ("greedy", "softmax", None),
        Route::GroupLimited { groups, keep } => {
            ("group_limited_greedy", "softmax", Some((groups, keep)))
        }
        Route::NoauxTc { groups, keep } => ("noaux_tc", "sigmoid", Some((groups, keep))),
    };
    v["topk_method"] = json!(method);
    v["scoring_func"] = json!(scoring);
    if let Some((groups, keep)) = groups {
        v["n_group"] = json!(groups);
        v["topk_group"] = json!(keep);
    }
    ModelConfig::from_json_value("generated", &v).expect("generated configs are valid")
}

fn workloads() -> impl Strategy<Value = (u64, Phase, Dtype)> {
    (
        1u64..=4,
        prop_oneof![
            (1u64..=64).prop_map(|s| Phase::Prefill { seq_len: s }),
            (1u64..=64).prop_map(|c| Phase::Decode { context_len: c }),
        ],
        prop::sample::select(vec![Dtype::Bf16, Dtype::F16, Dtype::F32]),
    )
}

/// A workload run by the CPU's kernels: one SDPA kernel for every dtype and head dim,
/// so the plain formulas below hold. CUDA's kernel choices have their own property.
fn workload(batch: u64, phase: Phase, dtype: Dtype) -> Workload {
    Workload::new(batch, phase, dtype)
        .unwrap()
        .on(Platform::Cpu)
}

/// A workload run by either backend's kernels (`cuda`: CUDA, else the CPU): for the
/// properties that hold whichever kernels run (sums, trees, parameter counts).
fn workload_on(batch: u64, phase: Phase, dtype: Dtype, cuda: bool) -> Workload {
    Workload::new(batch, phase, dtype).unwrap().on(if cuda {
        Platform::Cuda
    } else {
        Platform::Cpu
    })
}

fn all_layers(c: &ModelConfig, w: &Workload, attn: AttentionImpl) -> Vec<Cost> {
    let mut out: Vec<Cost> = modelmeter::layers::layers_of(c, w, attn)
        .unwrap()
        .iter()
        .map(|l| l.cost().unwrap())
        .collect();
    out.push(DeepseekV2Decoder::new(c, w, attn).cost().unwrap());
    out
}

fn assert_sums(c: &Cost) {
    if c.children.is_empty() {
        return;
    }
    // The oracle adds the fields by hand (u128, no overflow possible), independently of
    // the library's `Metrics::checked_add` that the cost builder uses.
    #[derive(Default)]
    struct Sums {
        matmul_flops: u128,
        elementwise_flops: u128,
        tensor_core_flops: u128,
        cuda_core_flops: u128,
        io_bytes: u128,
        activation_bytes: u128,
        weight_bytes: u128,
        kv_cache_bytes: u128,
    }
    let mut total = Sums::default();
    for child in &c.children {
        assert_sums(child);
        let m = &child.metrics;
        total.matmul_flops += u128::from(m.matmul_flops);
        total.elementwise_flops += u128::from(m.elementwise_flops);
        total.tensor_core_flops += u128::from(m.tensor_core_flops);
        total.cuda_core_flops += u128::from(m.cuda_core_flops);
        total.io_bytes += u128::from(m.io_bytes);
        total.activation_bytes += u128::from(m.activation_bytes);
        total.weight_bytes += u128::from(m.weight_bytes);
        total.kv_cache_bytes += u128::from(m.kv_cache_bytes);
    }
    // A node adds only its own parameters and KV cache to its children's sum.
    assert_eq!(
        u128::from(c.metrics.matmul_flops),
        total.matmul_flops,
        "{}",
        c.name
    );
    assert_eq!(
        u128::from(c.metrics.elementwise_flops),
        total.elementwise_flops,
        "{}",
        c.name
    );
    assert_eq!(
        u128::from(c.metrics.tensor_core_flops),
        total.tensor_core_flops,
        "{}",
        c.name
    );
    assert_eq!(
        u128::from(c.metrics.cuda_core_flops),
        total.cuda_core_flops,
        "{}",
        c.name
    );
    assert_eq!(u128::from(c.metrics.io_bytes), total.io_bytes, "{}", c.name);
    assert_eq!(
        u128::from(c.metrics.activation_bytes),
        total.activation_bytes,
        "{}",
        c.name
    );
    assert!(
        u128::from(c.metrics.weight_bytes) >= total.weight_bytes,
        "{}",
        c.name
    );
    assert!(
        u128::from(c.metrics.kv_cache_bytes) >= total.kv_cache_bytes,
        "{}",
        c.name
    );
}

/// Every composite of `cost` sums its children ([`assert_sums`]), and the root's two
/// views of its FLOPs (by class, by engine) have the same total.
fn assert_sums_and_flop_views(cost: &Cost) {
    assert_sums(cost);
    let m = cost.metrics;
    // A sanity check, not a witness: `OpConvention::cost` puts every FLOP of an op on
    // exactly one engine, so the two totals agree by construction. Which engine is right
    // is checked against the dtype rule by `engines_follow_the_dtype_rule`.
    assert_eq!(
        u128::from(m.matmul_flops) + u128::from(m.elementwise_flops),
        u128::from(m.tensor_core_flops) + u128::from(m.cuda_core_flops),
        "{}",
        cost.name
    );
}

/// `Layer::metrics` (no tree, no liveness) and `sums_only` (no tree) agree with the root
/// of the full cost tree: the metrics, the CUDA blocks, both peaks and what it returns.
fn assert_metrics_without_the_tree_equal_the_tree(layer: &dyn Layer, what: &str) {
    let tree = layer.cost().unwrap();
    let name = format!("{what}: {}", tree.name);
    assert_eq!(layer.metrics().unwrap(), tree.metrics, "{name}");
    let sums = modelmeter::metrics::sums_only(|| layer.cost().unwrap());
    assert!(sums.children.is_empty(), "{name}");
    assert_eq!(sums.metrics, tree.metrics, "{name}");
    assert_eq!(
        sums.cuda_activation_bytes, tree.cuda_activation_bytes,
        "{name}"
    );
    assert_eq!(sums.peak, tree.peak, "{name}");
    assert_eq!(sums.cuda_peak, tree.cuda_peak, "{name}");
    assert_eq!(sums.returns(), tree.returns(), "{name}");
    assert_eq!(sums.returned, tree.returned, "{name}");
}

/// Bytes of one element of a model dtype, written out here (not `Dtype::size_bytes`).
fn element_bytes(dtype: Dtype) -> u128 {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        other => panic!("not a model dtype here: {other:?}"),
    }
}

/// A family config with its workload (in the MLA form `absorb` says) and attention
/// implementation (`eager` or SDPA).
fn family_case(
    d: &Dims,
    mla: &Option<Mla>,
    route: &Route,
    workload: Workload,
    eager: bool,
    absorb: bool,
) -> (ModelConfig, Workload, AttentionImpl) {
    let form = if absorb {
        MlaForm::Absorb
    } else {
        MlaForm::Naive
    };
    let attn = if eager {
        AttentionImpl::Eager
    } else {
        AttentionImpl::Sdpa
    };
    (family_config(d, mla, route), workload.with_mla(form), attn)
}

/// The parameters of `DeepseekV2ForCausalLM` built from the generated config, counted from
/// the vendor modules (transformers' `LlamaAttention`, `DeepseekV2Attention` (MLA),
/// `DeepseekV2MLP`, `MoEGate`, `DeepseekV2MoE`, `DeepseekV2RMSNorm`, `nn.Embedding`,
/// `lm_head`), not from the library.
fn parameters_of(d: &Dims, mla: &Option<Mla>, route: &Route) -> u128 {
    let w = |x: u64| u128::from(x);
    let (h, heads, kv_heads, hd) = (w(d.hidden), w(d.heads), w(d.kv_heads), w(d.head_dim));
    let vocab = 97u128;
    // A bias of an `nn.Linear`'s output width where the vendor passes `attention_bias`.
    let bias = |n: u128| if d.bias { n } else { 0 };
    let attention = match mla {
        // q_proj h → H·d, k_proj and v_proj h → H_kv·d, o_proj H·d → h, each biased.
        None => {
            h * heads * hd
                + 2 * h * kv_heads * hd
                + heads * hd * h
                + bias(heads * hd + 2 * kv_heads * hd + h)
        }
        // DeepseekV2Attention: q_proj h → H·d_qk (bias-free), or q_a_proj h → r_q
        // (biased), q_a_layernorm [r_q], q_b_proj r_q → H·d_qk (bias-free);
        // kv_a_proj_with_mqa h → r_kv + d_r (biased), kv_a_layernorm [r_kv],
        // kv_b_proj r_kv → H·(d_n + d_v) (bias-free), o_proj H·d_v → h (biased).
        Some(m) => {
            let d_qk = w(m.nope + m.rope);
            let query = match m.q_lora_rank {
                None => h * heads * d_qk,
                Some(r) => h * w(r) + bias(w(r)) + w(r) + w(r) * heads * d_qk,
            };
            let kv_a = w(m.kv_lora_rank + m.rope);
            query
                + h * kv_a
                + bias(kv_a)
                + w(m.kv_lora_rank)
                + w(m.kv_lora_rank) * heads * w(m.nope + m.v)
                + heads * w(m.v) * h
                + bias(h)
        }
    };
    // input_layernorm and post_attention_layernorm: one weight of h each.
    let norms = 2 * h;
    // gate_proj and up_proj h → i, down_proj i → h; no biases.
    let dense_mlp = 3 * h * w(d.intermediate);
    let m = w(d.moe_intermediate);
    // MoEGate.weight [E, h], and under noaux_tc its e_score_correction_bias [E]; E experts
    // of width m; the shared experts as one MLP of width m·n_shared (none when 0).
    let gate = w(d.experts) * h
        + if matches!(route, Route::NoauxTc { .. }) {
            w(d.experts)
        } else {
            0
        };
    let moe = gate + w(d.experts) * 3 * h * m + 3 * h * (m * w(d.shared));
    // first_k_dense_replace = 1: layer 0 dense, every later layer MoE.
    let layers = (attention + norms + dense_mlp) + (w(d.layers) - 1) * (attention + norms + moe);
    // embed_tokens [V, h], the final norm [h], lm_head [V, h] (tie_word_embeddings
    // defaults to false, as in `PretrainedConfig`).
    vocab * h + layers + h + vocab * h
}

/// KV-cache elements one layer holds per cached token, from the vendor forwards:
/// `LlamaAttention` caches K and V of H_kv heads; MLA's eager form the decompressed K
/// (d_qk) and V (d_v) of every head; its flash form the values padded to d_qk first; the
/// weight-absorbed form the latent c_kv and the shared rotary key.
fn cache_per_token(d: &Dims, mla: &Option<Mla>, form: MlaForm, eager: bool) -> u128 {
    let w = |x: u64| u128::from(x);
    match mla {
        None => 2 * w(d.kv_heads) * w(d.head_dim),
        Some(m) => match form {
            MlaForm::Absorb => w(m.kv_lora_rank + m.rope),
            MlaForm::Naive if eager => w(d.heads) * w(m.nope + m.rope + m.v),
            MlaForm::Naive => w(d.heads) * 2 * w(m.nope + m.rope),
        },
    }
}

fn projections(c: &Cost) -> u64 {
    ["q_proj", "k_proj", "v_proj", "o_proj"]
        .iter()
        .map(|n| c.child(n).unwrap().metrics.matmul_flops)
        .sum()
}

fn core(c: &Cost) -> u64 {
    c.child(ATTENTION_CORE_ROLE).unwrap().metrics.matmul_flops
}

/// Matmul FLOPs of the fp32 GEMMs (MoE gate, rotary table) in a cost tree.
fn fp32_gemm_flops(c: &Cost) -> u64 {
    c.ops()
        .iter()
        .filter(|op| {
            op.op
                .is_some_and(|name| name == "aten::mm" || name == "aten::bmm")
                && (op.name.starts_with("logits") || op.name.starts_with("inv_freq"))
        })
        .map(|op| op.metrics.matmul_flops)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn composites_sum_children_and_flop_views_agree(d in dims(), (b, phase, dtype) in workloads(), eager in any::<bool>(), cuda in any::<bool>()) {
        let c = config(&d);
        let w = workload_on(b, phase, dtype, cuda);
        let attn = if eager { AttentionImpl::Eager } else { AttentionImpl::Sdpa };
        for cost in all_layers(&c, &w, attn) {
            assert_sums_and_flop_views(&cost);
        }
    }

    #[test]
    fn metrics_without_the_tree_equal_the_tree(d in dims(), (b, phase, dtype) in workloads(), eager in any::<bool>(), cuda in any::<bool>()) {
        // `Layer::metrics` runs the same op lists keeping sums only: it must agree with the
        // root of the full cost tree, CUDA blocks included, on every layer.
        let c = config(&d);
        let w = workload_on(b, phase, dtype, cuda);
        let attn = if eager { AttentionImpl::Eager } else { AttentionImpl::Sdpa };
        let mut layers = modelmeter::layers::layers_of(&c, &w, attn).unwrap();
        layers.push(Box::new(DeepseekV2Decoder::new(&c, &w, attn)));
        for layer in layers {
            assert_metrics_without_the_tree_equal_the_tree(layer.as_ref(), "generated");
        }
    }

    #[test]
    fn stack_weights_and_kv_cache_are_the_parameters_and_cache_counted_by_hand((d, mla, route) in family(), (b, phase, dtype) in workloads(), eager in any::<bool>(), cuda in any::<bool>(), absorb in any::<bool>()) {
        // `assert_sums` only bounds a node's weights and cache below by its children's: a
        // parameter counted twice (an expert's weights both run and idle, a norm shared by
        // two layers) passes there. The whole stack must hold each parameter once.
        let (c, w, attn) = family_case(&d, &mla, &route, workload_on(b, phase, dtype, cuda), eager, absorb);
        let stack = DeepseekV2Decoder::new(&c, &w, attn);
        let (tree, sums) = (stack.cost().unwrap().metrics, stack.metrics().unwrap());
        let size = element_bytes(dtype);
        let parameters = parameters_of(&d, &mla, &route);
        prop_assert_eq!(u128::from(tree.weight_bytes), parameters * size);
        prop_assert_eq!(u128::from(sums.weight_bytes), parameters * size);
        // Each layer caches every key: S in a prefill, the context and the new token in a
        // decode step.
        let keys = match phase {
            Phase::Prefill { seq_len } => seq_len,
            Phase::Decode { context_len } => context_len + 1,
        };
        let cache = u128::from(d.layers) * u128::from(b) * u128::from(keys) * cache_per_token(&d, &mla, w.mla, eager);
        prop_assert_eq!(u128::from(tree.kv_cache_bytes), cache * size);
        prop_assert_eq!(u128::from(sums.kv_cache_bytes), cache * size);
    }

    #[test]
    fn family_configs_sum_their_children_and_agree_without_the_tree((d, mla, route) in family(), (b, phase, dtype) in workloads(), eager in any::<bool>(), cuda in any::<bool>(), absorb in any::<bool>()) {
        // The sum and fast-path properties of the multi-head generator (above), on MLA
        // (both forms, both query paths) and every routing method.
        let (c, w, attn) = family_case(&d, &mla, &route, workload_on(b, phase, dtype, cuda), eager, absorb);
        let mut layers = modelmeter::layers::layers_of(&c, &w, attn).unwrap();
        layers.push(Box::new(DeepseekV2Decoder::new(&c, &w, attn)));
        for layer in layers {
            assert_sums_and_flop_views(&layer.cost().unwrap());
            assert_metrics_without_the_tree_equal_the_tree(layer.as_ref(), "generated family");
        }
    }

    #[test]
    fn projections_are_linear_in_tokens(d in dims(), b in 1u64..=4, s in 1u64..=64, dtype in prop::sample::select(vec![Dtype::Bf16, Dtype::F32])) {
        let c = config(&d);
        let one = LlamaAttention::new(&c, &workload(b, Phase::Prefill { seq_len: s }, dtype), AttentionImpl::Sdpa).cost().unwrap();
        let twice_s = LlamaAttention::new(&c, &workload(b, Phase::Prefill { seq_len: 2 * s }, dtype), AttentionImpl::Sdpa).cost().unwrap();
        let twice_b = LlamaAttention::new(&c, &workload(2 * b, Phase::Prefill { seq_len: s }, dtype), AttentionImpl::Sdpa).cost().unwrap();
        prop_assert_eq!(projections(&twice_s), 2 * projections(&one));
        prop_assert_eq!(projections(&twice_b), 2 * projections(&one));
        let n = b * s;
        let (h, hd, kvd) = (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim);
        prop_assert_eq!(projections(&one), 2 * n * h * hd + 2 * 2 * n * h * kvd + 2 * n * hd * h);
    }

    #[test]
    fn prefill_core_is_quadratic_in_s(d in dims(), b in 1u64..=4, s in 1u64..=64, eager in any::<bool>()) {
        let c = config(&d);
        let attn = if eager { AttentionImpl::Eager } else { AttentionImpl::Sdpa };
        let at = |s| core(&LlamaAttention::new(&c, &workload(b, Phase::Prefill { seq_len: s }, Dtype::Bf16), attn).cost().unwrap());
        prop_assert_eq!(at(2 * s), 4 * at(s));
        prop_assert_eq!(at(s), 4 * b * d.heads * s * s * d.head_dim);
    }

    #[test]
    fn decode_core_is_linear_in_context(d in dims(), b in 1u64..=4, ctx in 1u64..=256) {
        let c = config(&d);
        let at = |ctx| core(&LlamaAttention::new(&c, &workload(b, Phase::Decode { context_len: ctx }, Dtype::Bf16), AttentionImpl::Sdpa).cost().unwrap());
        prop_assert_eq!(at(ctx + 1) - at(ctx), 4 * b * d.heads * d.head_dim, "one more key");
        prop_assert_eq!(at(ctx), 4 * b * d.heads * (ctx + 1) * d.head_dim);
    }

    #[test]
    fn routed_experts_scale_with_k_not_e(d in dims(), b in 1u64..=4, s in 1u64..=32, extra_experts in 1u64..=8) {
        let w = workload(b, Phase::Prefill { seq_len: s }, Dtype::Bf16);
        let routed = |d: &Dims| {
            let cost = DeepseekV2MoE::new(&config(d), &w).unwrap().cost().unwrap();
            cost.child("experts").unwrap().metrics
        };
        let base = routed(&d);
        let n = b * s;
        prop_assert_eq!(base.matmul_flops, 6 * n * d.k * d.hidden * d.moe_intermediate);
        let more = Dims { experts: d.experts + extra_experts, ..d.clone() };
        let with_more = routed(&more);
        prop_assert_eq!(with_more.matmul_flops, base.matmul_flops, "independent of E");
        prop_assert!(with_more.weight_bytes > base.weight_bytes, "weights grow with E");
        let moe_weights = |d: &Dims| DeepseekV2MoE::new(&config(d), &w).unwrap().metrics().unwrap().weight_bytes;
        prop_assert!(moe_weights(&more) > moe_weights(&d));
        if d.k < d.experts {
            let more_k = Dims { k: d.k + 1, ..d.clone() };
            prop_assert_eq!(routed(&more_k).matmul_flops * d.k, base.matmul_flops * (d.k + 1), "∝ k");
        }
    }

    #[test]
    fn engines_follow_the_dtype_rule(d in dims(), (b, phase, _) in workloads(), eager in any::<bool>()) {
        let c = config(&d);
        let attn = if eager { AttentionImpl::Eager } else { AttentionImpl::Sdpa };
        let bf16 = all_layers(&c, &workload(b, phase, Dtype::Bf16), attn);
        let fp32 = all_layers(&c, &workload(b, phase, Dtype::F32), attn);
        let fp32_tf32 = all_layers(&c, &workload(b, phase, Dtype::F32).with_tf32(true), attn);
        let bf16_tf32 = all_layers(&c, &workload(b, phase, Dtype::Bf16).with_tf32(true), attn);
        for (((x, y), z), t) in bf16.iter().zip(&fp32).zip(&fp32_tf32).zip(&bf16_tf32) {
            let (mb, mf, mz, mt) = (x.metrics, y.metrics, z.metrics, t.metrics);
            // The same ops run in both dtypes: the FLOPs by class do not change.
            prop_assert_eq!(mb.matmul_flops, mf.matmul_flops, "{}", x.name);
            prop_assert_eq!(mb.elementwise_flops, mf.elementwise_flops, "{}", x.name);
            // bf16: every GEMM but the fp32 gate and rotary ones on tensor cores.
            let fp32_gemms = fp32_gemm_flops(x);
            prop_assert_eq!(mb.tensor_core_flops, mb.matmul_flops - fp32_gemms, "{}", x.name);
            prop_assert_eq!(mb.cuda_core_flops, mb.elementwise_flops + fp32_gemms, "{}", x.name);
            // fp32 with TF32 off: all on CUDA cores.
            prop_assert_eq!(mf.tensor_core_flops, 0, "{}", x.name);
            prop_assert_eq!(mf.cuda_core_flops, mf.matmul_flops + mf.elementwise_flops, "{}", x.name);
            // TF32 allowed: every GEMM on tensor cores, elementwise on CUDA cores.
            prop_assert_eq!(mz.tensor_core_flops, mz.matmul_flops, "{}", x.name);
            prop_assert_eq!(mt.tensor_core_flops, mt.matmul_flops, "{}", x.name);
            prop_assert_eq!(mt.cuda_core_flops, mt.elementwise_flops, "{}", x.name);
        }
    }

    #[test]
    fn cuda_attention_core_follows_the_kernel_that_runs(d in dims(), (b, phase, dtype) in workloads()) {
        let c = config(&d);
        let w = Workload::new(b, phase, dtype).unwrap();
        let cost = LlamaAttention::new(&c, &w, AttentionImpl::Sdpa).cost().unwrap();
        let core_node = cost.child(ATTENTION_CORE_ROLE).unwrap();
        let (sq, skv) = match phase {
            Phase::Prefill { seq_len } => (seq_len, seq_len),
            Phase::Decode { context_len } => (1, context_len + 1),
        };
        let half = matches!(dtype, Dtype::Bf16 | Dtype::F16);
        let hd = d.head_dim;
        // Written out, not SdpaKernel::select: bf16/fp16 up to d = 256 run fused (cuDNN,
        // or flash padding d to a multiple of 8 where cuDNN refuses it: d % 8 != 0 or a
        // single key); above 256 the efficient kernel when d % 8 == 0, else the math
        // path. fp32: the efficient kernel (3×TF32 tensor cores) when d % 4 == 0, else
        // the math path.
        let computed = if half && hd <= 256 { hd.div_ceil(8) * 8 } else { hd };
        let rectangle = 4 * b * d.heads * sq * skv * computed;
        prop_assert_eq!(core_node.metrics.matmul_flops, rectangle);
        let fused = core_node.ops().iter().any(|o| o.op.is_some_and(modelmeter::conventions::is_fused_attention));
        let expect_fused = if half { hd <= 256 || hd % 8 == 0 } else { hd % 4 == 0 };
        prop_assert_eq!(fused, expect_fused);
        let expected_tensor = if half || d.head_dim % 4 == 0 { rectangle } else { 0 };
        prop_assert_eq!(core_node.metrics.tensor_core_flops, expected_tensor);
    }

    #[test]
    fn generation_closed_form_equals_the_steps_one_by_one(
        d in dims(),
        b in 1u64..=3,
        prefill_len in 1u64..=64,
        new_tokens in 1u64..=40,
        dtype in prop::sample::select(vec![Dtype::Bf16, Dtype::F32]),
        cuda in any::<bool>(),
        eager in any::<bool>(),
    ) {
        // `Generation::metrics` sums the decode steps in closed form from the first three
        // (it assumes them affine in the context length); here every step is costed.
        let generation = Generation {
            config: config(&d),
            batch: b,
            prefill_len,
            new_tokens,
            dtype,
            allow_tf32: false,
            platform: if cuda { Platform::Cuda } else { Platform::Cpu },
            attention: if eager { AttentionImpl::Eager } else { AttentionImpl::Sdpa },
            mla: MlaForm::Naive,
        };
        let (closed, looped) = (generation.metrics().unwrap(), generation_step_by_step(&generation));
        prop_assert_eq!(closed, looped);
    }

    #[test]
    fn gate_is_never_tensor_core_work_in_bf16(d in dims(), (b, phase, _) in workloads()) {
        let c = config(&d);
        let m = MoEGate::new(&c, &workload(b, phase, Dtype::Bf16)).unwrap().metrics().unwrap();
        prop_assert_eq!(m.tensor_core_flops, 0);
        prop_assert_eq!(m.matmul_flops, 2 * b * (match phase { Phase::Prefill { seq_len } => seq_len, _ => 1 }) * d.hidden * d.experts);
    }
}

/// The stack's metrics for one forward call of generation `g`.
fn generation_stack(g: &Generation, phase: Phase) -> Metrics {
    let w = Workload::new(g.batch, phase, g.dtype)
        .unwrap()
        .with_tf32(g.allow_tf32)
        .on(g.platform)
        .with_mla(g.mla);
    DeepseekV2Decoder::new(&g.config, &w, g.attention)
        .metrics()
        .unwrap()
}

/// Successive calls combined by hand in u128 (independently of the library's
/// `accumulate`): the work of every call adds up, the state (weights, KV cache) is the
/// last call's, and the activation footprint is the largest call's.
fn successive_calls(calls: &[Metrics]) -> Metrics {
    let sum = |f: fn(&Metrics) -> u64| -> u64 {
        let total: u128 = calls.iter().map(|m| u128::from(f(m))).sum();
        u64::try_from(total).expect("the test's generations fit in 64 bits")
    };
    let last = calls.last().expect("at least one call");
    Metrics {
        matmul_flops: sum(|m| m.matmul_flops),
        elementwise_flops: sum(|m| m.elementwise_flops),
        tensor_core_flops: sum(|m| m.tensor_core_flops),
        cuda_core_flops: sum(|m| m.cuda_core_flops),
        io_bytes: sum(|m| m.io_bytes),
        weight_bytes: last.weight_bytes,
        kv_cache_bytes: last.kv_cache_bytes,
        activation_bytes: calls.iter().map(|m| m.activation_bytes).max().unwrap(),
    }
}

/// What [`Generation::metrics`] sums in closed form, costed step by step: the prefill's
/// stack, then one stack per decode step over a context one token longer each time.
fn generation_step_by_step(g: &Generation) -> GenerationMetrics {
    let prefill = generation_stack(
        g,
        Phase::Prefill {
            seq_len: g.prefill_len,
        },
    );
    let steps: Vec<Metrics> = (0..g.new_tokens)
        .map(|t| {
            generation_stack(
                g,
                Phase::Decode {
                    context_len: g.prefill_len + t,
                },
            )
        })
        .collect();
    if steps.is_empty() {
        // No decode step: nothing decoded, and the total is the prefill alone.
        return GenerationMetrics {
            prefill,
            decode: Metrics::default(),
            total: prefill,
        };
    }
    let decode = successive_calls(&steps);
    // The total over the prefill and every step at once: the same as combining the
    // prefill with the decode's combination, but not computed that way.
    let all: Vec<Metrics> = std::iter::once(prefill).chain(steps).collect();
    GenerationMetrics {
        prefill,
        decode,
        total: successive_calls(&all),
    }
}

#[test]
fn a_long_prefill_sets_the_generations_activation_bytes() {
    // A generation's activation_bytes (each call's sum of allocated op outputs, not a
    // peak) is the largest call's, not the last call's nor a sum over calls: a 300-token
    // prompt allocates more than any of 3 decode steps after it.
    for (config, mla) in [
        (ModelConfig::deepseek_ocr(), MlaForm::Naive),
        (
            ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap(),
            MlaForm::Absorb,
        ),
    ] {
        let g = Generation {
            config: config.first_layers(2).unwrap(),
            batch: 1,
            prefill_len: 300,
            new_tokens: 3,
            dtype: Dtype::Bf16,
            allow_tf32: false,
            platform: Platform::Cuda,
            attention: AttentionImpl::Sdpa,
            mla,
        };
        let m = g.metrics().unwrap();
        let prefill = generation_stack(&g, Phase::Prefill { seq_len: 300 });
        let steps: Vec<u64> = (0..3)
            .map(|t| {
                generation_stack(
                    &g,
                    Phase::Decode {
                        context_len: 300 + t,
                    },
                )
                .activation_bytes
            })
            .collect();
        let peak = steps
            .iter()
            .copied()
            .fold(prefill.activation_bytes, u64::max);
        assert!(
            steps.iter().all(|s| *s < prefill.activation_bytes),
            "{}: the prefill must be the largest call for this check to mean anything",
            config.name
        );
        assert_eq!(m.total.activation_bytes, peak, "{}", config.name);
        assert_eq!(m.prefill.activation_bytes, prefill.activation_bytes);
        assert_eq!(
            m.decode.activation_bytes,
            *steps.iter().max().unwrap(),
            "{}",
            config.name
        );
    }
}

#[test]
fn generation_closed_form_equals_the_steps_on_the_built_in_configs() {
    // The MLA configs (both forms), the CUDA kernels' choices and TF32, at two prompt
    // lengths: 40 steps each, of which the closed form costs three.
    for modelmeter::config::BuiltinConfig { name, .. } in modelmeter::config::BUILTIN_CONFIGS {
        let config = ModelConfig::builtin(name).unwrap().unwrap();
        for (prefill_len, platform, mla, allow_tf32) in [
            (1, Platform::Cuda, MlaForm::Naive, false),
            (100, Platform::Cuda, MlaForm::Absorb, true),
            (7, Platform::Cpu, MlaForm::Absorb, false),
        ] {
            for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
                let g = Generation {
                    config: config.clone(),
                    batch: 2,
                    prefill_len,
                    new_tokens: 40,
                    dtype: Dtype::Bf16,
                    allow_tf32,
                    platform,
                    attention,
                    mla,
                };
                assert_eq!(
                    g.metrics().unwrap(),
                    generation_step_by_step(&g),
                    "{name}, prefill {prefill_len}, {platform:?}, {mla:?}, {attention:?}"
                );
            }
        }
    }
}

#[test]
fn composites_sum_children_and_every_path_agrees_on_the_built_in_configs() {
    // The generated configs are multi-head attention with greedy softmax routing: here
    // the MLA configs (both forms), group-limited and noaux_tc routing, both backends'
    // kernels and both attention implementations. Each config is cut after its first MoE
    // layer, so that both kinds of decoder layer are in the stack.
    for modelmeter::config::BuiltinConfig { name, .. } in modelmeter::config::BUILTIN_CONFIGS {
        let full = ModelConfig::builtin(name).unwrap().unwrap();
        let first_moe = full
            .first_layer_of(MlpKind::Moe)
            .expect("every built-in has MoE");
        let config = full.first_layers(first_moe + 1).unwrap();
        for phase in [
            Phase::Prefill { seq_len: 5 },
            Phase::Decode { context_len: 9 },
        ] {
            for cuda in [false, true] {
                for mla in [MlaForm::Naive, MlaForm::Absorb] {
                    for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
                        let w = workload_on(2, phase, Dtype::Bf16, cuda).with_mla(mla);
                        let what =
                            format!("{name}, {phase:?}, cuda {cuda}, {mla:?}, {attention:?}");
                        let mut layers =
                            modelmeter::layers::layers_of(&config, &w, attention).unwrap();
                        layers.push(Box::new(DeepseekV2Decoder::new(&config, &w, attention)));
                        assert_eq!(layers.len(), 8, "{what}: every layer and the stack");
                        for layer in layers {
                            assert_sums_and_flop_views(&layer.cost().unwrap());
                            assert_metrics_without_the_tree_equal_the_tree(layer.as_ref(), &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn huge_sizes_are_errors_not_panics() {
    let c = ModelConfig::from_json_value(
        "huge",
        &json!({
            "hidden_size": u64::MAX / 2,
            "num_attention_heads": 2,
            "intermediate_size": u64::MAX / 3,
            "moe_intermediate_size": 7,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "vocab_size": u64::MAX,
        }),
    );
    // hidden/heads is odd → rejected before any arithmetic; use an even head_dim instead.
    let e = c.unwrap_err().to_string();
    assert!(
        e.contains("hidden_size") && e.contains("a multiple of num_attention_heads"),
        "{e}"
    );
    let c = ModelConfig::from_json_value(
        "huge",
        &json!({
            "hidden_size": 1u64 << 40,
            "num_attention_heads": 2,
            "intermediate_size": 1u64 << 40,
            "moe_intermediate_size": 7,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "vocab_size": 1u64 << 40,
        }),
    )
    .unwrap();
    let w = Workload::prefill(1u64 << 20, 1u64 << 20).unwrap();
    for layer in modelmeter::layers::layers_of(&c, &w, AttentionImpl::Sdpa).unwrap() {
        let e = layer.metrics().unwrap_err();
        assert!(
            e.to_string().contains("would overflow"),
            "{}: {e}",
            layer.name()
        );
    }
    let e = DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa)
        .metrics()
        .unwrap_err();
    assert!(e.to_string().contains("would overflow"), "stack: {e}");
    let e = DeepseekV2DecoderLayer::new(&c, &w, 1, AttentionImpl::Eager)
        .unwrap()
        .metrics()
        .unwrap_err();
    assert!(
        e.to_string().contains("would overflow"),
        "MoE decoder layer: {e}"
    );
}

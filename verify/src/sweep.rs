//! `--sweep N`: random valid configurations and workloads, small enough for any device,
//! each replayable with the plain options.

use serde_json::{json, Value};

use crate::environment::Environment;
use crate::oracle::Oracle;
use crate::plan::Plan;
use crate::report::{self, Case, Report};
use crate::results::Summary;

use modelmeter::layers::AttentionImpl;
use modelmeter::{MlaForm, ModelConfig, MoeConfig, Phase, Workload};

/// splitmix64: a tiny, seedable, dependency-free generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo ..= hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.next_u64() % one_in == 0
    }

    /// One of `xs` (not empty), uniformly.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.range(0, xs.len() as u64 - 1) as usize]
    }
}

/// One generated case.
#[derive(Clone, Debug)]
pub struct SweepCase {
    pub index: usize,
    /// The Hugging Face `config.json` of the case (written out for replays).
    pub config_json: Value,
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    /// The corner the case was moved into, if any ([`Corner`]).
    pub corner: Option<Corner>,
}

impl SweepCase {
    /// The case with the shapes Hugging Face transformers' modules can take
    /// (reference/parity/README.md): their Llama-style attention derives head_dim =
    /// hidden_size / heads, so a multi-head config keeps its drawn head dim (odd ones
    /// included) and takes hidden_size = heads · head_dim; an MLA config, which reads
    /// neither, takes hidden_size rounded down to a multiple of its heads.
    pub fn for_transformers(mut self) -> SweepCase {
        self.fit_hidden_size();
        self.reread("its hidden size")
    }

    /// [`SweepCase::for_transformers`]'s change, to the config's JSON only.
    fn fit_hidden_size(&mut self) {
        let cfg = &mut self.config_json;
        let heads = self.config.num_attention_heads;
        let hidden = match self.config.mla {
            None => {
                let object = cfg
                    .as_object_mut()
                    .expect("a generated config is an object");
                let head_dim = object.remove("head_dim").and_then(|d| d.as_u64());
                heads * head_dim.unwrap_or(self.config.head_dim)
            }
            Some(_) => heads * (self.config.hidden_size / heads).max(1),
        };
        cfg["hidden_size"] = hidden.into();
    }

    /// The case with its config read again from its JSON, after `what` was fitted.
    fn reread(mut self, what: &str) -> SweepCase {
        self.config = ModelConfig::from_json_value(&self.config.name, &self.config_json)
            .unwrap_or_else(|e| panic!("a generated config with {what} fitted stays valid: {e}"));
        self
    }

    /// [`SweepCase::for_transformers`], and what else the `--oracle` needs to judge every
    /// layer like for like: transformers routes softmax scores greedily (its V2 router)
    /// and sigmoid scores by `noaux_tc` (V3) only, so the scoring function follows the
    /// drawn top-k method, and a `noaux_tc` router keeps groups enough for its top-k (the
    /// vendor fills the experts of the other groups with 0.0, transformers with −inf: with
    /// fewer than k experts in the kept groups they pick other ones, reference/parity/
    /// README.md); an MLA attention runs the vendor's naive form, the one
    /// transformers has (the absorbed form's matmuls are other ones, and its other
    /// roundings, through a MoE layer's top-k in bf16, can pick other experts: an output
    /// 5 % off with nothing wrong), with an eager core: transformers hands SDPA values `d_v`
    /// wide where the vendor pads them to `d_qk` (reference/parity/README.md, "Values are
    /// not padded"), so the two counts of an SDPA core differ by design.
    pub fn for_oracle(mut self) -> SweepCase {
        self.fit_hidden_size();
        if let Some(moe) = &self.config.moe {
            let cfg = &mut self.config_json;
            let noaux = cfg["topk_method"] == "noaux_tc";
            cfg["scoring_func"] = json!(if noaux { "sigmoid" } else { "softmax" });
            let per_group = moe.n_routed_experts / moe.routing.n_group;
            let k = moe.num_experts_per_tok;
            if noaux && moe.routing.topk_group * per_group < k {
                cfg["topk_group"] = json!(k.div_ceil(per_group));
            }
        }
        let mut case = self.reread("its hidden size and router");
        if case.config.mla.is_some() {
            case.workload = case.workload.with_mla(MlaForm::Naive);
            case.attention = AttentionImpl::Eager;
        }
        case
    }
}

/// Head dims a sweep draws from half of the time (else 64 or 128): ones that CUDA
/// attention kernels treat specially: d % 8 != 0 (cuDNN refuses, flash pads), d % 4 != 0
/// (fp32 memory-efficient attention refuses: the math path runs), d > 128.
pub const UNUSUAL_HEAD_DIMS: [u64; 8] = [6, 20, 36, 40, 96, 160, 192, 256];

/// Case `index` of the sweep with `seed`: the same (seed, index) always gives the same
/// case. `base` gives the dtype, the TF32 setting and the platform of every case.
pub fn generate(seed: u64, index: usize, base: &Workload) -> SweepCase {
    let mut r = Rng::new(seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let head_dim = if r.chance(2) {
        r.pick(&UNUSUAL_HEAD_DIMS)
    } else if r.chance(2) {
        64
    } else {
        128
    };
    let heads = r.range(1, 8);
    let divisors: Vec<u64> = (1..=heads).filter(|d| heads % d == 0).collect();
    let kv_heads = r.pick(&divisors);
    let hidden = 64 * r.range(2, 8);
    let experts = r.range(2, 16);
    let k = r.range(1, experts.min(6));
    let config_json = json!({
        "model_type": "deepseek_v2",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": r.range(32, 1024),
        "moe_intermediate_size": r.range(16, 256),
        "n_routed_experts": experts,
        "num_experts_per_tok": k,
        // 0 shared experts as the vendor code means none: null (an explicit 0 runs a
        // zero-width MLP there, which the config reader refuses).
        "n_shared_experts": MoeConfig::n_shared_experts_field(r.range(0, 2)),
        "norm_topk_prob": r.chance(3),
        "routed_scaling_factor": 1.0,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "vocab_size": 1000,
        "attention_bias": r.chance(4),
        "use_mla": false,
        "torch_dtype": "bfloat16",
    });
    // MLA and V2/V3 routing: a third of the cases, drawn from a stream of their own so the
    // multi-head cases of a seed stay what they were.
    let mut m = Rng::new(seed ^ (index as u64).wrapping_mul(0x2d35_8dcc_aa6c_78a5) ^ 0x004d_4c41);
    let mut config_json = config_json;
    let mla = m.chance(3);
    if mla {
        mla_fields(&mut m, &mut config_json, experts);
    }
    // Corners the draws above never make: a third of the cases, from a stream of their
    // own again, so that the other cases stay what they were.
    let mut c = Rng::new(seed ^ (index as u64).wrapping_mul(0x8bb8_4b93_962e_acc9) ^ 0x636f_726e);
    let corner = c.chance(3).then(|| corner(&mut c, &mut config_json, mla));
    let config = ModelConfig::from_json_value(
        &format!("sweep seed {seed} case {}", index + 1),
        &config_json,
    )
    .expect("generated configs are valid");
    let batch = match corner {
        Some(Corner::WideBatch) => c.range(4, 8),
        _ => r.range(1, 3),
    };
    let phase = if r.chance(2) {
        Phase::Prefill {
            seq_len: r.range(1, 48),
        }
    } else {
        Phase::Decode {
            context_len: r.range(1, 48),
        }
    };
    let workload = Workload::new(batch, phase, base.dtype)
        .expect("generated workloads are valid")
        .with_tf32(base.allow_tf32)
        .on(base.platform);
    let attention = if r.chance(2) {
        AttentionImpl::Sdpa
    } else {
        AttentionImpl::Eager
    };
    let workload = match mla && m.chance(2) {
        true => workload.with_mla(MlaForm::Absorb),
        false => workload,
    };
    SweepCase {
        index,
        config_json,
        config,
        workload,
        attention,
        corner,
    }
}

/// A corner [`generate`] moved its case into (its private `corner` draws it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corner {
    /// MLA only: the narrowest rotary and latent widths (`qk_rope_head_dim` 2, 4 or 6,
    /// `qk_nope_head_dim` 8 or 24, `kv_lora_rank` 4, 8 or 12): a rotary slice of one pair
    /// is a view where wider ones are copies, and d_qk is no multiple of 8.
    NarrowMla,
    /// A hidden size that is no multiple of 64 (8 to 120 in steps of 8, 64 left out).
    NarrowHidden,
    /// Every routed expert chosen for every token (`num_experts_per_tok` = experts, greedy
    /// routing; at most 8 experts).
    EveryExpert,
    /// MLP widths of 1 to 4 (`intermediate_size`, `moe_intermediate_size`): GEMMs of one
    /// column, expert outputs smaller than their inputs.
    TinyMlp,
    /// Batches of 4 to 8 sequences.
    WideBatch,
}

impl Corner {
    /// Every corner, [`Corner::NarrowMla`] first.
    pub const ALL: [Corner; 5] = [
        Corner::NarrowMla,
        Corner::NarrowHidden,
        Corner::EveryExpert,
        Corner::TinyMlp,
        Corner::WideBatch,
    ];
}

/// Moves the case's config into one corner, drawn from `c`; returns which.
fn corner(c: &mut Rng, cfg: &mut Value, mla: bool) -> Corner {
    // NarrowMla, first in the list, only for MLA configs.
    let corners = if mla {
        &Corner::ALL[..]
    } else {
        &Corner::ALL[1..]
    };
    let chosen = c.pick(corners);
    match chosen {
        Corner::NarrowMla => {
            let d_r = c.pick(&[2, 4, 6]);
            let d_n = c.pick(&[8, 24]);
            cfg["qk_rope_head_dim"] = json!(d_r);
            cfg["qk_nope_head_dim"] = json!(d_n);
            cfg["v_head_dim"] = json!(c.pick(&[4, 8, 16]).min(d_n + d_r));
            cfg["kv_lora_rank"] = json!(c.pick(&[4, 8, 12]));
        }
        Corner::NarrowHidden => {
            // 8 to 120 in steps of 8, 64 left out.
            let k = c.range(1, 14);
            cfg["hidden_size"] = json!(8 * (k + u64::from(k >= 8)));
        }
        Corner::EveryExpert => {
            let experts = c.range(1, 8);
            cfg["n_routed_experts"] = json!(experts);
            cfg["num_experts_per_tok"] = json!(experts);
            cfg["topk_method"] = json!("greedy");
            cfg["n_group"] = json!(1);
            cfg["topk_group"] = json!(1);
        }
        Corner::TinyMlp => {
            cfg["intermediate_size"] = json!(c.range(1, 4));
            cfg["moe_intermediate_size"] = json!(c.range(1, 4));
        }
        Corner::WideBatch => {}
    }
    chosen
}

/// Turns the generated multi-head config into an MLA one (DeepSeek-V2/V3 keys): the query
/// with or without `q_lora_rank`, YaRN or plain rotary, and any `topk_method` /
/// `scoring_func`. Head dims are multiples of 8 with d_v ≤ d_qk, which every attention
/// form and SDPA kernel takes.
fn mla_fields(m: &mut Rng, cfg: &mut Value, experts: u64) {
    let d_n = m.pick(&[16, 32, 64, 128]);
    let d_r = m.pick(&[8, 16, 32, 64]);
    let d_v = m.pick(&[8, 16, 32, 64, 128]).min(d_n + d_r);
    cfg["use_mla"] = json!(true);
    cfg["q_lora_rank"] = if m.chance(2) {
        Value::Null
    } else {
        json!(16 * m.range(1, 8))
    };
    cfg["kv_lora_rank"] = json!(16 * m.range(1, 16));
    cfg["qk_nope_head_dim"] = json!(d_n);
    cfg["qk_rope_head_dim"] = json!(d_r);
    cfg["v_head_dim"] = json!(d_v);
    // MLA has no key/value head groups (the vendor reads num_attention_heads only).
    cfg["num_key_value_heads"] = cfg["num_attention_heads"].clone();
    if m.chance(2) {
        cfg["max_position_embeddings"] = json!(163_840);
        cfg["rope_scaling"] = json!({
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        });
    }
    cfg["scoring_func"] = json!(if m.chance(2) { "sigmoid" } else { "softmax" });
    cfg["routed_scaling_factor"] = json!(if m.chance(2) { 2.5 } else { 1.0 });
    let groups: Vec<u64> = (2..=experts).filter(|g| experts % g == 0).collect();
    let method = m.range(0, 2);
    match (method, groups.is_empty()) {
        (1, false) => {
            let g = m.pick(&groups);
            cfg["topk_method"] = json!("group_limited_greedy");
            cfg["n_group"] = json!(g);
            cfg["topk_group"] = json!(m.range(1, g));
        }
        (2, _) if experts >= 4 => {
            // noaux_tc: at least 2 experts per group.
            let g: Vec<u64> = (1..=experts / 2).filter(|g| experts % g == 0).collect();
            let g = m.pick(&g);
            cfg["topk_method"] = json!("noaux_tc");
            cfg["n_group"] = json!(g);
            cfg["topk_group"] = json!(m.range(1, g));
        }
        _ => {
            cfg["topk_method"] = json!("greedy");
            cfg["n_group"] = json!(1);
            cfg["topk_group"] = json!(1);
        }
    }
}

/// What every replay command of a sweep shares: the sweep's own options.
#[derive(Clone, Copy, Debug)]
pub struct Replay<'a> {
    /// The binary (the running one: a replay pasted anywhere runs the same build).
    pub program: &'a str,
    /// How the command names the device.
    pub device: &'a str,
    pub seed: u64,
    pub tolerance: f64,
    /// With the oracle, each replay runs it too, with the same interpreter.
    pub oracle: Option<&'a Oracle>,
}

impl Replay<'_> {
    /// The plain command line that reruns `case`, whose config was written to
    /// `config_path`, on `layers` (every layer the config has when empty or complete).
    pub fn command(&self, case: &SweepCase, config_path: &str, layers: &[&str]) -> String {
        let w = &case.workload;
        let phase = match w.phase {
            Phase::Prefill { seq_len } => format!("--seq-len {seq_len}"),
            Phase::Decode { context_len } => {
                format!("--phase decode --context-len {context_len}")
            }
        };
        // The absorbed form has no attention core to pick (--attn is refused with it).
        let (attn, mla) = match (w.mla.is_naive(), case.attention) {
            (true, AttentionImpl::Sdpa) => (" --attn sdpa", ""),
            (true, AttentionImpl::Eager) => (" --attn eager", ""),
            (false, _) => ("", " --mla absorb"),
        };
        let tf32 = if w.allow_tf32 { " --allow-tf32" } else { "" };
        let all = crate::plan::applicable_layers(&case.config).len();
        let layers = if layers.is_empty() || layers.len() >= all {
            String::new()
        } else {
            format!(" --layers {}", layers.join(","))
        };
        let oracle = match self.oracle {
            None => String::new(),
            Some(o) if o.python == crate::oracle::default_python() => " --oracle".to_string(),
            Some(o) => format!(
                " --oracle={}",
                shell_word(&format!("python={}", o.python.display()))
            ),
        };
        let Replay {
            program,
            device,
            seed,
            tolerance,
            ..
        } = self;
        format!(
            "{program} --device {device} --config {} --batch {} {phase} --dtype {}{attn} --seed {seed} --accept-rel-diff {tolerance}{tf32}{mla}{layers}{oracle}",
            shell_word(config_path),
            w.batch,
            w.dtype
        )
    }
}

/// The path of the running binary, quoted for a shell where it needs to be.
fn this_program() -> String {
    let path = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "verify-decoder".to_string());
    shell_word(&path)
}

/// `text` as one word for a POSIX shell: as it is when it holds only characters no shell
/// treats specially, else single-quoted (a `'` inside written `'\''`).
fn shell_word(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=".contains(c))
    {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Verifies `n` generated cases on the base plan's device, dtype, TF32 setting, layers,
/// tolerance and seed; `device` is how the replay commands name the device. A failing
/// case's config is written to the temporary folder and its replay command recorded.
/// With `oracle`, each case is drawn as transformers can run it
/// ([`SweepCase::for_oracle`]) and its layers get the oracle's rows too.
/// `progress` sees each case as it finishes.
pub fn run(
    base: &Plan,
    device: &str,
    n: usize,
    oracle: Option<&Oracle>,
    mut env: Environment,
    progress: &mut dyn FnMut(&Case, usize),
) -> Report {
    // Each case draws its own attention: none was asked for the sweep as a whole.
    env.attention = None;
    let program = this_program();
    let replay = Replay {
        program: &program,
        device,
        seed: base.seed,
        tolerance: base.tolerance,
        oracle,
    };
    let mut cases = Vec::new();
    for index in 0..n {
        let mut generated = generate(base.seed, index, &base.workload);
        if oracle.is_some() {
            generated = generated.for_oracle();
        }
        let plan = Plan {
            config: generated.config.clone(),
            workload: generated.workload.clone(),
            attention: generated.attention,
            ..base.clone()
        };
        let mut layers = crate::runner::verify(&plan, &mut |_| {});
        if let Some(oracle) = oracle {
            crate::oracle::apply(&plan, &mut layers, oracle);
        }
        let replay = (!Summary::of(&layers).ok()).then(|| {
            let path = std::env::temp_dir().join(format!(
                "modelmeter-sweep-{}-{}.json",
                base.seed,
                index + 1
            ));
            let text = serde_json::to_string_pretty(&generated.config_json).unwrap_or_default();
            let written =
                report::write_atomically(&path, &text).map(|_| path.display().to_string());
            let shown =
                written.unwrap_or_else(|e| format!("<could not write {}: {e}>", path.display()));
            let names: Vec<&str> = base
                .layers
                .iter()
                .map(|k| {
                    k.name_for(
                        &generated.config,
                        generated.workload.mla,
                        generated.attention,
                    )
                })
                .collect();
            replay.command(&generated, &shown, &names)
        });
        let case = Case::of(&plan, layers, Some(index), replay, &mut env);
        progress(&case, n);
        cases.push(case);
    }
    Report {
        environment: env,
        tolerance: base.tolerance,
        cases,
        sweep: Some((base.seed, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32() -> Workload {
        Workload::prefill(1, 1)
            .unwrap()
            .with_dtype(modelmeter::Dtype::F32)
            .unwrap()
    }

    /// The generator is splitmix64: seed 0's first outputs are the reference
    /// implementation's (Vigna, `splitmix64.c`), so a sweep's cases are the ones its seed
    /// names on any build. `range` covers both ends and nothing outside.
    #[test]
    fn the_generator_is_splitmix64() {
        let mut r = Rng::new(0);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            first,
            [
                0xe220_a839_7b1d_cdaf,
                0x6e78_9e6a_a1b9_65f4,
                0x06c4_5d18_8009_454f
            ]
        );
        let mut r = Rng::new(7);
        let drawn: Vec<u64> = (0..200).map(|_| r.range(3, 6)).collect();
        for v in 3..=6 {
            assert!(drawn.contains(&v), "{v} never drawn");
        }
        assert!(drawn.iter().all(|v| (3..=6).contains(v)));
        assert_eq!(Rng::new(9).range(4, 4), 4);
    }

    /// What [`SweepCase::for_oracle`] changes, over many draws: only the hidden size
    /// (multi-head: heads · the drawn head dim), a scoring function no transformers router
    /// takes with its top-k method, and an MLA attention's form and core; the workload's
    /// batch, phase and dtype never.
    #[test]
    fn oracle_cases_are_what_transformers_runs() {
        use modelmeter::routing::{ScoringFunc, TopkMethod};
        let (mut routers_fitted, mut cores_fitted) = (0, 0);
        for i in 0..300 {
            let drawn = generate(5, i, &fp32());
            let case = drawn.clone().for_oracle();
            let (c, d) = (&case.config, &drawn.config);
            assert_eq!(
                case.workload.clone().with_mla(MlaForm::Naive),
                drawn.workload.clone().with_mla(MlaForm::Naive)
            );
            assert_eq!(c.num_attention_heads, d.num_attention_heads);
            match c.mla {
                None => {
                    assert_eq!(c.head_dim, d.head_dim);
                    assert_eq!(c.hidden_size, c.num_attention_heads * c.head_dim);
                }
                // Rounded down to a multiple of the heads, never below one per head.
                Some(_) => assert_eq!(
                    c.hidden_size,
                    c.num_attention_heads * (d.hidden_size / c.num_attention_heads).max(1),
                    "case {i}"
                ),
            }
            let (fitted, drawn_moe) = (c.moe.as_ref().unwrap(), d.moe.as_ref().unwrap());
            let routing = fitted.routing;
            assert_eq!(routing.topk_method, drawn_moe.routing.topk_method);
            let v3 = routing.topk_method == TopkMethod::NoauxTc;
            let scoring = if v3 {
                ScoringFunc::Sigmoid
            } else {
                ScoringFunc::Softmax
            };
            assert_eq!(routing.scoring_func, scoring, "case {i}");
            routers_fitted += usize::from(routing != drawn_moe.routing);
            // Only a noaux_tc router whose kept groups hold fewer than k experts keeps
            // more groups: as many as k needs.
            let per_group = fitted.n_routed_experts / routing.n_group;
            let drawn_group = drawn_moe.routing.topk_group;
            let k = fitted.num_experts_per_tok;
            let group = if v3 && drawn_group * per_group < k {
                k.div_ceil(per_group)
            } else {
                drawn_group
            };
            assert_eq!(routing.topk_group, group, "case {i}");
            if v3 {
                assert!(routing.topk_group * per_group >= k);
            }
            let attention = match c.mla {
                Some(_) => AttentionImpl::Eager,
                None => drawn.attention,
            };
            assert_eq!(case.attention, attention, "case {i}");
            assert!(case.workload.mla.is_naive(), "case {i}");
            cores_fitted += usize::from(
                case.attention != drawn.attention || case.workload.mla != drawn.workload.mla,
            );
        }
        // Both fits happen in such a sweep.
        assert!(routers_fitted > 0 && cores_fitted > 0);
        // A noaux_tc router whose kept groups hold fewer than k experts (about one draw in
        // 600) keeps as many groups as k needs, and nothing else changes.
        // Every such draw in 6,000, one kept group short by a single expert among them
        // (topk_group 1, k = experts per group + 1).
        let short: Vec<SweepCase> = (0..6000)
            .map(|i| generate(5, i, &fp32()))
            .filter(|c| {
                let m = c.config.moe.as_ref().unwrap();
                let r = m.routing;
                r.topk_method == TopkMethod::NoauxTc
                    && r.topk_group * (m.n_routed_experts / r.n_group) < m.num_experts_per_tok
            })
            .collect();
        let mut one_short = false;
        for case in short {
            let (drawn, fitted) = (case.config.moe.clone().unwrap(), case.for_oracle());
            let moe = fitted.config.moe.unwrap();
            let per_group = moe.n_routed_experts / moe.routing.n_group;
            one_short |= drawn.routing.topk_group == 1 && moe.num_experts_per_tok == per_group + 1;
            assert_eq!(
                moe.routing.topk_group,
                moe.num_experts_per_tok.div_ceil(per_group)
            );
            assert_eq!(
                (
                    moe.n_routed_experts,
                    moe.routing.n_group,
                    moe.num_experts_per_tok
                ),
                (
                    drawn.n_routed_experts,
                    drawn.routing.n_group,
                    drawn.num_experts_per_tok
                )
            );
        }
        assert!(one_short, "no draw short by one expert");
    }

    #[test]
    fn cases_are_valid_varied_and_reproducible() {
        let cases: Vec<SweepCase> = (0..200).map(|i| generate(7, i, &fp32())).collect();
        let again = generate(7, 13, &fp32());
        assert_eq!(again.config, cases[13].config);
        assert_eq!(again.workload, cases[13].workload);
        assert!(cases
            .iter()
            .any(|c| matches!(c.workload.phase, Phase::Decode { .. })));
        assert!(cases.iter().any(|c| c.attention == AttentionImpl::Eager));
        assert!(cases
            .iter()
            .any(|c| c.config.num_key_value_heads < c.config.num_attention_heads));
        assert!(cases.iter().any(|c| c.config.attention_bias));
        for c in &cases {
            assert_eq!(
                c.config.layer_kinds,
                vec![modelmeter::MlpKind::Dense, modelmeter::MlpKind::Moe]
            );
        }
        assert_ne!(generate(8, 13, &fp32()).config_json, cases[13].config_json);
        // Outside the corners, the drawn sizes stay in their ranges: a hidden size of
        // 128 ..= 512 in steps of 64, 1 ..= 8 heads, 2 ..= 16 experts, 1 ..= 6 of them
        // per token.
        for c in cases.iter().filter(|c| c.corner.is_none()) {
            let (cfg, moe) = (&c.config, c.config.moe.as_ref().unwrap());
            assert!(
                cfg.hidden_size % 64 == 0 && (128..=512).contains(&cfg.hidden_size),
                "case {}: hidden_size {}",
                c.index,
                cfg.hidden_size
            );
            assert!((1..=8).contains(&cfg.num_attention_heads));
            assert!((2..=16).contains(&moe.n_routed_experts));
            assert!((1..=moe.n_routed_experts.min(6)).contains(&moe.num_experts_per_tok));
        }
        for d in UNUSUAL_HEAD_DIMS.into_iter().chain([64, 128]) {
            assert!(
                cases.iter().any(|c| c.config.head_dim == d),
                "no case with head dim {d}"
            );
        }
        assert!(cases
            .iter()
            .all(|c| c.workload.dtype == modelmeter::Dtype::F32));
    }

    #[test]
    fn a_third_of_the_cases_sit_in_a_corner_and_every_corner_is_drawn() {
        let cases: Vec<SweepCase> = (0..200).map(|i| generate(7, i, &fp32())).collect();
        let cornered = cases.iter().filter(|c| c.corner.is_some()).count();
        assert!(
            (40..100).contains(&cornered),
            "{cornered} cases in a corner"
        );
        let moe = |c: &SweepCase| c.config.moe.clone().unwrap();
        for corner in Corner::ALL {
            let of: Vec<&SweepCase> = cases.iter().filter(|c| c.corner == Some(corner)).collect();
            assert!(!of.is_empty(), "no case in {corner:?}");
            for c in of {
                let holds = match corner {
                    Corner::NarrowMla => c
                        .config
                        .mla
                        .as_ref()
                        .is_some_and(|m| m.qk_rope_head_dim <= 6 && m.kv_lora_rank <= 12),
                    Corner::NarrowHidden => c.config.hidden_size % 64 != 0,
                    Corner::EveryExpert => moe(c).num_experts_per_tok == moe(c).n_routed_experts,
                    Corner::TinyMlp => {
                        c.config.intermediate_size <= 4 && moe(c).moe_intermediate_size <= 4
                    }
                    Corner::WideBatch => c.workload.batch >= 4,
                };
                assert!(holds, "case {} is not in {corner:?}", c.index);
            }
        }
        // Every corner holds whatever the seed (`NarrowHidden` once drew 64).
        for seed in 0..20 {
            for c in (0..200).map(|i| generate(seed, i, &fp32())) {
                match c.corner {
                    Some(Corner::NarrowHidden) => assert_ne!(c.config.hidden_size % 64, 0),
                    Some(Corner::TinyMlp) => assert!(c.config.intermediate_size <= 4),
                    Some(Corner::WideBatch) => assert!(c.workload.batch >= 4),
                    _ => {}
                }
            }
        }
        // The one-pair rotary, where the vendor's de-interleave is a view, not a copy.
        assert!(cases.iter().any(|c| c
            .config
            .mla
            .as_ref()
            .is_some_and(|m| m.qk_rope_head_dim == 2)));
        // A single routed expert, chosen for every token.
        assert!(cases.iter().any(|c| moe(c).n_routed_experts == 1));
    }

    #[test]
    fn a_third_of_the_cases_are_mla_with_every_routing_method() {
        use modelmeter::{ScoringFunc, TopkMethod};
        let cases: Vec<SweepCase> = (0..200).map(|i| generate(7, i, &fp32())).collect();
        let mla: Vec<&SweepCase> = cases.iter().filter(|c| c.config.mla.is_some()).collect();
        assert!((40..100).contains(&mla.len()), "{} MLA cases", mla.len());
        let routing = |c: &&SweepCase| c.config.moe.as_ref().unwrap().routing;
        for method in [
            TopkMethod::Greedy,
            TopkMethod::GroupLimitedGreedy,
            TopkMethod::NoauxTc,
        ] {
            assert!(
                mla.iter().any(|c| routing(c).topk_method == method),
                "{method:?}"
            );
        }
        assert!(mla
            .iter()
            .any(|c| routing(c).scoring_func == ScoringFunc::Sigmoid));
        assert!(mla.iter().any(|c| c.workload.mla == MlaForm::Absorb));
        assert!(mla.iter().any(|c| c.workload.mla == MlaForm::Naive));
        assert!(mla.iter().any(|c| c.config.rope_scaling.is_some()));
        assert!(mla
            .iter()
            .any(|c| c.config.mla.as_ref().unwrap().q_lora_rank.is_some()));
        assert!(mla
            .iter()
            .any(|c| c.config.mla.as_ref().unwrap().q_lora_rank.is_none()));
        assert!(cases
            .iter()
            .filter(|c| c.config.mla.is_none())
            .all(|c| c.workload.mla == MlaForm::Naive));
        let absorbed = mla
            .iter()
            .find(|c| c.workload.mla == MlaForm::Absorb)
            .unwrap();
        let replay = Replay {
            program: "verify-decoder",
            device: "cpu",
            seed: 7,
            tolerance: 0.0,
            oracle: None,
        };
        let cmd = replay.command(absorbed, "/tmp/x.json", &[]);
        assert!(cmd.contains("--mla absorb"), "{cmd}");
        // The absorbed form takes no --attn (refused with it): the replay must run.
        assert!(!cmd.contains("--attn"), "{cmd}");
        let naive = mla.iter().find(|c| c.workload.mla.is_naive()).unwrap();
        let cmd = replay.command(naive, "/tmp/x.json", &[]);
        assert!(cmd.contains("--attn ") && !cmd.contains("--mla"), "{cmd}");
    }

    #[test]
    fn the_analytic_fast_path_equals_the_breakdown_on_the_sweeps_cases() {
        // `Layer::metrics()` (no tree, no liveness) against the root of `Layer::cost()`, for
        // every layer of 200 sweep cases (MLA in both forms, every routing method, unusual
        // head dims), prefill and decode, on both platforms, in each model dtype. The
        // generator draws each case's batch and phase (the base gives dtype, TF32 and
        // platform): both phases must be among them.
        use modelmeter::layers::{layers_of, DeepseekV2Decoder};
        use modelmeter::{Dtype, Phase, Platform};
        let (mut compared, mut decodes) = (0, 0);
        for (i, dtype) in (0..200).zip([Dtype::F32, Dtype::Bf16, Dtype::F16].iter().cycle()) {
            let platform = if i % 2 == 0 {
                Platform::Cuda
            } else {
                Platform::Cpu
            };
            let base = Workload::prefill(1, 1)
                .unwrap()
                .with_dtype(*dtype)
                .unwrap()
                .on(platform);
            let case = generate(11, i, &base);
            decodes += usize::from(matches!(case.workload.phase, Phase::Decode { .. }));
            let mut layers = layers_of(&case.config, &case.workload, case.attention).unwrap();
            layers.push(Box::new(DeepseekV2Decoder::new(
                &case.config,
                &case.workload,
                case.attention,
            )));
            for layer in layers {
                let tree = layer.cost().unwrap();
                assert_eq!(
                    layer.metrics().unwrap(),
                    tree.metrics,
                    "case {i}: {}",
                    tree.name
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 200 * 8, "seven layers and the stack per case");
        assert!((1..200).contains(&decodes), "{decodes} of 200 cases decode");
    }

    /// A replay command runs the binary that ran the sweep: here, this test binary (its
    /// path needs no quoting).
    #[test]
    fn a_replay_names_the_running_binary() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(this_program(), exe.display().to_string());
        assert!(std::path::Path::new(&this_program()).is_file());
    }

    #[test]
    fn replay_uses_plain_options() {
        let c = generate(1, 0, &fp32());
        let replay = Replay {
            program: "verify-decoder",
            device: "cpu",
            seed: 1,
            tolerance: 0.05,
            oracle: None,
        };
        let cmd = replay.command(&c, "/tmp/x.json", &[]);
        assert!(
            cmd.starts_with("verify-decoder --device cpu ")
                && cmd.contains("--config /tmp/x.json")
                && cmd.contains("--dtype fp32")
                && cmd.contains("--device cpu"),
            "{cmd}"
        );
        assert!(!cmd.contains("--layers"));
        assert!(
            cmd.contains(" --accept-rel-diff 0.05") && !cmd.contains("--allow-tf32"),
            "{cmd}"
        );
        // The sweep's tolerance and TF32 setting travel with the replay.
        let tf32 = generate(1, 0, &fp32().with_tf32(true));
        let exact = Replay {
            tolerance: 0.0,
            ..replay
        };
        let cmd = exact.command(&tf32, "/tmp/x.json", &[]);
        assert!(
            cmd.contains(" --accept-rel-diff 0 ") && cmd.contains(" --allow-tf32"),
            "{cmd}"
        );
        let cmd = replay.command(&c, "/tmp/x.json", &["MoEGate", "DeepseekV2MLP"]);
        assert!(cmd.ends_with("--layers MoEGate,DeepseekV2MLP"), "{cmd}");
        // With the oracle, the replay runs it with the same interpreter.
        let python = |path: &str| Oracle {
            python: path.into(),
        };
        let default = python(&crate::oracle::default_python().display().to_string());
        let with = |oracle| Replay {
            oracle: Some(oracle),
            ..replay
        };
        let cmd = with(&default).command(&c, "/x.json", &[]);
        assert!(cmd.ends_with(" --oracle"), "{cmd}");
        let other = python("/opt/my py/bin/python");
        let cmd = with(&other).command(&c, "/x.json", &[]);
        assert!(
            cmd.ends_with(" --oracle='python=/opt/my py/bin/python'"),
            "{cmd}"
        );
        // A temporary folder with a blank, a quote or a `<` stays one word for the shell.
        let cmd = replay.command(&c, "/tmp/my dir/it's <1>.json", &[]);
        assert!(
            cmd.contains(r"--config '/tmp/my dir/it'\''s <1>.json' --batch"),
            "{cmd}"
        );
        assert_eq!(shell_word("a/b-c_1.json"), "a/b-c_1.json");
        assert_eq!(shell_word(""), "''");
    }
}

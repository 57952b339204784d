//! Parity with Hugging Face transformers: exports a reference module's weights, inputs
//! and output (`case.safetensors` + `case.json`, format in `reference/parity/README.md`)
//! and runs `reference/parity/parity.py`, which loads them into the independent
//! transformers DeepSeek-V2 / DeepSeek-OCR-2 modules and compares outputs in fp32.

use std::path::{Path, PathBuf};
use std::process::Command;

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, MlaForm, MlpKind, ModelConfig, Phase, Workload};
use serde::Deserialize;
use serde_json::json;
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::harness::{context_inputs, ModuleKind, Prepared, RefModule};
use crate::weights::Setup;
use crate::Parameters;

/// The parity script: `MODELMETER_PARITY_SCRIPT` when set (a binary run away from its
/// source tree, as the GPU bundle is), else the one in the source tree.
pub fn script() -> PathBuf {
    std::env::var_os("MODELMETER_PARITY_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("parity/parity.py"))
}

/// The Python with transformers: `MODELMETER_PYTHON` (set by `.cargo/config.toml`), or
/// the repository's `.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("MODELMETER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn module_name(kind: ModuleKind) -> &'static str {
    match kind {
        ModuleKind::RmsNorm => "rms_norm",
        ModuleKind::Mlp => "mlp",
        ModuleKind::MoEGate => "moe_gate",
        ModuleKind::MoE => "moe",
        ModuleKind::Attention => "attention",
        ModuleKind::DecoderLayer(_) => "decoder_layer",
        ModuleKind::EmbedTokens => "embed_tokens",
        ModuleKind::LmHead => "lm_head",
    }
}

/// Writes the case of `kind` (fp32, CPU) for `config` and `workload` into `dir`.
pub fn export_case(
    dir: &Path,
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    seed: u64,
) -> Result<()> {
    export_edited_case(dir, kind, config, workload, attention, seed, |_| Ok(()))
}

/// [`export_case`] after `edit` has changed the prepared module or its inputs in place
/// (a parameter set to a chosen value, through the storage that
/// [`Parameters::parameters`] shares): the reference output is computed after the edit.
/// For cases that the seeded draw does not reach.
pub fn export_edited_case(
    dir: &Path,
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    seed: u64,
    edit: impl FnOnce(&mut Prepared) -> Result<()>,
) -> Result<()> {
    let workload = workload.clone().with_dtype(Dtype::F32)?;
    let setup = Setup {
        device: Device::Cpu,
        seed,
    };
    let mut prepared = Prepared::new(kind, config, &workload, attention, &setup)?;
    edit(&mut prepared)?;
    export_prepared(dir, prepared, config, &workload, attention, &setup)
}

/// Writes the case of `kind` as the module runs on `setup.device` in the workload's
/// dtype: weights, inputs and the reference output, stored as fp32 on the CPU (exact for
/// bf16 and fp16 values), so the oracle can rebuild the same module on that device.
pub fn export_case_on(
    dir: &Path,
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<()> {
    let prepared = Prepared::new(kind, config, workload, attention, setup)?;
    export_prepared(dir, prepared, config, workload, attention, setup)
}

fn export_prepared(
    dir: &Path,
    mut prepared: Prepared,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<()> {
    let kind = prepared.kind;
    let _no_grad = tch::no_grad_guard();
    let mut tensors: Vec<(String, Tensor)> = prepared.module.parameters();
    tensors.push(("input".into(), prepared.inputs.hidden.shallow_clone()));
    // The tokens whose prefill filled the cache of a decode step: transformers' MLA
    // caches the latent, which the vendor's decompressed keys and values cannot be turned
    // back into, so it prefills its own cache from them.
    if let Some(context) =
        context_inputs(kind, &prepared.module, config, workload, attention, setup)?
    {
        tensors.push(("context".into(), context.hidden));
        tensors.push(("context_position_ids".into(), context.position_ids));
    }
    if kind.uses_positions() {
        tensors.push((
            "position_ids".into(),
            prepared.inputs.position_ids.shallow_clone(),
        ));
        if let Some(mask) = &prepared.inputs.mask {
            tensors.push(("attention_mask".into(), mask.shallow_clone()));
        }
        if let Some((k, v)) = prepared.cache.contents() {
            tensors.push(("past_key".into(), k.copy()));
            tensors.push(("past_value".into(), v.copy()));
        }
    }
    match &prepared.module {
        RefModule::MoEGate(gate) => {
            let routing = gate.forward(&prepared.inputs.hidden)?;
            tensors.push(("topk_idx".into(), routing.topk_idx));
            tensors.push(("topk_weight".into(), routing.topk_weight));
        }
        _ => {
            let (output, tokens_per_expert) = prepared.forward()?;
            tensors.push(("output".into(), output));
            // An MoE's routing, as the tokens each expert received (the vendor's
            // `tokens_per_expert`): the script compares transformers' router with it.
            if let Some(tokens) = tokens_per_expert {
                tensors.push(("tokens_per_expert".into(), Tensor::from_slice(&tokens)));
            }
        }
    }
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = t.f_to_device(Device::Cpu)?;
            let t = if t.is_floating_point() {
                t.f_to_kind(tch::Kind::Float)?
            } else {
                t
            };
            Ok((n, t.f_contiguous()?))
        })
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(dir).map_err(|cause| Error::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    Tensor::write_safetensors(&tensors, dir.join("case.safetensors"))?;

    let layer_idx = match kind {
        ModuleKind::DecoderLayer(i) => i,
        _ => 0,
    };
    let moe = config.moe.clone();
    let routing = moe.as_ref().map(|m| m.routing);
    let mla = config.mla.as_ref();
    let description = json!({
        "module": module_name(kind),
        "phase": match workload.phase { Phase::Prefill { .. } => "prefill", Phase::Decode { .. } => "decode" },
        "attn": match attention { AttentionImpl::Sdpa => "sdpa", AttentionImpl::Eager => "eager" },
        // MLA only: the vendor form the reference ran (what its cache holds).
        "mla_form": mla.map(|_| match workload.mla { MlaForm::Naive => "naive", MlaForm::Absorb => "absorb" }),
        "config": {
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "mlp_width": config.intermediate_size,
            "moe_intermediate_size": moe.as_ref().map(|m| m.moe_intermediate_size),
            "n_routed_experts": moe.as_ref().map(|m| m.n_routed_experts),
            "num_experts_per_tok": moe.as_ref().map(|m| m.num_experts_per_tok),
            "n_shared_experts": moe.as_ref().map(|m| m.n_shared_experts),
            "norm_topk_prob": moe.as_ref().is_some_and(|m| m.norm_topk_prob),
            "routed_scaling_factor": moe.as_ref().map_or(1.0, |m| m.routed_scaling_factor),
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "attention_bias": config.attention_bias,
            "mlp_kind": match config.layer_kind(layer_idx)? { MlpKind::Dense => "dense", MlpKind::Moe => "sparse" },
            "layer_idx": layer_idx,
            "scoring_func": routing.map(|r| r.scoring_func.name()),
            "topk_method": routing.map(|r| r.topk_method.name()),
            "n_group": routing.map(|r| r.n_group),
            "topk_group": routing.map(|r| r.topk_group),
            "q_lora_rank": mla.and_then(|m| m.q_lora_rank),
            "kv_lora_rank": mla.map(|m| m.kv_lora_rank),
            "qk_nope_head_dim": mla.map(|m| m.qk_nope_head_dim),
            "qk_rope_head_dim": mla.map(|m| m.qk_rope_head_dim),
            "v_head_dim": mla.map(|m| m.v_head_dim),
            "rope_scaling": config.rope_scaling.as_ref().map(|y| json!({
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale,
                "mscale_all_dim": y.mscale_all_dim,
            })),
            "max_position_embeddings": config.max_position_embeddings,
        },
    });
    let path = dir.join("case.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&description).unwrap_or_default(),
    )
    .map_err(|cause| Error::Io { path, cause })
}

/// The verdict of the parity script on one case.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ParityResult {
    pub case: String,
    pub module: Option<String>,
    /// ‖out − ref‖ / ‖ref‖ in fp32 (null when the case could not run).
    pub rel_err: Option<f64>,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// `prefill` or `decode`.
    #[serde(default)]
    pub phase: Option<String>,
    /// The transformers class that ran the case (MoE, gate, MLA decoder layer).
    #[serde(default)]
    pub hf_class: Option<String>,
    /// MLA attention: rel_err against each transformers attention class.
    #[serde(default)]
    pub rel_err_by_class: std::collections::BTreeMap<String, Option<f64>>,
    /// The named adapters that bridged a known difference (README).
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Gate cases: whether the selected experts are equal as sets per token.
    #[serde(default)]
    pub idx_match: Option<bool>,
    /// MLA decode: ‖HF's cache, decompressed − the exported cache‖ / ‖exported‖.
    #[serde(default)]
    pub cache_rel_err: Option<f64>,
    /// MLA: tokens transformers' `kv_b_proj` decompressed in the step (every cached one).
    #[serde(default)]
    pub hf_kv_b_proj_tokens: Option<u64>,
    /// MLA: tokens the vendor's `kv_b_proj` decompresses in the step (the new ones; 0 absorbed).
    #[serde(default)]
    pub vendor_kv_b_proj_tokens: Option<u64>,
    /// V3 router: tokens whose experts transformers' −inf fill could choose differently
    /// from the vendor's 0.0 fill.
    #[serde(default)]
    pub v3_fill_sensitive_rows: Option<u64>,
    /// MoE and MoE decoder-layer cases: on how many experts transformers' router and the
    /// reference's gate disagree about the tokens routed there (0: the same counts).
    #[serde(default)]
    pub routed_count_mismatched_experts: Option<u64>,
}

/// One known difference between transformers and the vendor code, probed on the
/// installed transformers (`parity.py --known-differences`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct KnownDifference {
    pub difference: String,
    pub present: bool,
    /// Where transformers does it (file:line).
    pub evidence: String,
    pub detail: String,
}

/// Probes every difference the parity adapters name; an error when the script cannot run.
pub fn known_differences() -> Result<Vec<KnownDifference>> {
    let python = python();
    let out = Command::new(&python)
        .arg(script())
        .arg("--known-differences")
        .output()
        .map_err(|e| Error::Parity(format!("cannot run {}: {e}", python.display())))?;
    let found: Vec<KnownDifference> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::Parity(format!("unreadable difference line {l}: {e}")))
        })
        .collect::<Result<_>>()?;
    if found.is_empty() || out.status.code() == Some(2) {
        return Err(Error::Parity(format!(
            "parity.py --known-differences exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(found)
}

/// Runs the parity script over `dirs`; one result per case. An error when the script
/// cannot start or reports a usage error.
pub fn run_parity(dirs: &[PathBuf]) -> Result<Vec<ParityResult>> {
    let python = python();
    let out = Command::new(&python)
        .arg(script())
        .args(dirs)
        .output()
        .map_err(|e| {
            Error::Parity(format!(
                "cannot run {}: {e}; run scripts/setup-libtorch",
                python.display()
            ))
        })?;
    let results: Vec<ParityResult> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::Parity(format!("unreadable result line {l}: {e}")))
        })
        .collect::<Result<_>>()?;
    if results.len() != dirs.len()
        || out.status.code() == Some(2) && results.iter().all(|r| r.error.is_none())
    {
        return Err(Error::Parity(format!(
            "parity.py exited with {} and {} results for {} cases: {}",
            out.status,
            results.len(),
            dirs.len(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(results)
}

/// What torch's own `FlopCounterMode` reported for one case run by the independent
/// transformers module on the oracle's device and dtype, and how far its output is from
/// the reference module's.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct OracleResult {
    pub case: String,
    pub module: Option<String>,
    /// ‖out − ref‖ / ‖ref‖ (null when the case could not run).
    pub rel_err: Option<f64>,
    /// MoE gate cases: whether the selected experts match.
    #[serde(default)]
    pub idx_match: Option<bool>,
    /// MoE gate cases: on how many tokens they differ.
    #[serde(default)]
    pub idx_mismatched_rows: Option<u64>,
    /// V3 (`noaux_tc`) router cases: the tokens of this input where transformers' fill of
    /// the experts outside the chosen groups (−inf) can choose other experts than the
    /// vendor's (0.0) (reference/parity/README.md).
    #[serde(default)]
    pub v3_fill_sensitive_rows: Option<u64>,
    /// MoE and MoE decoder-layer cases: on how many experts transformers' router sent
    /// another number of tokens than the reference's gate did (the script compares its
    /// counts with the exported `tokens_per_expert`). Why an output differs, not a check
    /// of its own: in bf16 or fp16 a near tie of two experts' scores, rounded differently
    /// before the gate, can send a token elsewhere.
    #[serde(default)]
    pub routed_count_mismatched_experts: Option<u64>,
    /// Eager attention cases: whether the causal mask the reference exported has the
    /// pattern of transformers' own (`create_causal_mask`).
    #[serde(default)]
    pub mask_match: Option<bool>,
    /// MLA decode cases: ‖cache − ref‖/‖ref‖ of transformers' KV cache after the prefill
    /// against the reference's. `None`: the case has no cache to compare (the key is
    /// absent); `Some(None)`: the script could not compare it (null).
    #[serde(default, deserialize_with = "present")]
    pub cache_rel_err: Option<Option<f64>>,
    /// FlopCounterMode's total.
    #[serde(default)]
    pub fcm_total: Option<u64>,
    /// FlopCounterMode's FLOPs per op (`aten::mm` …).
    #[serde(default)]
    pub fcm_ops: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A key that is present, null or not: `Some` of its value (an absent key is serde's
/// default, `None`), so that a null is told apart from a missing key.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Runs the parity script in oracle mode with `python` over `dirs` on `device` (`cpu`,
/// `cuda:N`) in `dtype` (`fp32`, `bf16`, `fp16`); one result per case, in order. An
/// error when the script cannot start or does not answer for every case.
pub fn run_oracle(
    python: &Path,
    device: &str,
    dtype: &str,
    dirs: &[PathBuf],
) -> Result<Vec<OracleResult>> {
    let out = Command::new(python)
        .arg(script())
        .args(["--oracle", device, dtype])
        .args(dirs)
        .output()
        .map_err(|e| Error::Parity(format!("cannot run {}: {e}", python.display())))?;
    let results: Vec<OracleResult> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::Parity(format!("unreadable oracle line {l}: {e}")))
        })
        .collect::<Result<_>>()?;
    if results.len() != dirs.len() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Parity(format!(
            "the oracle ({}) exited with {} and answered {} of {} cases: {}",
            python.display(),
            out.status,
            results.len(),
            dirs.len(),
            stderr.lines().last().unwrap_or_default()
        )));
    }
    Ok(results)
}

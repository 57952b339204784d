//! `--oracle python[=PATH]`: an independent witness for the FLOP counts and the outputs.
//!
//! For each layer that ran, the reference module's weights, inputs and output are
//! exported (as the parity check does, but from the run's device and dtype), and
//! `reference/parity/parity.py --oracle` loads them into Hugging Face transformers'
//! DeepSeek-V2 / DeepSeek-V3 / DeepSeek-OCR text modules on the same device and dtype and
//! runs them under `torch.utils.flop_counter.FlopCounterMode`. Two rows per layer:
//! - `oracle_flops`: torch's FlopCounterMode total on the independent module (in the
//!   `analytic` column) against this project's FlopCounterMode-compatible measured total
//!   (`measured`). Exact or `fail`, never a tolerance; ops that only one side saw, or saw
//!   with other FLOPs, are named in the note. Equal totals are `known_gap`, not `pass`,
//!   when the run had matmul work outside FlopCounterMode's registry (the CPU SDPA
//!   kernel), which neither count sees; the note names it.
//! - `oracle_output`: ‖out − ref‖/‖ref‖ of the two outputs (as `rel_diff`) within a bound
//!   for the dtype ([`output_bound`]); the script's side checks must agree too: the MoE
//!   gate's selected experts, the eager causal mask's pattern, an MLA decode step's KV
//!   cache after the prefill (within the same bound).
//!
//! A layer the oracle could not check (the export failed, the script had no answer for
//! it) gets an `error` row saying why: the witness did not run, which is not a pass.
//!
//! Structural differences between the vendor code the reference mirrors and transformers
//! are named adjustments in the row's note, never a tolerance: transformers computes the
//! rotary angles elementwise (`position_ids[..., None] * inv_freq`), the vendor code as a
//! B·S·d fp32 matmul (`inv_freq @ position_ids`), so those `aten::bmm` FLOPs (the analytic
//! model's `inv_freq @ position_ids` op) are taken off this project's side.
//!
//! What it proves: the matmul counts (FlopCounterMode's registry and formulas) and the
//! modules' numerics, by code this project did not write. What it does not: elementwise
//! FLOPs are conventions (FlopCounterMode sees none), and hardware is Nsight Compute's
//! business (`hardware`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modelmeter::Dtype;
use modelmeter_reference::parity::{export_case_on, run_oracle, OracleResult};
use modelmeter_reference::Setup;
use tch::Device;

use crate::check::Check;
use crate::compare::{worst, MetricRow, Status};
use crate::device::DeviceSpec;
use crate::plan::Plan;
use crate::results::LayerResult;

/// The Python that runs the oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Oracle {
    pub python: PathBuf,
}

/// The interpreter `--oracle python` means: the project's `.venv` when there is one,
/// else `python3`.
pub fn default_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

impl Oracle {
    /// Parses `python` or `python=PATH`.
    pub fn parse(spec: &str) -> Result<Oracle, String> {
        match spec.split_once('=') {
            None if spec == "python" => Ok(Oracle {
                python: default_python(),
            }),
            Some(("python", path)) if !path.is_empty() => Ok(Oracle {
                python: PathBuf::from(path),
            }),
            _ => Err(format!(
                "--oracle = {} is invalid: expected python or python=PATH (an interpreter with torch 2.11 and transformers)",
                modelmeter::cli::shown_value(spec)
            )),
        }
    }

    /// Checks, before anything runs, that the interpreter has torch 2.11, transformers
    /// and safetensors; returns their versions.
    pub fn check(&self) -> Result<String, String> {
        // The script first: a quick look, where the interpreter's probe takes seconds.
        let script = modelmeter_reference::parity::script();
        let missing = if script.as_os_str().is_empty() {
            Some("is empty (MODELMETER_PARITY_SCRIPT is set to nothing)")
        } else if script.is_dir() {
            Some("is a folder, not the script")
        } else if !script.is_file() {
            Some("is not there")
        } else {
            None
        };
        if let Some(missing) = missing {
            return Err(format!(
                "--oracle: the parity script {} {missing}; set MODELMETER_PARITY_SCRIPT to reference/parity/parity.py of this source tree (a binary run away from it needs this)",
                modelmeter::cli::shown_value(&script.to_string_lossy())
            ));
        }
        let probe = "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__)";
        let out = Command::new(&self.python)
            .args(["-c", probe])
            .output()
            .map_err(|e| {
                format!(
                    "--oracle: cannot run {}: {e}; run scripts/setup-libtorch or give --oracle python=PATH",
                    self.python.display()
                )
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "--oracle: {} cannot import torch, transformers and safetensors ({}); install torch==2.11.0 transformers safetensors into it (scripts/setup-libtorch does, into .venv)",
                self.python.display(),
                err.lines().last().unwrap_or("no message")
            ));
        }
        let versions = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if versions.is_empty() {
            return Err(format!(
                "--oracle: {} printed no torch version when asked; give an interpreter with torch==2.11.0, transformers and safetensors (scripts/setup-libtorch installs them into .venv)",
                self.python.display()
            ));
        }
        if !versions.starts_with("2.11.") {
            return Err(format!(
                "--oracle: {} has torch {versions}; the oracle needs torch 2.11 (the libtorch this build counts with)",
                self.python.display()
            ));
        }
        Ok(versions)
    }
}

/// The largest accepted ‖out − ref‖/‖ref‖ between the reference module and the
/// transformers module in `dtype`: fp32 agrees to rounding; bf16 and fp16 differ by the
/// order of their roundings (8 and 11 mantissa bits through a few matmuls): bf16 on the
/// CPU measured up to 1.3e-3 (the MoE layers, whose experts transformers fuses).
pub fn output_bound(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 => 2e-2,
        Dtype::F16 => 1e-2,
        _ => 1e-5,
    }
}

/// Runs the oracle for every layer of `results` that ran and adds its two rows (or an
/// error row when the oracle could not run it); the layer's status is then its worst row.
pub fn apply(plan: &Plan, results: &mut [LayerResult], oracle: &Oracle) {
    let root = std::env::temp_dir().join(format!("modelmeter-oracle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let setup = Setup {
        device: plan.device,
        seed: plan.seed,
    };
    let mut cases: Vec<(usize, PathBuf, Adjustments)> = Vec::new();
    for (i, (pairing, result)) in plan.layers.iter().zip(results.iter_mut()).enumerate() {
        if result.status == Status::Error {
            continue;
        }
        let exported = pairing
            .module(&plan.config)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                let dir = root.join(format!("{i:02}-{}", result.name));
                export_case_on(
                    &dir,
                    m,
                    &plan.config,
                    &plan.workload,
                    plan.attention,
                    &setup,
                )
                .map(|_| dir)
                .map_err(|e| e.to_string())
            });
        match exported {
            Ok(dir) => cases.push((i, dir, Adjustments::of(plan, *pairing))),
            Err(e) => add_rows(result, vec![oracle_error(format!("export: {e}"))]),
        }
    }
    if !cases.is_empty() {
        let dirs: Vec<PathBuf> = cases.iter().map(|(_, d, _)| d.clone()).collect();
        let dtype = plan.workload.dtype.to_string();
        match run_oracle(
            &oracle.python,
            &DeviceSpec::of(plan.device).to_string(),
            &dtype,
            &dirs,
        ) {
            Ok(answers) => {
                for ((i, dir, adjust), answer) in cases.iter().zip(answers) {
                    let result = &mut results[*i];
                    // Answers come in the order of the cases; each names its case, so an
                    // answer is never judged against another layer's counts.
                    let rows = if Path::new(&answer.case) == dir {
                        rows(result, &answer, plan.workload.dtype, adjust)
                    } else {
                        vec![oracle_error(format!(
                            "the oracle's answer for {} names case {}: answers out of order",
                            dir.display(),
                            answer.case
                        ))]
                    };
                    add_rows(result, rows);
                }
            }
            Err(e) => {
                for (i, _, _) in &cases {
                    add_rows(&mut results[*i], vec![oracle_error(e.to_string())]);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn add_rows(result: &mut LayerResult, rows: Vec<MetricRow>) {
    result.metrics.extend(rows);
    result.status = worst(&result.metrics);
}

fn oracle_error(message: String) -> MetricRow {
    MetricRow {
        metric: Check::OracleFlops,
        analytic: 0,
        measured: 0,
        rel_diff: None,
        // Not a disagreement: the witness did not run (status error, shown as `—`).
        status: Status::Error,
        note: Some(format!("the oracle could not check this layer: {message}")),
        unavailable: false,
    }
}

/// What differs between this project's FlopCounterMode-compatible count and torch's on
/// the transformers module because transformers computes differently, by a named amount
/// (reference/parity/README.md): the count here is adjusted by exactly that, and the row's
/// note says so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Adjustments {
    /// `aten::bmm` FLOPs of the vendor's rotary-angle matmul, which transformers computes
    /// elementwise.
    rotary_bmm: u64,
    /// `aten::mm` FLOPs transformers' MLA spends at a decode step re-decompressing its C
    /// cached latent tokens with `kv_b_proj` (it caches the latent; the vendor caches the
    /// decompressed keys and values): 2·B·C·r_kv·H·(d_n + d_v).
    latent_mm: u64,
    /// An MLA attention under SDPA on the CPU: torch's SDPA on transformers' unpadded
    /// values (d_v wide, keys d_qk) takes its math path (`aten::bmm`), where the vendor's
    /// flash form pads the values to d_qk and runs the fused kernel. Named in the note,
    /// not adjusted (reference/parity/README.md, "Values are not padded").
    cpu_mla_sdpa: bool,
    /// An MLA attention in the weight-absorbed form: transformers has only the
    /// decompressing form, whose matmuls are other ones, so its FlopCounterMode total is
    /// no witness of this layer's (the `oracle_flops` row is information only); the
    /// outputs of the two forms still compare.
    absorbed: bool,
}

impl Adjustments {
    fn of(plan: &Plan, pairing: crate::pairing::Pairing) -> Adjustments {
        Adjustments {
            rotary_bmm: rotary_matmul_flops(plan, pairing),
            latent_mm: latent_redecompression_flops(plan, pairing),
            cpu_mla_sdpa: mla_form(plan, pairing) == Some(modelmeter::MlaForm::Naive)
                && plan.attention == modelmeter::layers::AttentionImpl::Sdpa
                && plan.device == Device::Cpu,
            absorbed: mla_form(plan, pairing) == Some(modelmeter::MlaForm::Absorb),
        }
    }
}

/// The form of the MLA attention `pairing` runs under `plan`; `None` when it runs none
/// (a layer without attention, or a multi-head-attention config).
fn mla_form(plan: &Plan, pairing: crate::pairing::Pairing) -> Option<modelmeter::MlaForm> {
    (runs_attention(pairing) && plan.config.mla.is_some()).then_some(plan.workload.mla)
}

/// The layer runs an attention: the attention itself or a decoder layer.
fn runs_attention(pairing: crate::pairing::Pairing) -> bool {
    use modelmeter::layers::LayerId;
    matches!(
        pairing.layer,
        LayerId::Attention | LayerId::DecoderDense | LayerId::DecoderMoe
    )
}

/// [`Adjustments::latent_mm`] for `pairing` under `plan`: only layers with MLA attention
/// in the vendor's naive form at a decode step; 0 otherwise (and on overflow, where the
/// analytic side has already refused).
fn latent_redecompression_flops(plan: &Plan, pairing: crate::pairing::Pairing) -> u64 {
    let (Some(mla), modelmeter::Phase::Decode { context_len }) =
        (&plan.config.mla, plan.workload.phase)
    else {
        return 0;
    };
    if mla_form(plan, pairing) != Some(modelmeter::MlaForm::Naive) {
        return 0;
    }
    let width = mla.qk_nope_head_dim.saturating_add(mla.v_head_dim);
    [
        plan.workload.batch,
        context_len,
        mla.kv_lora_rank,
        plan.config.num_attention_heads,
        width,
    ]
    .iter()
    .try_fold(2u64, |acc, n| acc.checked_mul(*n))
    .unwrap_or(0)
}

/// The role of the vendor rotary-angle matmul in the analytic cost tree.
const ROTARY_MATMUL_ROLE: &str = "inv_freq @ position_ids";

/// FLOPs of the vendor's rotary-angle matmul in `pairing`'s analytic layer (0 without
/// attention).
fn rotary_matmul_flops(plan: &Plan, pairing: crate::pairing::Pairing) -> u64 {
    pairing
        .analytic(&plan.config, &plan.workload, plan.attention)
        .and_then(|layer| layer.cost())
        .map(|cost| {
            cost.ops()
                .iter()
                .filter(|op| op.name == ROTARY_MATMUL_ROLE)
                .map(|op| op.metrics.matmul_flops)
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0)
}

/// The FlopCounterMode-visible ops of a measured layer: FLOPs per op name.
fn measured_fcm_ops(result: &LayerResult) -> BTreeMap<String, u64> {
    let mut ops = BTreeMap::new();
    for op in &result.ops {
        if op.flops.flop_counter_mode_flops > 0 {
            *ops.entry(op.name.clone()).or_insert(0u64) += op.flops.flop_counter_mode_flops;
        }
    }
    ops
}

/// Op-by-op differences between the two FlopCounterMode views, in words.
fn op_differences(ours: &BTreeMap<String, u64>, theirs: &BTreeMap<String, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for (op, n) in ours {
        match theirs.get(op) {
            None => out.push(format!("{op} only here ({n})")),
            Some(m) if m != n => out.push(format!("{op} {n} here, {m} in torch")),
            _ => {}
        }
    }
    for (op, m) in theirs {
        if !ours.contains_key(op) {
            out.push(format!("{op} only in torch ({m})"));
        }
    }
    out
}

fn rows(
    result: &LayerResult,
    answer: &OracleResult,
    dtype: Dtype,
    adjust: &Adjustments,
) -> Vec<MetricRow> {
    if let Some(why) = &answer.error {
        return vec![oracle_error(why.clone())];
    }
    let Some(total) = answer.fcm_total else {
        return vec![oracle_error(
            "no FlopCounterMode total in its answer".into(),
        )];
    };
    let mut ours = measured_fcm_ops(result);
    let mut adjustments = Vec::new();
    let rotary = adjust.rotary_bmm;
    if adjust.latent_mm > 0 {
        let mm = ours.entry("aten::mm".to_string()).or_insert(0);
        *mm = mm.saturating_add(adjust.latent_mm);
        adjustments.push(format!(
            "adjusted: +{} aten::mm FLOPs here, transformers' MLA re-decompressing its cached latent with kv_b_proj at this decode step (the vendor caches keys and values)",
            adjust.latent_mm
        ));
    }
    if rotary > 0 {
        if let Some(bmm) = ours.get_mut("aten::bmm") {
            *bmm = bmm.saturating_sub(rotary);
            if *bmm == 0 {
                ours.remove("aten::bmm");
            }
            adjustments.push(format!(
                "adjusted: −{rotary} aten::bmm FLOPs here, the rotary-angle matmul that transformers computes elementwise"
            ));
        }
    }
    let measured: u64 = ours.values().fold(0, |a, b| a.saturating_add(*b));
    let differences = op_differences(&ours, &answer.fcm_ops);
    // Matmul work outside FlopCounterMode's registry (the CPU SDPA kernel): torch counts
    // none of it on either module, so equal totals say nothing about it.
    let unwitnessed: Vec<String> = result
        .ops
        .iter()
        .filter(|op| op.flops.matmul_flops > op.flops.flop_counter_mode_flops)
        .map(|op| {
            format!(
                "{} ({} matmul FLOPs)",
                op.name,
                op.flops.matmul_flops - op.flops.flop_counter_mode_flops
            )
        })
        .collect();
    let flops = MetricRow {
        metric: Check::OracleFlops,
        analytic: total,
        measured,
        rel_diff: crate::compare::rel_diff(total, measured),
        status: match (
            total == measured && differences.is_empty(),
            unwitnessed.is_empty(),
        ) {
            _ if adjust.absorbed => Status::Info,
            (true, true) => Status::Pass,
            (true, false) => Status::KnownGap,
            (false, _) => Status::Fail,
        },
        note: Some({
            let mut note = if adjust.absorbed {
                "information only, not a witness: transformers has no weight-absorbed MLA, so torch's FlopCounterMode total (analytic column) is its decompressing form's matmuls, and this layer ran the absorbed form's (measured); the output row compares the two forms' results".to_string()
            } else if differences.is_empty() {
                "analytic column: torch's FlopCounterMode on the transformers module; measured: this project's FlopCounterMode-compatible count".to_string()
            } else {
                format!(
                    "torch's FlopCounterMode on the transformers module disagrees: {}",
                    differences.join("; ")
                )
            };
            for a in &adjustments {
                note.push_str("; ");
                note.push_str(a);
            }
            if !unwitnessed.is_empty() {
                note.push_str(&format!(
                    "; not witnessed here: {}, outside FlopCounterMode's registry, so torch counts none of it on either module (--attn eager runs the attention core as matmuls it counts)",
                    unwitnessed.join(", ")
                ));
            }
            if adjust.cpu_mla_sdpa && !differences.is_empty() {
                note.push_str("; expected with --attn sdpa on the CPU for MLA: torch's SDPA runs transformers' unpadded values through its math path (aten::bmm), the vendor pads them to d_qk for the fused kernel; not adjusted (reference/parity/README.md; --attn eager compares exactly)");
            }
            note
        }),
        unavailable: false,
    };
    let bound = output_bound(dtype);
    let (checked, mut problems) = side_checks(answer, bound, dtype);
    let mut note = match answer.rel_err {
        Some(err) => format!(
            "‖out − ref‖/‖ref‖ = {err:.3e} against the transformers module (bound {bound:e} in {dtype})"
        ),
        None => {
            // The script answers null for a ratio that is not finite: an output holding
            // NaN or inf (or a reference output of norm 0). Never a pass.
            problems.push("the relative error is not finite: an output holds NaN or inf, or transformers' output is all zeros".to_string());
            format!("‖out − ref‖/‖ref‖ is not a number against the transformers module (bound {bound:e} in {dtype})")
        }
    };
    for part in checked.iter().chain(&problems) {
        note.push_str("; ");
        note.push_str(part);
    }
    let output = MetricRow {
        metric: Check::OracleOutput,
        analytic: 0,
        measured: 0,
        rel_diff: answer.rel_err,
        status: if answer.rel_err.is_some_and(|err| err <= bound) && problems.is_empty() {
            Status::Pass
        } else {
            Status::Fail
        },
        note: Some(note),
        unavailable: false,
    };
    vec![flops, output]
}

/// What the script checked beside the output, each against transformers' own: the
/// gate's selected experts (a gate case must say), the eager causal mask's pattern, the
/// MLA KV cache after the prefill (within `bound`). Returns (what agreed or explains the
/// output, what did not or could not be compared); the output row fails on any of the
/// latter. A MoE's routing is said among the former whether or not it agrees: it
/// explains the output's difference, which alone decides the row.
fn side_checks(answer: &OracleResult, bound: f64, dtype: Dtype) -> (Vec<String>, Vec<String>) {
    let (mut checked, mut problems) = (Vec::new(), Vec::new());
    match (answer.idx_match, answer.module.as_deref()) {
        (Some(true), _) => checked.push("the selected experts match".to_string()),
        (Some(false), _) => problems.push(experts_differ(answer)),
        (None, Some("moe_gate")) => {
            problems.push("the answer does not say whether the selected experts match".to_string())
        }
        (None, _) => {}
    }
    // Why a MoE's output differs, not a check of its own (the output is): the routing.
    match answer.routed_count_mismatched_experts {
        Some(0) => checked.push(
            "transformers' router sent each expert as many tokens as the reference's gate"
                .to_string(),
        ),
        Some(n) => {
            // What can send a token elsewhere: the V3 routers' fills of the unchosen
            // groups where the answer says they can choose differently, else a near tie
            // rounded differently in a reduced precision; in fp32 without either, nothing
            // known.
            let why = match answer.v3_fill_sensitive_rows.filter(|n| *n > 0) {
                Some(rows) => format!("{} (reference/parity/README.md)", v3_fill_may_differ(rows)),
                None if matches!(dtype, Dtype::Bf16 | Dtype::F16) => format!("in {dtype} a near tie of two experts' scores, rounded differently before the gate, sends a token elsewhere"),
                None => "no known difference explains it".to_string(),
            };
            checked.push(format!(
                "the routing differs: transformers' router sent {} another number of tokens than the reference's gate ({why}; the output then differs by whole expert outputs)",
                counted(n, "expert")
            ))
        }
        None => {}
    }
    match answer.mask_match {
        Some(true) => checked.push("the causal mask has transformers' pattern".to_string()),
        Some(false) => problems.push(
            "the causal mask differs from transformers' own (create_causal_mask)".to_string(),
        ),
        None => {}
    }
    match answer.cache_rel_err {
        Some(Some(e)) if e <= bound => checked.push(format!(
            "KV cache after the prefill {e:.3e} from transformers'"
        )),
        Some(Some(e)) => problems.push(format!(
            "the KV cache after the prefill is {e:.3e} from transformers' (bound {bound:e})"
        )),
        Some(None) => {
            problems.push("the KV cache after the prefill could not be compared".to_string())
        }
        None => {}
    }
    (checked, problems)
}

/// Why a gate's experts differ, as far as the answer says: on how many tokens, and, for a
/// V3 router, on how many the two routers' fills of the unchosen groups can choose
/// differently (a known difference of transformers' router, not adjusted: the row fails).
fn experts_differ(answer: &OracleResult) -> String {
    let mut text = "the selected experts differ".to_string();
    if let Some(rows) = answer.idx_mismatched_rows {
        text.push_str(&format!(" on {}", counted(rows, "token")));
    }
    if let Some(sensitive) = answer.v3_fill_sensitive_rows.filter(|n| *n > 0) {
        text.push_str(&format!(
            "; {} (fewer than top_k positive choice scores in the kept groups: reference/parity/README.md)",
            v3_fill_may_differ(sensitive)
        ));
    }
    text
}

/// The known difference of transformers' V3 router on `rows` tokens of the input, as the
/// answer's `v3_fill_sensitive_rows` counts them: said by a gate's row and a MoE's.
fn v3_fill_may_differ(rows: u64) -> String {
    format!(
        "on {} of this input transformers' V3 router, which fills the experts outside the chosen groups with -inf where the vendor fills 0.0, can choose others",
        counted(rows, "token")
    )
}

/// `n` and `noun`, plural unless n is 1 ("1 token", "3 tokens").
fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_names_an_interpreter() {
        assert_eq!(
            Oracle::parse("python=/opt/py/bin/python3").unwrap().python,
            PathBuf::from("/opt/py/bin/python3")
        );
        assert!(Oracle::parse("python").is_ok());
        let e = Oracle::parse("ruby").unwrap_err();
        assert!(e.contains("ruby") && e.contains("python=PATH"), "{e}");
        assert!(Oracle::parse("python=").is_err());
    }

    #[test]
    fn the_default_interpreter_is_the_venvs_or_python3() {
        let python = default_python();
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        if venv.exists() {
            assert_eq!(python, venv);
        } else {
            assert_eq!(python, PathBuf::from("python3"));
        }
    }

    #[test]
    fn a_missing_interpreter_is_a_clear_error() {
        let e = Oracle {
            python: PathBuf::from("/no/such/python"),
        }
        .check()
        .unwrap_err();
        assert!(
            e.contains("/no/such/python") && e.contains("setup-libtorch"),
            "{e}"
        );
    }

    /// An interpreter is judged by what its probe prints: a failing one cannot import,
    /// one that prints another torch version is refused for it, torch 2.11 passes.
    #[test]
    fn the_interpreter_is_judged_by_its_probe() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, prints: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\necho '{prints}'\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            Oracle { python: path }.check()
        };
        let e = Oracle {
            python: PathBuf::from("/bin/false"),
        }
        .check()
        .unwrap_err();
        assert!(e.contains("/bin/false cannot import torch"), "{e}");
        let e = fake("old", "2.10.0 4.57.0").unwrap_err();
        assert!(
            e.contains("has torch 2.10.0 4.57.0; the oracle needs torch 2.11"),
            "{e}"
        );
        assert_eq!(fake("ok", "2.11.0 5.24.0"), Ok("2.11.0 5.24.0".to_string()));
    }

    /// A layer whose counted ops are `ops` (name, matmul FLOPs, FlopCounterMode FLOPs).
    fn layer_with(ops: &[(&str, u64, u64)]) -> LayerResult {
        use modelmeter::conventions::OpCost;
        use modelmeter_reference::counter::OpSummary;
        LayerResult {
            ops: ops
                .iter()
                .map(|&(name, matmul, fcm)| OpSummary {
                    name: name.into(),
                    calls: 1,
                    flops: OpCost {
                        matmul_flops: matmul,
                        flop_counter_mode_flops: fcm,
                        ..OpCost::default()
                    },
                    dtypes: Vec::new(),
                    devices: Vec::new(),
                })
                .collect(),
            ..LayerResult::new("L".into(), Status::Pass)
        }
    }

    fn torch_counted(ops: &[(&str, u64)]) -> OracleResult {
        OracleResult {
            case: "L".into(),
            module: None,
            rel_err: Some(0.0),
            idx_match: None,
            idx_mismatched_rows: None,
            v3_fill_sensitive_rows: None,
            routed_count_mismatched_experts: None,
            mask_match: None,
            cache_rel_err: None,
            fcm_total: Some(ops.iter().map(|(_, n)| n).sum()),
            fcm_ops: ops.iter().map(|(op, n)| (op.to_string(), *n)).collect(),
            error: None,
        }
    }

    #[test]
    fn matmuls_outside_the_registry_are_a_known_gap_not_a_pass() {
        let adjust = Adjustments::default();
        let torch = torch_counted(&[("aten::mm", 100)]);
        // Every matmul FLOP in the registry: equal totals witness them all.
        let witnessed = layer_with(&[("aten::mm", 100, 100)]);
        let [flops, _] = &rows(&witnessed, &torch, Dtype::F32, &adjust)[..] else {
            panic!("two rows")
        };
        assert_eq!(flops.status, Status::Pass);
        assert!(!flops.note.as_deref().unwrap().contains("not witnessed"));
        // The CPU SDPA kernel's work: both sides count none of it, so the equal totals
        // say nothing about it, and the row says so.
        let cpu_sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu";
        let blind = layer_with(&[("aten::mm", 100, 100), (cpu_sdpa, 64, 0)]);
        let [flops, _] = &rows(&blind, &torch, Dtype::F32, &adjust)[..] else {
            panic!("two rows")
        };
        assert_eq!(
            (flops.status, flops.analytic, flops.measured),
            (Status::KnownGap, 100, 100)
        );
        let note = flops.note.as_deref().unwrap();
        assert!(
            note.contains(&format!("not witnessed here: {cpu_sdpa} (64 matmul FLOPs)")),
            "{note}"
        );
        // A disagreement still fails, blind work or not.
        let more = torch_counted(&[("aten::mm", 101)]);
        assert_eq!(
            rows(&blind, &more, Dtype::F32, &adjust)[0].status,
            Status::Fail
        );
    }

    /// An output the script could not measure a finite error for (a module that computed
    /// NaN: the script answers null) fails the output row; the FLOP row is still judged.
    #[test]
    fn an_output_error_that_is_not_a_number_fails() {
        let layer = layer_with(&[("aten::mm", 100, 100)]);
        let mut answer = torch_counted(&[("aten::mm", 100)]);
        answer.rel_err = None;
        let [flops, output] = &rows(&layer, &answer, Dtype::F32, &Adjustments::default())[..]
        else {
            panic!("two rows")
        };
        assert_eq!(flops.status, Status::Pass);
        assert_eq!((output.status, output.rel_diff), (Status::Fail, None));
        assert!(output.note.as_deref().unwrap().contains("not finite"));
    }

    /// The weight-absorbed MLA has no transformers counterpart: its FLOP row is shown for
    /// information, equal or not, and never passes; the output row is still judged.
    #[test]
    fn an_absorbed_layers_flops_are_information_not_a_witness() {
        let absorbed = Adjustments {
            absorbed: true,
            ..Adjustments::default()
        };
        let layer = layer_with(&[("aten::bmm", 44, 44), ("aten::mm", 384, 384)]);
        for torch in [
            torch_counted(&[("aten::bmm", 12), ("aten::mm", 416)]),
            torch_counted(&[("aten::bmm", 44), ("aten::mm", 384)]),
        ] {
            let [flops, output] = &rows(&layer, &torch, Dtype::F32, &absorbed)[..] else {
                panic!("two rows")
            };
            assert_eq!((flops.status, output.status), (Status::Info, Status::Pass));
            assert!(flops
                .note
                .as_deref()
                .unwrap()
                .starts_with("information only, not a witness"));
        }
    }

    /// The output bounds the README states (1e-5 in fp32, 2e-2 in bf16, 1e-2 in fp16),
    /// written here rather than read from [`output_bound`]: an error at the bound passes,
    /// one just above fails. (The other tests only fed an error of 0, so a bound loosened
    /// 1000 times passed them.)
    #[test]
    fn the_output_row_fails_above_the_documented_bound_of_its_dtype() {
        let adjust = Adjustments::default();
        let layer = layer_with(&[("aten::mm", 100, 100)]);
        for (dtype, bound) in [(Dtype::F32, 1e-5), (Dtype::Bf16, 2e-2), (Dtype::F16, 1e-2)] {
            let status = |err: f64| {
                let mut answer = torch_counted(&[("aten::mm", 100)]);
                answer.rel_err = Some(err);
                rows(&layer, &answer, dtype, &adjust)[1].status
            };
            assert_eq!(status(bound), Status::Pass, "{dtype} at its bound");
            assert_eq!(status(bound * 1.01), Status::Fail, "{dtype} above it");
        }
        // A plainly wrong fp32 module (1e-4) is no pass.
        let mut answer = torch_counted(&[("aten::mm", 100)]);
        answer.rel_err = Some(1e-4);
        assert_eq!(
            rows(&layer, &answer, Dtype::F32, &adjust)[1].status,
            Status::Fail
        );
    }

    #[test]
    fn the_output_row_fails_on_any_side_check_the_script_made() {
        let adjust = Adjustments::default();
        let layer = layer_with(&[("aten::mm", 100, 100)]);
        let output = |answer: &OracleResult| rows(&layer, answer, Dtype::F32, &adjust)[1].clone();
        let parsed = |extra: &str| -> OracleResult {
            serde_json::from_str(&format!(
                r#"{{"case": "L", "module": "attention", "rel_err": 0.0, "fcm_total": 100,
                    "fcm_ops": {{"aten::mm": 100}}{extra}}}"#
            ))
            .unwrap()
        };
        // Nothing beside the output: the row stands on the output alone.
        assert_eq!(output(&parsed("")).status, Status::Pass);
        let agreed = output(&parsed(r#", "mask_match": true, "cache_rel_err": 1e-7"#));
        assert_eq!(agreed.status, Status::Pass);
        let note = agreed.note.unwrap();
        assert!(
            note.contains("transformers' pattern") && note.contains("KV cache"),
            "{note}"
        );
        // A mask of another pattern, a cache off by more than the bound, a cache the
        // script could not compare (null): each fails, and says which.
        for (extra, says) in [
            (r#", "mask_match": false"#, "causal mask differs"),
            (
                r#", "cache_rel_err": 0.5"#,
                "is 5.000e-1 from transformers'",
            ),
            (r#", "cache_rel_err": null"#, "could not be compared"),
            (r#", "idx_match": false"#, "selected experts differ"),
        ] {
            let row = output(&parsed(extra));
            assert_eq!(row.status, Status::Fail, "{extra}");
            assert!(
                row.note.as_deref().unwrap().contains(says),
                "{extra}: {row:?}"
            );
        }
        // A gate's answer must say whether its experts match.
        let mut gate = parsed("");
        gate.module = Some("moe_gate".into());
        let row = output(&gate);
        assert_eq!(row.status, Status::Fail);
        assert!(row.note.unwrap().contains("does not say"));
        gate.idx_match = Some(true);
        assert_eq!(output(&gate).status, Status::Pass);
        // Experts that differ where the V3 routers' fills choose differently: said, still
        // a failure.
        let mut v3 = parsed(
            r#", "idx_match": false, "idx_mismatched_rows": 3, "v3_fill_sensitive_rows": 57"#,
        );
        v3.module = Some("moe_gate".into());
        let row = output(&v3);
        assert_eq!(row.status, Status::Fail);
        let note = row.note.unwrap();
        assert!(
            note.contains("differ on 3 tokens") && note.contains("on 57 tokens of this input"),
            "{note}"
        );

        // A MoE's routing explains its output and never decides the row: the same output
        // passes with the routing agreeing or not, and fails over the bound either way.
        for (extra, says) in [
            (
                r#", "routed_count_mismatched_experts": 0"#,
                "as many tokens as the reference's gate",
            ),
            (
                r#", "routed_count_mismatched_experts": 2"#,
                "the routing differs: transformers' router sent 2 experts another number of tokens than the reference's gate (no known difference explains it",
            ),
            (
                r#", "routed_count_mismatched_experts": 1, "v3_fill_sensitive_rows": 4"#,
                "sent 1 expert another number of tokens than the reference's gate (on 4 tokens of this input transformers' V3 router",
            ),
        ] {
            let mut moe = parsed(extra);
            moe.module = Some("moe".into());
            let row = output(&moe);
            assert_eq!(row.status, Status::Pass, "{extra}");
            assert!(row.note.as_deref().unwrap().contains(says), "{row:?}");
            moe.rel_err = Some(0.5);
            assert_eq!(output(&moe).status, Status::Fail, "{extra}");
        }
        // In a reduced precision, a near tie is the named suspect.
        let mut moe = parsed(r#", "routed_count_mismatched_experts": 3"#);
        moe.module = Some("moe".into());
        let row = rows(&layer, &moe, Dtype::Bf16, &adjust)[1].clone();
        let note = row.note.unwrap();
        assert!(
            note.contains("(in bf16 a near tie of two experts' scores"),
            "{note}"
        );
    }

    #[test]
    fn op_differences_name_both_sides() {
        let ours = BTreeMap::from([("aten::mm".to_string(), 10), ("aten::bmm".to_string(), 4)]);
        let theirs = BTreeMap::from([("aten::mm".to_string(), 10), ("aten::addmm".to_string(), 2)]);
        let d = op_differences(&ours, &theirs);
        assert_eq!(
            d,
            ["aten::bmm only here (4)", "aten::addmm only in torch (2)"]
        );
        assert!(op_differences(&ours, &ours).is_empty());
        let more = BTreeMap::from([("aten::mm".to_string(), 11), ("aten::bmm".to_string(), 4)]);
        assert_eq!(
            op_differences(&ours, &more),
            ["aten::mm 10 here, 11 in torch"]
        );
    }

    /// The flop row of `layer` against `torch` with `adjust`: its status and note.
    fn flop_row(
        layer: &LayerResult,
        torch: &OracleResult,
        adjust: &Adjustments,
    ) -> (Status, String) {
        let row = rows(layer, torch, Dtype::F32, adjust).remove(0);
        (row.status, row.note.unwrap())
    }

    /// Equal totals of other ops are no agreement; the adjustments move exactly the FLOPs
    /// they name, and a row without one says nothing of any.
    #[test]
    fn the_flop_row_adjusts_by_exactly_the_named_amounts() {
        let none = Adjustments::default();
        // The same total spent by other ops: a failure naming both.
        let (status, note) = flop_row(
            &layer_with(&[("aten::mm", 100, 100)]),
            &torch_counted(&[("aten::bmm", 100)]),
            &none,
        );
        assert_eq!(status, Status::Fail);
        assert!(
            note.contains("aten::mm only here (100); aten::bmm only in torch (100)"),
            "{note}"
        );
        // No adjustment: no aten::mm of 0 appears, and the note names none.
        let bmm_only = layer_with(&[("aten::bmm", 60, 60)]);
        let (status, note) = flop_row(&bmm_only, &torch_counted(&[("aten::bmm", 60)]), &none);
        assert_eq!(status, Status::Pass);
        assert!(!note.contains("adjusted"), "{note}");
        // transformers' MLA re-decompression: +latent_mm aten::mm here.
        let latent = Adjustments {
            latent_mm: 50,
            ..none
        };
        let mm = layer_with(&[("aten::mm", 100, 100)]);
        let (status, note) = flop_row(&mm, &torch_counted(&[("aten::mm", 150)]), &latent);
        assert_eq!(status, Status::Pass, "{note}");
        assert!(note.contains("adjusted: +50 aten::mm FLOPs here"), "{note}");
        assert_eq!(
            flop_row(&mm, &torch_counted(&[("aten::mm", 100)]), &latent).0,
            Status::Fail
        );
        // The rotary-angle matmul transformers computes elementwise: −rotary_bmm here, and
        // a bmm left at zero is no op at all.
        let rotary = |rotary_bmm| Adjustments { rotary_bmm, ..none };
        let (status, note) = flop_row(&bmm_only, &torch_counted(&[("aten::bmm", 20)]), &rotary(40));
        assert_eq!(status, Status::Pass, "{note}");
        assert!(
            note.contains("adjusted: −40 aten::bmm FLOPs here"),
            "{note}"
        );
        let both = layer_with(&[("aten::bmm", 40, 40), ("aten::mm", 100, 100)]);
        let (status, note) = flop_row(&both, &torch_counted(&[("aten::mm", 100)]), &rotary(40));
        assert_eq!(status, Status::Pass, "{note}");
    }

    /// The CPU MLA SDPA note explains a disagreement; with none, it is not said.
    #[test]
    fn the_cpu_mla_sdpa_note_comes_only_with_a_disagreement() {
        let cpu_mla_sdpa = Adjustments {
            cpu_mla_sdpa: true,
            ..Adjustments::default()
        };
        let layer = layer_with(&[("aten::mm", 100, 100)]);
        let expected = "expected with --attn sdpa on the CPU for MLA";
        let (status, note) = flop_row(&layer, &torch_counted(&[("aten::mm", 100)]), &cpu_mla_sdpa);
        assert_eq!(status, Status::Pass);
        assert!(!note.contains(expected), "{note}");
        let (status, note) = flop_row(
            &layer,
            &torch_counted(&[("aten::mm", 60), ("aten::bmm", 40)]),
            &cpu_mla_sdpa,
        );
        assert_eq!(status, Status::Fail);
        assert!(note.contains(expected), "{note}");
    }

    /// No token sensitive to the V3 fills is none: `Some(0)` is said like `None`.
    #[test]
    fn zero_v3_fill_sensitive_tokens_are_not_a_suspect() {
        let parsed = |extra: &str| -> OracleResult {
            serde_json::from_str(&format!(
                r#"{{"case": "L", "module": "moe_gate", "rel_err": 0.0, "fcm_total": 100,
                    "fcm_ops": {{"aten::mm": 100}}, "v3_fill_sensitive_rows": 0{extra}}}"#
            ))
            .unwrap()
        };
        let layer = layer_with(&[("aten::mm", 100, 100)]);
        let note = |answer: &OracleResult| {
            rows(&layer, answer, Dtype::Bf16, &Adjustments::default())[1]
                .note
                .clone()
                .unwrap()
        };
        let gate = note(&parsed(r#", "idx_match": false, "idx_mismatched_rows": 1"#));
        assert!(
            gate.contains("differ on 1 token") && !gate.contains("V3 router"),
            "{gate}"
        );
        let moe = note(&parsed(r#", "routed_count_mismatched_experts": 2"#));
        assert!(moe.contains("(in bf16 a near tie"), "{moe}");
    }

    /// What a plan's layer is adjusted by, by hand: DeepSeek-OCR's rotary-angle matmul
    /// (B·d·S: its `[d/2, 1] @ [1, S]` per batch row, 2 FLOPs a product) in every layer that
    /// runs an attention; DeepSeek-V2-Lite's MLA re-decompression at a decode step in the
    /// naive form (2·B·C·r_kv·H·(d_n + d_v)); the CPU SDPA note; the absorbed form.
    #[test]
    fn each_layers_adjustments_are_those_of_its_attention() {
        use crate::pairing::Pairing;
        use modelmeter::layers::{AttentionImpl, LayerId};
        use modelmeter::{MlaForm, ModelConfig, Workload};
        let of = |plan: &Plan, layer| Adjustments::of(plan, Pairing { layer });
        let ocr = Plan::on_cpu(
            ModelConfig::deepseek_ocr(),
            Workload::prefill(1, 512).unwrap(),
        );
        for layer in [
            LayerId::Attention,
            LayerId::DecoderDense,
            LayerId::DecoderMoe,
        ] {
            assert_eq!(
                of(&ocr, layer),
                Adjustments {
                    rotary_bmm: 128 * 512,
                    ..Adjustments::default()
                },
                "{layer:?}"
            );
        }
        for layer in [
            LayerId::Mlp,
            LayerId::MoE,
            LayerId::MoEGate,
            LayerId::RmsNorm,
        ] {
            assert_eq!(of(&ocr, layer), Adjustments::default(), "{layer:?}");
        }
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let mla = lite.mla.clone().unwrap();
        let step = Plan::on_cpu(lite.clone(), Workload::decode(2, 100).unwrap());
        let latent = 2
            * 2
            * 100
            * mla.kv_lora_rank
            * lite.num_attention_heads
            * (mla.qk_nope_head_dim + mla.v_head_dim);
        assert_eq!(latent, 2 * 2 * 100 * 512 * 16 * 256);
        let naive = of(&step, LayerId::Attention);
        assert_eq!(
            (naive.latent_mm, naive.cpu_mla_sdpa, naive.absorbed),
            (latent, true, false)
        );
        assert_eq!(of(&step, LayerId::Mlp), Adjustments::default());
        // Eager, or on a GPU: no CPU SDPA note.
        let eager = Plan {
            attention: AttentionImpl::Eager,
            ..step.clone()
        };
        assert!(!of(&eager, LayerId::Attention).cpu_mla_sdpa);
        let cuda = Plan {
            device: Device::Cuda(0),
            ..step.clone()
        };
        assert!(!of(&cuda, LayerId::Attention).cpu_mla_sdpa);
        // A prefill re-decompresses nothing; the absorbed form is information only.
        let prefill = Plan::on_cpu(lite.clone(), Workload::prefill(2, 100).unwrap());
        assert_eq!(of(&prefill, LayerId::DecoderMoe).latent_mm, 0);
        let absorbed = Plan {
            workload: step.workload.clone().with_mla(MlaForm::Absorb),
            ..step.clone()
        };
        let a = of(&absorbed, LayerId::Attention);
        assert_eq!((a.latent_mm, a.cpu_mla_sdpa, a.absorbed), (0, false, true));
    }
}

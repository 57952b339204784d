//! `verify-decoder --model`: the whole causal LM, verified call by call. The reference
//! `DeepseekV2ForCausalLM` (modelmeter_reference::model) runs the prefill and then
//! `--new-tokens` greedy decode steps, every part of every call under the counter; each
//! part is compared with the analytic stack's part ([`StackPart`]) for that call, each
//! call with the analytic stack, and each phase (prefill, all decode steps, both) with
//! the analytic [`Generation`]'s closed form — so the closed-form sum is checked against
//! the sum of measured steps, not assumed.
//!
//! Summing follows the analytic crate's rules: the parts of one call add up
//! ([`Metrics::checked_add`]); successive calls add their work while weights and the KV
//! cache are the later call's state ([`accumulate`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use modelmeter::layers::{accumulate, DeepseekV2Decoder, Generation, GenerationMetrics, StackPart};
use modelmeter::{Metrics, MlpKind, ModelConfig, Phase, Workload};
use modelmeter_reference::model::{RefDeepseekV2ForCausalLM, StepRun};
use modelmeter_reference::{LayerRun, Setup};
use serde::Serialize;

use crate::check::{Check, EXACT};
use crate::compare::{compare, compare_flops, worst, CounterBlindSpot, MetricRow, Status};
use crate::device::DeviceSpec;
use crate::plan::Plan;
use crate::results::{LayerResult, Summary};
use crate::runner::{analytic_on_device, compare_run, invisible_to_flop_counter_mode, perturbed};

/// What `--model` runs beyond the [`Plan`] (whose config is already cut to
/// `--num-layers` and whose workload is the prefill).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelPlan {
    /// Decoder layers run (the first ones of the config).
    pub num_layers: u64,
    /// The config's own `num_hidden_layers`.
    pub config_layers: u64,
    /// Greedy decode steps after the prefill.
    pub new_tokens: u64,
    /// Keep every decode step's part results (table and JSON), not only those of steps
    /// that are not exact.
    #[serde(skip)]
    pub verbose: bool,
}

impl ModelPlan {
    /// Checks `--num-layers` and `--new-tokens` against `config` and the prefill
    /// `workload`, and returns the config cut to its first `num_layers` layers (all when
    /// `None`). An error names the value and what is valid.
    pub fn new(
        config: &ModelConfig,
        workload: &Workload,
        num_layers: Option<u64>,
        new_tokens: u64,
        verbose: bool,
    ) -> Result<(ModelConfig, ModelPlan), String> {
        let Phase::Prefill { seq_len } = workload.phase else {
            return Err("--model runs a prefill and its decode steps itself: leave out --phase decode and --context-len".into());
        };
        let config_layers = config.num_hidden_layers;
        let cut = config
            .first_layers(num_layers.unwrap_or(config_layers))
            .map_err(|e| e.to_string())?;
        if let Some(max) = config.max_position_embeddings {
            let positions = workload.positions_reached(new_tokens);
            if seq_len > max {
                return Err(format!(
                    "--seq-len = {seq_len} is too large: config {} has max_position_embeddings = {max}; expected at most {max}",
                    config.name
                ));
            }
            if !matches!(positions, Some(p) if p <= max) {
                return Err(format!(
                    "--new-tokens = {new_tokens} is too large: --seq-len {seq_len} + --new-tokens {new_tokens} positions exceed max_position_embeddings = {max} of config {}; expected at most {}",
                    config.name,
                    max - seq_len
                ));
            }
        }
        let plan = ModelPlan {
            num_layers: cut.num_hidden_layers,
            config_layers,
            new_tokens,
            verbose,
        };
        Ok((cut, plan))
    }

    /// The phases a run of this plan reports, with the forward calls each holds: the
    /// prefill, the decode steps (none without new tokens) and the total.
    pub fn phases(&self) -> Vec<(&'static str, u64)> {
        let mut phases = vec![("prefill", 1)];
        if self.new_tokens > 0 {
            phases.push(("decode", self.new_tokens));
        }
        phases.push(("total", 1 + self.new_tokens));
        phases
    }

    /// The analytic generation of `plan`'s model: its prefill, then the decode steps.
    /// (Its workload is a prefill, as [`ModelPlan::new`] requires; a decode step is an
    /// error, not a generation.)
    pub fn generation(&self, plan: &Plan) -> Result<Generation, String> {
        Generation::after_prefill(
            &plan.config,
            &plan.workload,
            self.new_tokens,
            plan.attention,
        )
        .ok_or_else(|| {
            "--model runs a prefill and its decode steps; the workload is a decode step".into()
        })
    }
}

/// One forward call of a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Call {
    Prefill,
    /// Decode step `step` (0-based).
    Decode {
        step: u64,
    },
}

impl Call {
    /// `prefill`, `decode[3]`: how test hooks and JUnit name the call.
    pub fn label(self) -> String {
        match self {
            Call::Prefill => "prefill".into(),
            Call::Decode { step } => format!("decode[{step}]"),
        }
    }

    /// `prefill`, `decode step 3`: for people.
    pub fn describe(self) -> String {
        match self {
            Call::Prefill => "prefill".into(),
            Call::Decode { step } => format!("decode step {step}"),
        }
    }

    /// The workload of this call in a generation whose prefill is `prefill`: decode
    /// step t follows S + t cached tokens and attends over S + t + 1 keys.
    pub fn workload(self, prefill: &Workload) -> modelmeter::Result<Workload> {
        let phase = match self {
            Call::Prefill => return Ok(prefill.clone()),
            Call::Decode { step } => Phase::Decode {
                context_len: modelmeter::checked::sum(
                    "decode context",
                    &[prefill.query_len(), step],
                )?,
            },
        };
        prefill.in_phase(phase)
    }
}

/// The verification of one forward call.
#[derive(Clone, Debug, Serialize)]
pub struct CallResult {
    #[serde(flatten)]
    pub call: Call,
    /// Tokens cached before the call (0 for the prefill).
    pub context_len: u64,
    /// Keys each query attends over.
    pub key_len: u64,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The whole stack: the analytic stack for this call against the sum of its parts.
    pub metrics: Vec<MetricRow>,
    /// Each part (embedding, every layer by index, norm, lm_head); kept for the prefill,
    /// for calls that are not exact, and for all with `--verbose`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerResult>,
    /// The fused attention kernels libtorch ran in this call, part by part (repeats left
    /// for `Environment::saw_kernels` to drop): kept whether or not `layers` is (the
    /// report's environment lists them, so it must not depend on `--verbose`).
    #[serde(skip)]
    pub attention_kernels: Vec<String>,
    #[serde(skip)]
    pub seconds: f64,
}

/// Parts of the stack grouped for the compact table: one row per group and phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartGroup {
    EmbedTokens,
    DenseLayers,
    MoeLayers,
    Norm,
    LmHead,
}

/// Layer indices in increasing order as runs of consecutive ones: `0-1, 3, 5-7`.
fn runs(indices: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        while i + 1 < indices.len() && indices[i + 1] == indices[i] + 1 {
            i += 1;
        }
        out.push(match indices[i] {
            end if end == start => format!("{start}"),
            end => format!("{start}-{end}"),
        });
        i += 1;
    }
    out.join(", ")
}

impl PartGroup {
    pub const ALL: [PartGroup; 5] = [
        PartGroup::EmbedTokens,
        PartGroup::DenseLayers,
        PartGroup::MoeLayers,
        PartGroup::Norm,
        PartGroup::LmHead,
    ];

    fn of(part: StackPart, config: &ModelConfig) -> PartGroup {
        match part {
            StackPart::EmbedTokens => PartGroup::EmbedTokens,
            StackPart::Layer(i) => match config.layer_kind(i) {
                Ok(MlpKind::Moe) => PartGroup::MoeLayers,
                _ => PartGroup::DenseLayers,
            },
            StackPart::Norm => PartGroup::Norm,
            StackPart::LmHead => PartGroup::LmHead,
        }
    }

    /// The layer indices in this group.
    fn members(self, config: &ModelConfig) -> Vec<u64> {
        StackPart::all(config)
            .into_iter()
            .filter(|p| PartGroup::of(*p, config) == self)
            .filter_map(|p| match p {
                StackPart::Layer(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    /// `embed_tokens`, `layers 0 (dense)`, `layers 1-11 (MoE)`, `norm`, `lm_head`; layers
    /// that are not consecutive as runs (`layers 0-1, 3 (dense)` with `moe_layer_freq` 2).
    pub fn describe(self, config: &ModelConfig) -> String {
        let range = runs(&self.members(config));
        match self {
            PartGroup::EmbedTokens => "embed_tokens".into(),
            PartGroup::DenseLayers => format!("layers {range} (dense)"),
            PartGroup::MoeLayers => format!("layers {range} (MoE)"),
            PartGroup::Norm => "norm".into(),
            PartGroup::LmHead => "lm_head".into(),
        }
    }
}

/// One group of parts over one phase.
#[derive(Clone, Debug, Serialize)]
pub struct GroupResult {
    pub group: PartGroup,
    pub name: String,
    pub status: Status,
    pub metrics: Vec<MetricRow>,
}

/// A phase: the prefill, all decode steps, or both — the analytic generation's closed
/// form against the sum of measured calls, and the same per group of parts.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseResult {
    /// `prefill`, `decode` or `total`.
    pub phase: &'static str,
    /// Forward calls in the phase.
    pub calls: u64,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub metrics: Vec<MetricRow>,
    pub groups: Vec<GroupResult>,
}

/// The verification of a whole generation.
#[derive(Clone, Debug, Serialize)]
pub struct ModelResult {
    #[serde(flatten)]
    pub plan: ModelPlan,
    pub layer_kinds: Vec<MlpKind>,
    /// Why the model could not be built or costed (nothing ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub phases: Vec<PhaseResult>,
    pub calls: Vec<CallResult>,
    /// The greedy tokens of the first sequence, in order.
    pub tokens: Vec<i64>,
    /// Statuses of the calls and the phases.
    pub summary: Summary,
}

impl ModelResult {
    /// The summary line (`12 checks (prefill, 8 decode steps, 3 phase totals): …`).
    /// Decode steps that did not run (a call before them failed) are said so:
    /// `(prefill, 0 of 2 decode steps, 3 phase totals)`.
    pub fn summary_line(&self) -> String {
        let decode = self
            .calls
            .iter()
            .filter(|c| matches!(c.call, Call::Decode { .. }))
            .count() as u64;
        let planned = self.plan.new_tokens;
        let steps = if planned == 1 { "step" } else { "steps" };
        let ran = match decode == planned {
            true => format!("{decode}"),
            false => format!("{decode} of {planned}"),
        };
        let what = format!(
            "(prefill, {ran} decode {steps}, {} phase totals)",
            self.phases.len()
        );
        self.summary
            .line(&format!("check {what}"), &format!("checks {what}"))
    }
}

/// Progress of a model run, for a front end.
pub enum ModelProgress<'a> {
    /// The model's weights are being drawn.
    Building,
    /// A call finished (`done` of `total`).
    Call {
        done: usize,
        total: usize,
        result: &'a CallResult,
    },
}

/// Analytic and measured values of some parts over some calls, summed.
#[derive(Clone, Debug)]
struct Sides {
    analytic: Metrics,
    /// The exact rows' measured values (other fields 0).
    measured: Metrics,
    /// The FlopCounterMode-compatible measured total.
    flop_counter_mode: u64,
    blind: CounterBlindSpot,
    /// The worst status of the parts summed in.
    worst: Status,
    /// A test hook's delta to the analytic FLOP total (a `flops` perturbation of a part
    /// or a phase, [`crate::hooks::TestHooks::perturb`]); 0 outside tests. Summed like
    /// the FLOPs, so a part's reaches every row that includes that part.
    hooked_flops: u64,
}

impl Default for Sides {
    fn default() -> Sides {
        Sides {
            analytic: Metrics::default(),
            measured: Metrics::default(),
            flop_counter_mode: 0,
            blind: CounterBlindSpot::default(),
            worst: Status::Pass,
            hooked_flops: 0,
        }
    }
}

impl Sides {
    fn of_part(
        analytic: Metrics,
        run: &LayerRun,
        blind: CounterBlindSpot,
        status: Status,
        hooked_flops: u64,
    ) -> Sides {
        let mut measured = Metrics::default();
        for exact in EXACT {
            exact.metric.set(&mut measured, (exact.measured)(run));
        }
        Sides {
            analytic,
            measured,
            flop_counter_mode: run.counts.flops.flop_counter_mode_flops,
            blind,
            worst: status,
            hooked_flops,
        }
    }

    fn combine(
        &self,
        other: &Sides,
        metrics: impl Fn(&Metrics, &Metrics) -> modelmeter::Result<Metrics>,
    ) -> modelmeter::Result<Sides> {
        let mut kernels = self.blind.kernels.clone();
        for k in &other.blind.kernels {
            if !kernels.contains(k) {
                kernels.push(k.clone());
            }
        }
        let add = |what: &str, a: u64, b: u64| modelmeter::checked::sum(what, &[a, b]);
        Ok(Sides {
            analytic: metrics(&self.analytic, &other.analytic)?,
            measured: metrics(&self.measured, &other.measured)?,
            flop_counter_mode: add(
                "FlopCounterMode FLOPs",
                self.flop_counter_mode,
                other.flop_counter_mode,
            )?,
            blind: CounterBlindSpot {
                elementwise_flops: add(
                    "elementwise FLOPs FlopCounterMode cannot see",
                    self.blind.elementwise_flops,
                    other.blind.elementwise_flops,
                )?,
                attention_core_flops: add(
                    "attention-core FLOPs FlopCounterMode cannot see",
                    self.blind.attention_core_flops,
                    other.blind.attention_core_flops,
                )?,
                kernels,
            },
            worst: self.worst.max(other.worst),
            hooked_flops: self.hooked_flops.saturating_add(other.hooked_flops),
        })
    }

    /// Parts of one call: everything adds up.
    fn and(&self, other: &Sides) -> modelmeter::Result<Sides> {
        self.combine(other, |a, b| a.checked_add(b))
    }

    /// A later call: work adds up, state is the later call's.
    fn then(&self, later: &Sides) -> modelmeter::Result<Sides> {
        self.combine(later, accumulate)
    }

    /// The `flops` row and the exact rows (an analytic total past 64 bits is an error,
    /// not a row).
    fn rows(&self, tolerance: f64) -> modelmeter::Result<Vec<MetricRow>> {
        let (a, m) = (&self.analytic, &self.measured);
        let mut rows = vec![compare_flops(
            a.total_flops()?.saturating_add(self.hooked_flops),
            self.flop_counter_mode,
            &self.blind,
            a.matmul_flops == m.matmul_flops,
            tolerance,
        )];
        for exact in EXACT {
            let metric = exact.metric;
            rows.push(compare(
                Check::Exact(metric),
                metric.get(a),
                metric.get(m),
                tolerance,
            ));
        }
        Ok(rows)
    }
}

/// Folds `items` with `f`; `None` when empty.
fn fold(
    items: impl IntoIterator<Item = Sides>,
    f: impl Fn(&Sides, &Sides) -> modelmeter::Result<Sides>,
) -> modelmeter::Result<Option<Sides>> {
    let mut out: Option<Sides> = None;
    for s in items {
        out = Some(match out {
            None => s,
            Some(o) => f(&o, &s)?,
        });
    }
    Ok(out)
}

/// A measured call: its result and the summed sides of each part.
struct Measured {
    result: CallResult,
    parts: Vec<(StackPart, Sides)>,
    /// Bytes of expert weights the default routing model reads but this call's routing
    /// did not (experts that received no tokens): the closed form's `io_bytes` less this
    /// is the closed form under the measured routing.
    unread_expert_bytes: u64,
}

/// Compares one measured call, part by part and as a whole. An error (the call's
/// `error`) when the analytic model fails, or when the parts that ran are not the stack's
/// ([`parts_mismatch`]: none at all would give rows of 0 = 0 that pass with nothing
/// measured).
fn compare_call(
    call: Call,
    run: &StepRun,
    plan: &Plan,
    model: &ModelPlan,
) -> Result<Measured, String> {
    let analytic_error = |e: modelmeter::Error| format!("analytic model: {e}");
    let workload = call.workload(&plan.workload).map_err(analytic_error)?;
    // Counts do not depend on positions, so a reference that restarted or skipped its
    // rotary positions would pass every row: the call must start where the analytic one
    // does (S + t for decode step t).
    if run.first_position != workload.first_position() {
        return Err(format!(
            "the reference ran {} from position {}, the analytic model from {}",
            call.label(),
            run.first_position,
            workload.first_position()
        ));
    }
    // The call's rows sum the parts that ran: a part the reference left out (or ran
    // twice) would be missing from both sides and pass. The parts must be the stack's.
    let ran: Vec<StackPart> = run.parts.iter().map(|(part, _)| *part).collect();
    if let Some(why) = parts_mismatch(&StackPart::all(&plan.config), &ran) {
        return Err(why);
    }
    let stack = DeepseekV2Decoder::new(&plan.config, &workload, plan.attention);
    let mut layers = Vec::new();
    let mut parts = Vec::new();
    let mut unread_expert_bytes = 0u64;
    for (part, run) in &run.parts {
        let mut cost = stack.part_cost(*part).map_err(analytic_error)?;
        if run.experts_hit().is_some() {
            // Each expert that ran read its own weights: cost the measured routing.
            let routed =
                DeepseekV2Decoder::new(&plan.config, &run.routed(&workload), plan.attention)
                    .part_cost(*part)
                    .map_err(analytic_error)?;
            // The even split reads the weights of the most experts a routing can use:
            // a measured routing reads as many or fewer.
            let unread = cost
                .metrics
                .io_bytes
                .checked_sub(routed.metrics.io_bytes)
                .ok_or_else(|| {
                    format!(
                        "analytic model: {} reads more bytes under the measured routing ({}) than under the even split ({})",
                        part.path(),
                        routed.metrics.io_bytes,
                        cost.metrics.io_bytes
                    )
                })?;
            unread_expert_bytes =
                modelmeter::checked::sum("unread expert bytes", &[unread_expert_bytes, unread])
                    .map_err(analytic_error)?;
            cost = routed;
        }
        let hook_name = format!("{}/{}", call.label(), part.path());
        let result = compare_run(&cost.name, &hook_name, &cost, run, plan);
        let analytic = perturbed(&plan.hooks, &hook_name, analytic_on_device(plan, &cost));
        let blind = invisible_to_flop_counter_mode(&cost, analytic.elementwise_flops, run);
        let hooked_flops = plan.hooks.flops_delta(&hook_name);
        let sides = Sides::of_part(analytic, run, blind, result.status, hooked_flops);
        parts.push((*part, sides));
        layers.push(result);
    }
    let whole = fold(parts.iter().map(|(_, s)| s.clone()), Sides::and)
        .map_err(analytic_error)?
        // parts_mismatch refused a call without parts above.
        .ok_or_else(|| "internal: no parts to compare after the parts check".to_string())?;
    let metrics = whole.rows(plan.tolerance).map_err(analytic_error)?;
    let status = worst(&metrics).max(whole.worst);
    let exact = is_exact(&metrics) && layers.iter().all(|l| is_exact(&l.metrics));
    let keep = call == Call::Prefill || !exact || !status.is_ok() || model.verbose;
    let attention_kernels: Vec<String> = layers
        .iter()
        .flat_map(|l| l.attention_kernels.iter().cloned())
        .collect();
    if !keep {
        layers.clear();
    }
    Ok(Measured {
        result: CallResult {
            call,
            context_len: workload.first_position(),
            key_len: workload.key_len().map_err(analytic_error)?,
            status,
            error: None,
            metrics,
            layers,
            attention_kernels,
            seconds: 0.0,
        },
        parts,
        unread_expert_bytes,
    })
}

/// Why the parts a call `ran` are not the analytic stack's `expected` parts in order, or
/// `None` when they are: the parts missing, those not in the stack or run again, and
/// otherwise the order.
fn parts_mismatch(expected: &[StackPart], ran: &[StackPart]) -> Option<String> {
    if expected == ran {
        return None;
    }
    if ran.is_empty() {
        return Some(
            "the reference model ran none of the model's parts: nothing was measured to compare"
                .into(),
        );
    }
    let paths = |parts: &mut dyn Iterator<Item = &StackPart>| {
        parts.map(|p| p.path()).collect::<Vec<_>>().join(", ")
    };
    let missing = paths(&mut expected.iter().filter(|p| !ran.contains(p)));
    let mut seen = Vec::new();
    let extra = paths(&mut ran.iter().filter(|p| {
        let again = seen.contains(p);
        seen.push(*p);
        again || !expected.contains(p)
    }));
    let mut why = Vec::new();
    if !missing.is_empty() {
        why.push(format!("did not run {missing}"));
    }
    if !extra.is_empty() {
        why.push(format!(
            "ran {extra}, which the analytic stack does not have there"
        ));
    }
    if why.is_empty() {
        why.push(format!(
            "ran the parts in the order {}, the stack's is {}",
            paths(&mut ran.iter()),
            paths(&mut expected.iter())
        ));
    }
    Some(format!(
        "the reference model {}: the call's rows would compare different parts",
        why.join(" and ")
    ))
}

/// True when every exact row of `rows`, and the peak row, has analytic = measured (a row
/// within a nonzero tolerance passes without being exact). The peak is judged within
/// the tolerance, but the report's "exact" must not hide a peak that is not: a call
/// counted exact has its parts left out of the report.
pub fn is_exact(rows: &[MetricRow]) -> bool {
    !rows.iter().any(is_inexact)
}

/// An exact row, or the peak row, whose analytic and measured values differ (whatever
/// its status: within a nonzero tolerance it passes).
pub fn is_inexact(row: &MetricRow) -> bool {
    matches!(row.metric, Check::Exact(_) | Check::PeakActivationBytes)
        && row.analytic != row.measured
}

impl CallResult {
    /// True when the call ran and every exact row of the stack and of its parts is exact.
    pub fn exact(&self) -> bool {
        self.error.is_none()
            && is_exact(&self.metrics)
            && self.layers.iter().all(|l| is_exact(&l.metrics))
    }
}

fn error_call(call: Call, workload: &Workload, cause: String) -> CallResult {
    CallResult {
        call,
        context_len: workload.first_position(),
        key_len: workload.key_len().unwrap_or(0),
        status: Status::Error,
        error: Some(cause),
        metrics: Vec::new(),
        layers: Vec::new(),
        attention_kernels: Vec::new(),
        seconds: 0.0,
    }
}

/// Builds the reference model and runs the prefill and every decode step, comparing as
/// it goes. A call that cannot run is an `error` and ends the generation (later calls
/// need its tokens and caches); the phases it belongs to are errors too.
pub fn run(plan: &Plan, model: &ModelPlan, progress: &mut dyn FnMut(ModelProgress)) -> ModelResult {
    let setup = Setup {
        device: plan.device,
        seed: plan.seed,
    };
    let total = 1 + model.new_tokens as usize;
    let mut result = ModelResult {
        plan: *model,
        layer_kinds: plan.config.layer_kinds.clone(),
        error: None,
        phases: Vec::new(),
        calls: Vec::new(),
        tokens: Vec::new(),
        summary: Summary::default(),
    };
    progress(ModelProgress::Building);
    let built = catch_unwind(AssertUnwindSafe(|| {
        RefDeepseekV2ForCausalLM::new(
            &plan.config,
            plan.attention,
            plan.workload.mla,
            plan.workload.dtype,
            &setup,
        )
    }));
    let reference = match built {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            return failed(
                result,
                format!("the reference model could not be built: {e}"),
            )
        }
        Err(panic) => {
            return failed(
                result,
                format!(
                    "building the reference model panicked: {}",
                    panic_text(panic)
                ),
            )
        }
    };
    let mut generation = match reference.generate(
        plan.workload.batch,
        plan.workload.query_len(),
        plan.workload.allow_tf32,
    ) {
        Ok(g) => g,
        Err(e) => return failed(result, format!("the prompt could not be built: {e}")),
    };
    let mut measured: Vec<Measured> = Vec::new();
    let mut stopped: Option<String> = None;
    for index in 0..total {
        let call = match index {
            0 => Call::Prefill,
            i => Call::Decode { step: i as u64 - 1 },
        };
        let start = Instant::now();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            plan.hooks.injected_error(&call.label())?;
            generation.step()
        }));
        let workload = call.workload(&plan.workload);
        let outcome = match (ran, &workload) {
            (_, Err(e)) => Err(format!("analytic model: {e}")),
            (Ok(Ok(run)), Ok(_)) => {
                if let Some(token) = run.next_tokens.first() {
                    result.tokens.push(*token);
                }
                compare_call(call, &run, plan, model)
            }
            (Ok(Err(e)), Ok(_)) if e.is_out_of_memory() => Err(format!(
                "out of memory on {}: {e}",
                DeviceSpec::of(plan.device)
            )),
            (Ok(Err(e)), Ok(_)) => Err(e.to_string()),
            (Err(panic), Ok(_)) => Err(format!(
                "the reference model panicked: {}",
                panic_text(panic)
            )),
        };
        let mut call_result = match outcome {
            Ok(m) => {
                let r = m.result.clone();
                measured.push(m);
                r
            }
            Err(cause) => {
                stopped = Some(format!("{} could not run: {cause}", call.describe()));
                error_call(call, workload.as_ref().unwrap_or(&plan.workload), cause)
            }
        };
        call_result.seconds = start.elapsed().as_secs_f64();
        progress(ModelProgress::Call {
            done: index + 1,
            total,
            result: &call_result,
        });
        result.calls.push(call_result);
        if stopped.is_some() {
            break;
        }
    }
    result.phases = phases(plan, model, &measured, stopped.as_deref());
    result.summary = summarise(&result);
    result
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// `result` with nothing run: every phase an error with `cause`.
fn failed(mut result: ModelResult, cause: String) -> ModelResult {
    result.phases = result
        .plan
        .phases()
        .into_iter()
        .map(|(phase, _)| PhaseResult {
            phase,
            calls: 0,
            status: Status::Error,
            error: Some(cause.clone()),
            metrics: Vec::new(),
            groups: Vec::new(),
        })
        .collect();
    result.error = Some(cause);
    result.summary = summarise(&result);
    result
}

fn summarise(result: &ModelResult) -> Summary {
    result
        .calls
        .iter()
        .map(|c| c.status)
        .chain(result.phases.iter().map(|p| p.status))
        .collect()
}

/// The phase results: closed form against measured sums, and per group of parts.
fn phases(
    plan: &Plan,
    model: &ModelPlan,
    measured: &[Measured],
    stopped: Option<&str>,
) -> Vec<PhaseResult> {
    let closed = model
        .generation(plan)
        .and_then(|g| g.metrics().map_err(|e| e.to_string()));
    model
        .phases()
        .into_iter()
        .map(|(phase, expected)| {
            let calls: Vec<&Measured> = measured
                .iter()
                .filter(|m| match phase {
                    "prefill" => m.result.call == Call::Prefill,
                    "decode" => m.result.call != Call::Prefill,
                    _ => true,
                })
                .collect();
            let error = |cause: String| PhaseResult {
                phase,
                calls: calls.len() as u64,
                status: Status::Error,
                error: Some(cause),
                metrics: Vec::new(),
                groups: Vec::new(),
            };
            if calls.len() as u64 != expected {
                return error(stopped.unwrap_or("not every call ran").to_string());
            }
            let closed = match &closed {
                // Test hooks address a phase's closed form as `generation/decode`.
                Ok(g) => crate::runner::perturbed(
                    &plan.hooks,
                    &format!("generation/{phase}"),
                    pick(g, phase),
                ),
                Err(e) => return error(format!("analytic generation: {e}")),
            };
            match phase_result(plan, phase, &calls, closed) {
                Ok(r) => r,
                Err(e) => error(format!("summing the calls: {e}")),
            }
        })
        .collect()
}

fn pick(g: &GenerationMetrics, phase: &str) -> Metrics {
    match phase {
        "prefill" => g.prefill,
        "decode" => g.decode,
        _ => g.total,
    }
}

fn phase_result(
    plan: &Plan,
    phase: &'static str,
    calls: &[&Measured],
    closed_form: Metrics,
) -> modelmeter::Result<PhaseResult> {
    let whole_calls = calls.iter().map(|m| {
        fold(m.parts.iter().map(|(_, s)| s.clone()), Sides::and).map(Option::unwrap_or_default)
    });
    let whole_calls: Vec<Sides> = whole_calls.collect::<modelmeter::Result<_>>()?;
    let mut whole = fold(whole_calls, Sides::then)?.unwrap_or_default();
    // The phase row: the generation's closed form, not the sum of analytic calls — under
    // the routing the calls measured (experts that received no tokens read no weights).
    let unread = modelmeter::checked::sum(
        "unread expert bytes",
        &calls
            .iter()
            .map(|m| m.unread_expert_bytes)
            .collect::<Vec<_>>(),
    )?;
    let blocks = whole.analytic.activation_bytes;
    whole.analytic = closed_form;
    // The closed form replaces the parts' analytic sides, their hooks' deltas with them.
    whole.hooked_flops = plan.hooks.flops_delta(&format!("generation/{phase}"));
    whole.analytic.io_bytes = closed_form.io_bytes.checked_sub(unread).ok_or_else(|| {
        modelmeter::Error::op_shape(
            phase,
            format!(
                "the closed form's io_bytes ({}) are fewer than the bytes of experts its calls did not read ({unread})",
                closed_form.io_bytes
            ),
        )
    })?;
    if plan.device.is_cuda() {
        // The closed form counts tensor bytes; the caching allocator reports blocks: the
        // largest call's blocks, each tensor rounded as the calls were compared.
        whole.analytic.activation_bytes = blocks;
    }
    let mut metrics = whole.rows(plan.tolerance)?;
    if plan.device.is_cuda() {
        // Say so: this row then repeats the calls' comparison, not the closed form's.
        if let Some(row) = metrics
            .iter_mut()
            .find(|r| r.metric == Check::Exact(modelmeter::Metric::ActivationBytes))
        {
            row.add_note(
                "on CUDA the analytic side is the largest call's caching-allocator blocks, not the closed form (which counts tensor bytes)",
            );
        }
    }
    if unread > 0 {
        if let Some(row) = metrics
            .iter_mut()
            .find(|r| r.metric == Check::Exact(modelmeter::Metric::IoBytes))
        {
            row.add_note(&format!(
                "closed form under the measured routing: {unread} bytes of weights of experts that received no tokens are not read"
            ));
        }
    }
    let mut groups = Vec::new();
    for group in PartGroup::ALL {
        let per_call: Vec<Sides> = calls
            .iter()
            .map(|m| {
                let members = m
                    .parts
                    .iter()
                    .filter(|(p, _)| PartGroup::of(*p, &plan.config) == group)
                    .map(|(_, s)| s.clone());
                fold(members, Sides::and)
            })
            .collect::<modelmeter::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let Some(sides) = fold(per_call, Sides::then)? else {
            continue;
        };
        let name = group.describe(&plan.config);
        let rows = sides.rows(plan.tolerance)?;
        groups.push(GroupResult {
            group,
            status: worst(&rows).max(sides.worst),
            name,
            metrics: rows,
        });
    }
    let status = calls
        .iter()
        .map(|m| m.result.status)
        .chain(groups.iter().map(|g| g.status))
        .fold(worst(&metrics), Status::max);
    Ok(PhaseResult {
        phase,
        calls: calls.len() as u64,
        status,
        error: None,
        metrics,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill(seq_len: u64) -> Workload {
        Workload::prefill(1, seq_len).unwrap()
    }

    #[test]
    fn groups_of_layers_that_are_not_consecutive_name_their_runs() {
        assert_eq!(runs(&[1, 2, 3, 4]), "1-4");
        assert_eq!(runs(&[0, 1, 3]), "0-1, 3");
        assert_eq!(runs(&[2]), "2");
        assert_eq!(runs(&[0, 2, 4, 5]), "0, 2, 4-5");
        assert_eq!(runs(&[]), "");
        let mut c = ModelConfig::deepseek_ocr().first_layers(4).unwrap();
        c.layer_kinds = vec![MlpKind::Dense, MlpKind::Dense, MlpKind::Moe, MlpKind::Dense];
        assert_eq!(PartGroup::DenseLayers.describe(&c), "layers 0-1, 3 (dense)");
        assert_eq!(PartGroup::MoeLayers.describe(&c), "layers 2 (MoE)");
    }

    /// A panic's message, whichever of the two types `panic!` gives it.
    #[test]
    fn a_panic_is_told_by_its_message() {
        let caught = |f: fn()| {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let payload = std::panic::catch_unwind(f).unwrap_err();
            std::panic::set_hook(hook);
            panic_text(payload)
        };
        assert_eq!(caught(|| panic!("a literal")), "a literal");
        assert_eq!(caught(|| panic!("{} formatted", 2)), "2 formatted");
        assert_eq!(caught(|| std::panic::panic_any(7_u8)), "unknown panic");
    }

    /// A model that could not be built or prompted: every phase it plans is an error with
    /// the cause (no decode phase without new tokens), and the summary counts them.
    #[test]
    fn a_model_that_never_ran_has_every_planned_phase_in_error() {
        for (new_tokens, phases) in [
            (0, vec!["prefill", "total"]),
            (1, vec!["prefill", "decode", "total"]),
            (3, vec!["prefill", "decode", "total"]),
        ] {
            let result = ModelResult {
                plan: ModelPlan {
                    num_layers: 1,
                    config_layers: 1,
                    new_tokens,
                    verbose: false,
                },
                layer_kinds: vec![MlpKind::Dense],
                error: None,
                phases: Vec::new(),
                calls: Vec::new(),
                tokens: Vec::new(),
                summary: Summary::default(),
            };
            let r = failed(result, "no libtorch".into());
            assert_eq!(r.error.as_deref(), Some("no libtorch"));
            let names: Vec<&str> = r.phases.iter().map(|p| p.phase).collect();
            assert_eq!(names, phases, "{new_tokens} new tokens");
            assert!(r.phases.iter().all(|p| p.status == Status::Error
                && p.error.as_deref() == Some("no libtorch")
                && p.calls == 0));
            assert_eq!((r.summary.error, r.summary.pass), (phases.len(), 0));
        }
    }

    /// Each phase expects its calls: one prefill, `--new-tokens` decode steps (no decode
    /// phase without them), and both in the total.
    #[test]
    fn a_plan_reports_its_prefill_its_decode_steps_and_their_total() {
        let plan = |new_tokens| ModelPlan {
            num_layers: 1,
            config_layers: 1,
            new_tokens,
            verbose: false,
        };
        assert_eq!(plan(0).phases(), [("prefill", 1), ("total", 1)]);
        assert_eq!(
            plan(5).phases(),
            [("prefill", 1), ("decode", 5), ("total", 6)]
        );
    }

    #[test]
    fn a_call_must_run_the_stacks_parts_in_order() {
        let c = ModelConfig::deepseek_ocr().first_layers(2).unwrap();
        let stack = StackPart::all(&c);
        assert_eq!(parts_mismatch(&stack, &stack), None);
        let without_head = &stack[..stack.len() - 1];
        let e = parts_mismatch(&stack, without_head).unwrap();
        assert!(e.contains("did not run lm_head"), "{e}");
        let mut twice = stack.clone();
        twice.insert(2, StackPart::Layer(0));
        let e = parts_mismatch(&stack, &twice).unwrap();
        assert!(e.contains("ran layers.0, which the analytic stack"), "{e}");
        let e =
            parts_mismatch(&stack, &[stack.clone(), vec![StackPart::Layer(7)]].concat()).unwrap();
        assert!(e.contains("ran layers.7"), "{e}");
        let mut swapped = stack.clone();
        swapped.swap(1, 2);
        let e = parts_mismatch(&stack, &swapped).unwrap();
        assert!(
            e.contains("in the order embed_tokens, layers.1, layers.0"),
            "{e}"
        );
        assert!(parts_mismatch(&stack, &[])
            .unwrap()
            .contains("ran none of the model's parts"));
    }

    #[test]
    fn sizes_are_checked_against_the_config() {
        let c = ModelConfig::deepseek_ocr();
        let (cut, plan) = ModelPlan::new(&c, &prefill(64), Some(3), 8, false).unwrap();
        assert_eq!((plan.num_layers, plan.config_layers), (3, 12));
        assert_eq!(cut.layer_kinds.len(), 3);
        let (all, _) = ModelPlan::new(&c, &prefill(64), None, 8, false).unwrap();
        assert_eq!(all, c);
        // 8192 positions: 8000 + 192 fit, one more does not.
        assert!(ModelPlan::new(&c, &prefill(8000), None, 192, false).is_ok());
        let e = ModelPlan::new(&c, &prefill(8000), None, 193, false).unwrap_err();
        assert!(
            e.starts_with("--new-tokens = 193 is too large")
                && e.contains("max_position_embeddings = 8192")
                && e.ends_with("expected at most 192"),
            "{e}"
        );
        let e = ModelPlan::new(&c, &prefill(9000), None, 0, false).unwrap_err();
        assert!(e.starts_with("--seq-len = 9000 is too large"), "{e}");
        let e = ModelPlan::new(&c, &prefill(64), Some(13), 8, false).unwrap_err();
        assert!(
            e.contains("--num-layers = 13") && e.contains("1 ..= 12"),
            "{e}"
        );
        let e = ModelPlan::new(&c, &Workload::decode(1, 4).unwrap(), None, 8, false).unwrap_err();
        assert!(e.contains("--phase decode"), "{e}");
    }

    #[test]
    fn decode_step_t_follows_s_plus_t_tokens() {
        let w = Call::Decode { step: 3 }.workload(&prefill(64)).unwrap();
        assert_eq!((w.first_position(), w.key_len().unwrap()), (67, 68));
        assert_eq!(Call::Prefill.workload(&prefill(64)).unwrap(), prefill(64));
        assert_eq!(Call::Decode { step: 3 }.label(), "decode[3]");
    }

    #[test]
    fn a_call_that_ran_no_parts_is_an_error_not_zero_rows() {
        // No parts measured would fold to all-zero sides whose rows pass 0 = 0.
        let plan = Plan::on_cpu(
            ModelConfig::deepseek_ocr().first_layers(2).unwrap(),
            prefill(8),
        );
        let model = ModelPlan {
            num_layers: 2,
            config_layers: 12,
            new_tokens: 1,
            verbose: false,
        };
        for call in [Call::Prefill, Call::Decode { step: 0 }] {
            // A call at another position than the analytic one's is not compared either.
            let elsewhere = StepRun {
                first_position: call.workload(&plan.workload).unwrap().first_position() + 1,
                parts: Vec::new(),
                next_tokens: vec![0],
            };
            let e = compare_call(call, &elsewhere, &plan, &model).err().unwrap();
            assert!(
                e.contains(&format!("the reference ran {} from position", call.label())),
                "{e}"
            );
            let run = StepRun {
                first_position: call.workload(&plan.workload).unwrap().first_position(),
                parts: Vec::new(),
                next_tokens: vec![0],
            };
            let e = match compare_call(call, &run, &plan, &model) {
                Ok(m) => panic!(
                    "{}: compared with rows {:?}",
                    call.label(),
                    m.result.metrics
                ),
                Err(e) => e,
            };
            assert!(
                e.contains("ran none of the model's parts") && e.contains("nothing was measured"),
                "{e}"
            );
        }
    }

    #[test]
    fn groups_follow_the_dense_moe_pattern() {
        let c = ModelConfig::deepseek_ocr().first_layers(4).unwrap();
        assert_eq!(PartGroup::DenseLayers.describe(&c), "layers 0 (dense)");
        assert_eq!(PartGroup::MoeLayers.describe(&c), "layers 1-3 (MoE)");
        assert_eq!(PartGroup::of(StackPart::Layer(2), &c), PartGroup::MoeLayers);
    }
}

//! Runs each selected layer as a reference module under the FLOP counter, costs the
//! matching analytic layer, and compares them metric by metric. A layer that fails to
//! run is an `error` with its cause; the other layers still run.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use modelmeter::conventions::{convention, is_fused_attention};
use modelmeter::layers::{AttentionImpl, ATTENTION_CORE_ROLE};
use modelmeter::{Cost, ModelConfig, Workload};
use modelmeter_reference::harness::{run_layer, LayerRun};
use modelmeter_reference::{OpSummary, Setup};
use serde::Serialize;
use tch::Device;

use crate::check::{self, Check, EXACT};
use crate::compare::{compare, compare_flops, worst, CounterBlindSpot, MetricRow, Status};
use crate::pairing::{self, Pairing, REGISTRY};

/// What one verification run checks.
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    pub device: Device,
    pub tolerance: f64,
    pub layers: Vec<Pairing>,
    pub seed: u64,
}

/// The verification of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerResult {
    pub name: String,
    pub status: Status,
    /// Why the layer could not run (status `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub metrics: Vec<MetricRow>,
    /// Measured op records, summarised by op name.
    pub ops: Vec<OpSummary>,
    /// Executed ops with no rule in the conventions table.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown_ops: BTreeMap<String, usize>,
    /// The fused attention kernels libtorch dispatched to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attention_kernels: Vec<String>,
    /// MoE layers: how many routed experts received tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts_used: Option<usize>,
    #[serde(skip)]
    pub seconds: f64,
}

/// Layer counts per status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: usize,
    pub known_gap: usize,
    pub fail: usize,
    pub error: usize,
}

impl Summary {
    /// Counts the statuses of `layers`.
    pub fn of(layers: &[LayerResult]) -> Summary {
        let mut s = Summary::default();
        for l in layers {
            s.add(l.status);
        }
        s
    }

    fn add(&mut self, status: Status) {
        match status {
            Status::Pass => self.pass += 1,
            Status::KnownGap => self.known_gap += 1,
            Status::Fail => self.fail += 1,
            Status::Error => self.error += 1,
        }
    }

    /// Adds another summary.
    pub fn merge(&mut self, other: &Summary) {
        self.pass += other.pass;
        self.known_gap += other.known_gap;
        self.fail += other.fail;
        self.error += other.error;
    }

    /// True when nothing failed or errored.
    pub fn ok(&self) -> bool {
        self.fail == 0 && self.error == 0
    }

    /// `7 layers: 6 pass, 1 known_gap, 0 fail, 0 error`.
    pub fn line(&self, what: &str) -> String {
        let total = self.pass + self.known_gap + self.fail + self.error;
        format!(
            "{total} {what}: {} pass, {} known_gap, {} fail, {} error",
            self.pass, self.known_gap, self.fail, self.error
        )
    }
}

/// Progress events for a front end (printing is not this module's job).
pub enum Progress<'a> {
    Started {
        index: usize,
        total: usize,
        name: &'a str,
    },
    Finished {
        index: usize,
        total: usize,
        result: &'a LayerResult,
    },
}

/// The layers of `config` that the runner can check, in report order.
pub fn applicable_layers(config: &ModelConfig) -> Vec<Pairing> {
    pairing::present(&REGISTRY, config)
}

/// Verifies every layer of the plan.
pub fn verify(plan: &Plan, progress: &mut dyn FnMut(Progress)) -> Vec<LayerResult> {
    let total = plan.layers.len();
    let mut results = Vec::with_capacity(total);
    for (index, pairing) in plan.layers.iter().enumerate() {
        let name = pairing.name(plan.attention);
        progress(Progress::Started { index, total, name });
        let start = Instant::now();
        let mut result = verify_layer(*pairing, plan);
        result.seconds = start.elapsed().as_secs_f64();
        progress(Progress::Finished {
            index,
            total,
            result: &result,
        });
        results.push(result);
    }
    results
}

fn verify_layer(pairing: Pairing, plan: &Plan) -> LayerResult {
    let name = pairing.name(plan.attention).to_string();
    let analytic = pairing
        .analytic(&plan.config, &plan.workload, plan.attention)
        .and_then(|layer| layer.cost());
    let analytic = match analytic {
        Ok(cost) => cost,
        Err(e) => return error_result(name, format!("analytic model: {e}")),
    };
    let module = match pairing.module(&plan.config) {
        Ok(module) => module,
        Err(why) => return error_result(name, why),
    };
    let setup = Setup {
        device: plan.device,
        seed: plan.seed,
    };
    let run = catch_unwind(AssertUnwindSafe(|| {
        injected_error(&name)?;
        run_layer(module, &plan.config, &plan.workload, plan.attention, &setup)
    }));
    match run {
        Ok(Ok(run)) if run.counts.tf32_allowed != plan.workload.allow_tf32 => error_result(
            name,
            format!(
                "libtorch's TF32 switch was {} during the run, the workload says {}",
                run.counts.tf32_allowed, plan.workload.allow_tf32
            ),
        ),
        Ok(Ok(run)) => compare_layer(&name, &analytic, &run, plan.tolerance),
        Ok(Err(e)) if e.is_out_of_memory() => {
            error_result(name, format!("out of memory on {:?}: {e}", plan.device))
        }
        Ok(Err(e)) => error_result(name, e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            error_result(name, format!("the reference module panicked: {message}"))
        }
    }
}

fn error_result(name: String, cause: String) -> LayerResult {
    LayerResult {
        name,
        status: Status::Error,
        error: Some(cause),
        metrics: Vec::new(),
        ops: Vec::new(),
        unknown_ops: BTreeMap::new(),
        attention_kernels: Vec::new(),
        experts_used: None,
        seconds: 0.0,
    }
}

/// Every node of `cost` called `name`.
fn nodes<'a>(cost: &'a Cost, name: &str, out: &mut Vec<&'a Cost>) {
    if cost.name == name {
        out.push(cost);
    }
    for child in &cost.children {
        nodes(child, name, out);
    }
}

/// What `FlopCounterMode` cannot see in this run: the elementwise FLOPs (given, from the
/// analytic metrics), and the attention core when libtorch ran it as a fused kernel
/// outside FlopCounterMode's registry (the CPU SDPA kernel), with the kernel names.
fn invisible_to_flop_counter_mode(
    analytic: &Cost,
    elementwise_flops: u64,
    run: &LayerRun,
) -> CounterBlindSpot {
    let kernels: Vec<String> = run
        .counts
        .attention_kernels()
        .into_iter()
        .filter(|k| convention(k).is_some_and(|c| !c.flop_counter_mode))
        .collect();
    if kernels.is_empty() {
        return CounterBlindSpot {
            elementwise_flops,
            ..CounterBlindSpot::default()
        };
    }
    let mut cores = Vec::new();
    nodes(analytic, ATTENTION_CORE_ROLE, &mut cores);
    let sum = |f: &dyn Fn(&Cost) -> u64| cores.iter().map(|c| f(c)).fold(0u64, u64::saturating_add);
    CounterBlindSpot {
        elementwise_flops: elementwise_flops.saturating_sub(sum(&|c| c.metrics.elementwise_flops)),
        attention_core_flops: sum(&|c| c.metrics.total_flops().unwrap_or(u64::MAX)),
        kernels,
    }
}

fn compare_layer(name: &str, analytic: &Cost, run: &LayerRun, tolerance: f64) -> LayerResult {
    let a = perturbed(name, analytic.metrics);
    let c = &run.counts;
    let blind = invisible_to_flop_counter_mode(analytic, a.elementwise_flops, run);
    let total = a
        .total_flops()
        .unwrap_or(u64::MAX)
        .saturating_add(perturbation(name, "flops").unwrap_or(0));
    let flops = compare_flops(
        name,
        total,
        c.flops.flop_counter_mode_flops,
        &blind,
        a.matmul_flops == c.flops.matmul_flops,
        tolerance,
    );
    let mut metrics = vec![flops];
    for metric in EXACT {
        let measured = check::measured(metric, run).unwrap_or_default();
        metrics.push(compare(
            name,
            Check::Exact(metric),
            metric.get(&a),
            measured,
            tolerance,
        ));
    }
    if let Some(row) = attention_kernel_row(analytic, run) {
        metrics.push(row);
    }
    if !c.is_complete() {
        let unknown: usize = c.unknown_ops.values().sum::<usize>() + c.errors.len();
        let mut what: Vec<String> = c.unknown_ops.keys().cloned().collect();
        what.extend(c.errors.iter().cloned());
        metrics.push(MetricRow {
            metric: Check::UncountedOps,
            analytic: 0,
            measured: unknown as u64,
            rel_diff: None,
            status: Status::Fail,
            note: Some(format!(
                "executed ops the conventions table cannot cost, so the measured totals are incomplete: {}",
                what.join(", ")
            )),
        });
    }
    LayerResult {
        name: name.to_string(),
        status: worst(&metrics),
        error: None,
        metrics,
        ops: c.by_op(),
        unknown_ops: c.unknown_ops.clone(),
        attention_kernels: c.attention_kernels(),
        experts_used: run
            .tokens_per_expert
            .as_ref()
            .map(|t| t.iter().filter(|n| **n > 0).count()),
        seconds: 0.0,
    }
}

/// A failing `attention_kernel` row when the fused attention kernel the analytic model
/// predicts (from the platform, dtype and head dim) is not the one libtorch ran; `None`
/// when they agree (also when neither ran one: eager, or the math path).
fn attention_kernel_row(analytic: &Cost, run: &LayerRun) -> Option<MetricRow> {
    let mut predicted: Vec<String> = analytic
        .ops()
        .into_iter()
        .filter_map(|c| c.op)
        .filter(|op| is_fused_attention(op))
        .map(str::to_string)
        .collect();
    predicted.dedup();
    let ran = run.counts.attention_kernels();
    if predicted == ran {
        return None;
    }
    let describe = |names: &[String]| {
        if names.is_empty() {
            "no fused kernel (the math path or eager ops)".to_string()
        } else {
            names.join(", ")
        }
    };
    Some(MetricRow {
        metric: Check::AttentionKernel,
        analytic: predicted.len() as u64,
        measured: ran.len() as u64,
        rel_diff: None,
        status: Status::Fail,
        note: Some(format!(
            "the analytic model predicts {}, libtorch ran {}: the kernel choice (SdpaKernel::select) is wrong for this platform, dtype and head dim",
            describe(&predicted),
            describe(&ran)
        )),
    })
}

/// The environment variable of the test hook that perturbs analytic values.
pub const PERTURB_ENV: &str = "MODELMETER_VERIFY_PERTURB";

/// Test builds only: `MODELMETER_VERIFY_PERTURB=Layer:metric:delta` adds `delta` to one
/// analytic metric (or, for `flops`, to the `flops` row's analytic total), so tests can
/// force a mismatch. Release builds ignore it; when it is active, [`active_test_hooks`]
/// says so and the report shows it.
fn perturbed(layer: &str, mut metrics: modelmeter::Metrics) -> modelmeter::Metrics {
    for metric in modelmeter::Metric::ALL {
        if let Some(delta) = perturbation(layer, metric.name()) {
            let value = metric.get(&metrics);
            metric.set(&mut metrics, value.saturating_add(delta));
        }
    }
    metrics
}

/// The delta the perturbation hook adds to `layer`'s `metric`, if any (debug builds).
fn perturbation(layer: &str, metric: &str) -> Option<u64> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let spec = std::env::var(PERTURB_ENV).ok()?;
    let mut parts = spec.splitn(3, ':');
    let (l, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    (l == layer && m == metric)
        .then(|| d.trim_start_matches('+').parse::<u64>().ok())
        .flatten()
}

/// The test hooks set in the environment that this build honours (debug builds only).
pub fn active_test_hooks() -> Vec<String> {
    if !cfg!(debug_assertions) {
        return Vec::new();
    }
    [PERTURB_ENV, INJECT_ERROR_ENV]
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| format!("{name}={v}")))
        .collect()
}

/// The environment variable of the test hook that makes one layer fail to run.
pub const INJECT_ERROR_ENV: &str = "MODELMETER_VERIFY_INJECT_ERROR";

/// Test builds only: `MODELMETER_VERIFY_INJECT_ERROR=Layer` makes that layer fail as if
/// libtorch had refused it, so tests can check error isolation. Release builds ignore it.
fn injected_error(layer: &str) -> modelmeter_reference::Result<()> {
    if cfg!(debug_assertions) && std::env::var(INJECT_ERROR_ENV).is_ok_and(|l| l == layer) {
        return Err(modelmeter_reference::Error::Observer(format!(
            "{INJECT_ERROR_ENV} made {layer} fail"
        )));
    }
    Ok(())
}

/// The largest memory one layer of the plan needs, estimated from the analytic model
/// (weights + activations + KV cache; for a decode step also the prefill that fills
/// the cache), with the layer's name. See [`crate::memory::estimate`].
pub fn memory_estimate(plan: &Plan) -> Result<(u64, String), String> {
    crate::memory::estimate(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_line() {
        let mut s = Summary::default();
        s.add(Status::Pass);
        s.add(Status::KnownGap);
        s.add(Status::Fail);
        assert!(!s.ok());
        assert_eq!(
            s.line("layers"),
            "3 layers: 1 pass, 1 known_gap, 1 fail, 0 error"
        );
    }

    /// A measured run whose only counted op is the attention kernel `kernel`.
    fn run_with_kernel(kernel: &str) -> LayerRun {
        use modelmeter_reference::counter::{Booking, Counts, OpRecord};
        let record = OpRecord {
            name: kernel.to_string(),
            thread: 1,
            backward: false,
            device: None,
            shapes: Vec::new(),
            dtypes: Vec::new(),
            flops: Default::default(),
            engine: Booking::None,
        };
        LayerRun {
            kind: modelmeter_reference::ModuleKind::Attention,
            name: "LlamaFlashAttention2".into(),
            output: tch::Tensor::from(0.0f32),
            counts: Counts {
                records: vec![record],
                ..Counts::default()
            },
            weight_bytes: 0,
            tokens_per_expert: None,
        }
    }

    #[test]
    fn a_wrong_kernel_prediction_is_a_failing_row_that_names_both() {
        let config = ModelConfig::deepseek_ocr();
        let cost = |platform| {
            let w = Workload::prefill(1, 16).unwrap().on(platform);
            modelmeter::layers::LayerId::Attention
                .build(&config, &w, AttentionImpl::Sdpa)
                .unwrap()
                .cost()
                .unwrap()
        };
        let cpu_kernel = run_with_kernel("aten::_scaled_dot_product_flash_attention_for_cpu");
        assert!(attention_kernel_row(&cost(modelmeter::Platform::Cpu), &cpu_kernel).is_none());
        // The CUDA model predicts cuDNN for bf16, d = 128; the CPU kernel ran instead.
        let row = attention_kernel_row(&cost(modelmeter::Platform::Cuda), &cpu_kernel).unwrap();
        assert_eq!(row.status, Status::Fail);
        let note = row.note.unwrap();
        assert!(
            note.contains("aten::_scaled_dot_product_cudnn_attention")
                && note.contains("aten::_scaled_dot_product_flash_attention_for_cpu"),
            "{note}"
        );
        // Eager: no fused kernel on either side.
        let w = Workload::prefill(1, 16).unwrap();
        let eager = modelmeter::layers::LayerId::Attention
            .build(&config, &w, AttentionImpl::Eager)
            .unwrap()
            .cost()
            .unwrap();
        let bmm = run_with_kernel("aten::bmm");
        assert!(attention_kernel_row(&eager, &bmm).is_none());
    }

    #[test]
    fn dense_only_configs_skip_moe_layers() {
        let mut c = ModelConfig::deepseek_ocr();
        c.moe = None;
        c.layer_kinds = vec![modelmeter::MlpKind::Dense; 12];
        use modelmeter::layers::LayerId;
        let kinds: Vec<LayerId> = applicable_layers(&c).iter().map(|p| p.layer).collect();
        assert!(!kinds.contains(&LayerId::MoE));
        assert!(!kinds.contains(&LayerId::DecoderMoe));
        assert!(kinds.contains(&LayerId::Attention));
        assert_eq!(applicable_layers(&ModelConfig::deepseek_ocr()).len(), 7);
    }
}

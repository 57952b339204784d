//! The run loop: runs each layer of a plan as a reference module under the FLOP counter,
//! costs the paired analytic layer, and compares them row by row. A layer that fails to
//! run is an `error` with its cause; the other layers still run.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::Instant;

use modelmeter::conventions::{convention, is_fused_attention};
use modelmeter::layers::ATTENTION_CORE_ROLE;
use modelmeter::Cost;
use modelmeter_reference::harness::{LayerRun, ModuleKind, Prepared};
use modelmeter_reference::{Setup, WeightCache};

use crate::check::{Check, EXACT};
use crate::compare::{compare, compare_flops, worst, CounterBlindSpot, MetricRow, Status};
use crate::device::DeviceSpec;
use crate::hooks::TestHooks;
use crate::pairing::Pairing;
use crate::plan::Plan;
use crate::results::{LayerResult, Progress};

/// How a prepared layer is run under the counter.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counting {
    /// [`Prepared::run`].
    Plain,
    /// [`Prepared::run_in_profiler_range`], under Nsight Compute: the results say whether
    /// each layer's range was opened ([`LayerResult::profiler_range_opened`]).
    InProfilerRange,
}

impl Counting {
    fn run(self, prepared: Prepared) -> modelmeter_reference::Result<LayerRun> {
        match self {
            Counting::Plain => prepared.run(),
            Counting::InProfilerRange => prepared.run_in_profiler_range(),
        }
    }

    /// What a result says of its range when the run stopped at a point where the range
    /// was certainly opened (`true`) or certainly not (`false`): nothing without ranges.
    fn range_opened(self, opened: bool) -> Option<bool> {
        (self == Counting::InProfilerRange).then_some(opened)
    }
}

/// Verifies every layer of the plan. On the CPU, where drawing weights is most of a
/// run's time, a module's parameters are handed to the next one that draws the same
/// ([`WeightCache`]; the layers then run in [`sharing_order`], the results stay in the
/// plan's order). On a GPU the weights are drawn by kernels and each layer builds its own.
pub fn verify(plan: &Plan, progress: &mut dyn FnMut(Progress)) -> Vec<LayerResult> {
    let share = plan.device == tch::Device::Cpu;
    verify_with(plan, Counting::Plain, share, progress)
}

/// [`verify`] with each layer's counted forward as one profiler range, after a warm-up
/// forward (`--hardware-counters-child`, under ncu in the replay mode `--ncu-replay`
/// chose, application range replay by default; [`Prepared::run_in_profiler_range`]);
/// every layer builds its own weights, in the plan's order. Each result says whether its
/// range was opened ([`LayerResult::profiler_range_opened`]).
pub fn verify_in_profiler_ranges(
    plan: &Plan,
    progress: &mut dyn FnMut(Progress),
) -> Vec<LayerResult> {
    verify_with(plan, Counting::InProfilerRange, false, progress)
}

/// The order that lets consecutive layers share parameters: the norm, the gate, the MoE
/// and the MoE decoder layer (the gate's and the experts' weights), the attention, the
/// dense decoder layer (its attention's) and the MLP (the dense layer's `mlp`). Indexes
/// into the plan's layers; the sort is stable.
pub fn sharing_order(plan: &Plan) -> Vec<usize> {
    let rank = |p: &Pairing| match p.module(&plan.config) {
        Ok(ModuleKind::RmsNorm) => 0,
        Ok(ModuleKind::MoEGate) => 1,
        Ok(ModuleKind::MoE) => 2,
        Ok(kind @ ModuleKind::DecoderLayer(_)) if kind.has_experts(&plan.config) => 3,
        Ok(ModuleKind::Attention) => 4,
        Ok(ModuleKind::DecoderLayer(_)) => 5,
        Ok(ModuleKind::Mlp) => 6,
        _ => 7,
    };
    let mut order: Vec<usize> = (0..plan.layers.len()).collect();
    order.sort_by_key(|&i| rank(&plan.layers[i]));
    order
}

fn verify_with(
    plan: &Plan,
    run: Counting,
    share: bool,
    progress: &mut dyn FnMut(Progress),
) -> Vec<LayerResult> {
    if let Some((op, factor)) = plan.hooks.scaled_matmul {
        let unscaled = Plan {
            hooks: TestHooks {
                scaled_matmul: None,
                ..plan.hooks.clone()
            },
            ..plan.clone()
        };
        return modelmeter::conventions::scratch::with_scaled_matmul(op, factor, || {
            verify_with(&unscaled, run, share, progress)
        });
    }
    let total = plan.layers.len();
    let order = if share {
        sharing_order(plan)
    } else {
        (0..total).collect()
    };
    let cache = share.then(|| Rc::new(WeightCache::new()));
    let mut results: Vec<Option<LayerResult>> = vec![None; total];
    for (step, &at) in order.iter().enumerate() {
        let pairing = plan.layers[at];
        let name = pairing.name_for(&plan.config, plan.workload.mla, plan.attention);
        progress(Progress::Started {
            index: step,
            total,
            name,
        });
        let start = Instant::now();
        let mut result = verify_layer(pairing, plan, run, cache.clone());
        if let Some(cache) = &cache {
            let next = order
                .get(step + 1)
                .and_then(|&i| plan.layers[i].module(&plan.config).ok());
            cache.finish_module(|name| next.is_some_and(|k| k.may_draw(&plan.config, name)));
        }
        result.seconds = start.elapsed().as_secs_f64();
        progress(Progress::Finished {
            index: step,
            total,
            result: &result,
        });
        results[at] = Some(result);
    }
    results.into_iter().flatten().collect()
}

/// Verifies one layer. Under [`Counting::InProfilerRange`] the result also says whether
/// the layer's range was opened ([`LayerResult::profiler_range_opened`]).
fn verify_layer(
    pairing: Pairing,
    plan: &Plan,
    counting: Counting,
    weights: Option<Rc<WeightCache>>,
) -> LayerResult {
    let before_range = |mut result: LayerResult| {
        result.profiler_range_opened = counting.range_opened(false);
        result
    };
    let name = pairing
        .name_for(&plan.config, plan.workload.mla, plan.attention)
        .to_string();
    let start = Instant::now();
    let analytic = pairing
        .analytic(&plan.config, &plan.workload, plan.attention)
        .and_then(|layer| layer.cost());
    let analytic_s = start.elapsed().as_secs_f64();
    let analytic = match analytic {
        Ok(cost) => cost,
        Err(e) => return before_range(error_result(name, format!("analytic model: {e}"))),
    };
    let module = match pairing.module(&plan.config) {
        Ok(module) => module,
        Err(why) => return before_range(error_result(name, why)),
    };
    let setup = Setup {
        device: plan.device,
        seed: plan.seed,
    };
    let run = catch_unwind(AssertUnwindSafe(|| {
        plan.hooks.injected_error(&name)?;
        let prepared = Prepared::with_weights(
            module,
            &plan.config,
            &plan.workload,
            plan.attention,
            &setup,
            weights,
        )?;
        counting.run(prepared)
    }));
    let compared = Instant::now();
    let mut result = match run {
        Ok(Ok(run)) => {
            let mut result = judge(pairing, plan, name, &analytic, &run);
            result.timings.run = run.timings;
            // Judged after the range closed.
            result.profiler_range_opened = counting.range_opened(true);
            result
        }
        Ok(Err(e)) => {
            let opened = counting.range_opened(e.opened_profiler_range());
            let cause = if e.is_out_of_memory() {
                format!("out of memory on {}: {e}", DeviceSpec::of(plan.device))
            } else {
                e.to_string()
            };
            LayerResult {
                profiler_range_opened: opened,
                ..error_result(name, cause)
            }
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // Whether it came before the range or inside it is not known: the range's
            // field stays `None` (the harness does not close a range a panic left).
            error_result(name, format!("the reference module panicked: {message}"))
        }
    };
    result.timings.analytic_s = analytic_s;
    result.timings.compare_s = compared.elapsed().as_secs_f64();
    result
}

/// Compares a layer's run with its analytic cost (costed again under the run's routing
/// for MoE layers).
fn judge(
    pairing: Pairing,
    plan: &Plan,
    name: String,
    analytic: &Cost,
    run: &LayerRun,
) -> LayerResult {
    if run.counts.tf32.matmul != plan.workload.allow_tf32 {
        return error_result(
            name,
            format!(
                "libtorch's TF32 switch was {} during the run, the workload says {}",
                run.counts.tf32.matmul, plan.workload.allow_tf32
            ),
        );
    }
    match routed(pairing, plan, run) {
        Ok(None) => compare_layer(&name, analytic, run, plan),
        Ok(Some((routed, hit))) => {
            let mut result = compare_layer(&name, &routed, run, plan);
            note_routing(&mut result, hit, analytic, &routed);
            result
        }
        Err(e) => error_result(name, format!("analytic model: {e}")),
    }
}

/// Says on the `activation_bytes` row what else the allocator saw: allocations that held
/// no op output (scratch inside kernels, wrapped scalars: not modelled), and the peak.
fn note_transients(rows: &mut [MetricRow], run: &LayerRun, cuda: bool) {
    let a = &run.allocations;
    let transient = a.allocated_bytes.saturating_sub(run.output_allocated_bytes);
    let row = rows
        .iter_mut()
        .find(|r| r.metric == Check::Exact(modelmeter::Metric::ActivationBytes));
    if let Some(row) = row {
        let mut parts = Vec::new();
        if cuda {
            parts.push(
                "analytic: each tensor rounded to its CUDA caching-allocator block".to_string(),
            );
        }
        if transient > 0 {
            parts.push(format!(
                "the allocator also saw {transient} bytes in blocks that held no op output (kernel scratch, wrapped scalars; not modelled)"
            ));
        }
        if !run.allocation_errors.is_empty() {
            row.status = Status::Fail;
            parts.push(format!(
                "allocator reports were lost or inconsistent: {}",
                run.allocation_errors.join("; ")
            ));
        }
        if !parts.is_empty() {
            parts.push(format!("peak {} bytes live", a.peak_live_bytes));
            row.add_note(&parts.join("; "));
        }
    }
}

/// The `peak_activation_bytes` row: the measured high-water mark of live op-output
/// blocks against the analytic liveness peak (CUDA blocks on a GPU), within the
/// tolerance; the note says whether it is exact and what the allocator's own peak was,
/// scratch included.
pub(crate) fn compare_peak(
    hook_name: &str,
    analytic: &Cost,
    run: &LayerRun,
    plan: &Plan,
) -> MetricRow {
    let peak = analytic.peak_on(plan.device.is_cuda()).peak_bytes;
    let check = Check::PeakActivationBytes;
    let peak = peak.saturating_add(
        plan.hooks
            .perturbation(hook_name, check.name())
            .unwrap_or(0),
    );
    let mut row = compare(check, peak, run.output_peak_live_bytes, plan.tolerance);
    if !run.allocation_errors.is_empty() {
        // A lost free would keep a block live in the replay: the measured peak is unsure.
        row.status = Status::Fail;
        row.note = Some(format!(
            "allocator reports were lost or inconsistent, so the measured peak is unsure: {}",
            run.allocation_errors.join("; ")
        ));
        return row;
    }
    let exact = if row.analytic == row.measured {
        "exact".to_string()
    } else {
        format!(
            "not exact: analytic {} bytes, measured {} (the vendor code's release points, docs/memory.md)",
            row.analytic, row.measured
        )
    };
    row.note = Some(match row.note.take() {
        Some(n) => format!("{n}; {exact}"),
        None => format!(
            "{exact}; op outputs only, the allocator's peak with scratch and wrapped scalars was {} bytes (modelled with the ops' temporaries: {})",
            run.allocations.peak_live_bytes,
            analytic.peak_on(plan.device.is_cuda()).allocator_peak_bytes
        ),
    });
    row
}

/// The analytic cost under the routing the run measured (how many experts received
/// tokens), for a layer with routed experts; `None` for the others.
fn routed(
    pairing: Pairing,
    plan: &Plan,
    run: &LayerRun,
) -> modelmeter::Result<Option<(Cost, u64)>> {
    let Some(hit) = run.experts_hit() else {
        return Ok(None);
    };
    let cost = pairing
        .analytic(&plan.config, &run.routed(&plan.workload), plan.attention)?
        .cost()?;
    Ok(Some((cost, hit)))
}

/// Says on the `io_bytes` row that the analytic side used the measured routing, and
/// what the default model (every routing slot a new expert) would have said.
fn note_routing(result: &mut LayerResult, hit: u64, default: &Cost, routed: &Cost) {
    let row = result
        .metrics
        .iter_mut()
        .find(|r| r.metric == Check::Exact(modelmeter::Metric::IoBytes));
    if let Some(row) = row.filter(|_| routed.metrics.io_bytes != default.metrics.io_bytes) {
        let routing = format!(
            "analytic with the measured routing, {hit} experts receiving tokens (each reads its own weights); the default model, min(E, N·k) experts, says {} bytes",
            default.metrics.io_bytes
        );
        debug_assert_eq!(routed.metrics.matmul_flops, default.metrics.matmul_flops);
        row.add_note(&routing);
    }
}

fn error_result(name: String, cause: String) -> LayerResult {
    LayerResult {
        error: Some(cause),
        ..LayerResult::new(name, Status::Error)
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
pub(crate) fn invisible_to_flop_counter_mode(
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

/// Where `io_bytes` is not exact, says on its row which ops differ (bytes per op name,
/// analytic vs measured, largest difference first, at most six): where to look.
fn note_io_by_op(metrics: &mut [MetricRow], analytic: &Cost, run: &LayerRun) {
    let Some(row) = metrics
        .iter_mut()
        .find(|r| r.metric == Check::Exact(modelmeter::Metric::IoBytes))
        .filter(|r| r.analytic != r.measured)
    else {
        return;
    };
    let mut by_op: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for op in analytic.ops() {
        let entry = by_op.entry(op.op.unwrap_or("?").to_string()).or_default();
        entry.0 = entry.0.saturating_add(op.metrics.io_bytes);
    }
    for (op, bytes) in &run.counts.io_bytes_by_op {
        let entry = by_op.entry(op.clone()).or_default();
        entry.1 = entry.1.saturating_add(*bytes);
    }
    let mut differing: Vec<(String, u64, u64)> = by_op
        .into_iter()
        .filter(|(_, (a, m))| a != m)
        .map(|(op, (a, m))| (op, a, m))
        .collect();
    if differing.is_empty() {
        return;
    }
    differing.sort_by_key(|(_, a, m)| std::cmp::Reverse(a.abs_diff(*m)));
    let listed: Vec<String> = differing
        .iter()
        .take(6)
        .map(|(op, a, m)| format!("{op} {a} vs {m}"))
        .collect();
    let text = format!(
        "bytes by op, analytic vs measured: {}{}",
        listed.join(", "),
        if differing.len() > 6 { ", …" } else { "" }
    );
    row.add_note(&text);
}

/// The analytic metrics as the plan's device allocates them: on CUDA the caching
/// allocator hands out whole blocks, so `activation_bytes` is each tensor's block
/// ([`Cost::cuda_activation_bytes`]), compared with the blocks it reports.
pub(crate) fn analytic_on_device(plan: &Plan, analytic: &Cost) -> modelmeter::Metrics {
    analytic.metrics_on(plan.device.is_cuda())
}

fn compare_layer(name: &str, analytic: &Cost, run: &LayerRun, plan: &Plan) -> LayerResult {
    compare_run(name, name, analytic, run, plan)
}

/// Compares one measured run with its analytic cost; the result is called `name`, and
/// test hooks address it as `hook_name` (`--model` names a part by step and path).
pub(crate) fn compare_run(
    name: &str,
    hook_name: &str,
    analytic: &Cost,
    run: &LayerRun,
    plan: &Plan,
) -> LayerResult {
    let tolerance = plan.tolerance;
    let a = perturbed(&plan.hooks, hook_name, analytic_on_device(plan, analytic));
    let c = &run.counts;
    let blind = invisible_to_flop_counter_mode(analytic, a.elementwise_flops, run);
    let total = a
        .total_flops()
        .unwrap_or(u64::MAX)
        .saturating_add(plan.hooks.flops_delta(hook_name));
    let flops = compare_flops(
        total,
        c.flops.flop_counter_mode_flops,
        &blind,
        a.matmul_flops == c.flops.matmul_flops,
        tolerance,
    );
    let mut metrics = vec![flops];
    for exact in EXACT {
        metrics.push(compare(
            Check::Exact(exact.metric),
            exact.metric.get(&a),
            (exact.measured)(run),
            tolerance,
        ));
    }
    metrics.push(compare_peak(hook_name, analytic, run, plan));
    note_transients(&mut metrics, run, plan.device.is_cuda());
    note_io_by_op(&mut metrics, analytic, run);
    if c.ops_without_outputs > 0 {
        // The measured bytes miss ops whose outputs the observer never saw.
        if let Some(row) = metrics
            .iter_mut()
            .find(|r| r.metric == Check::Exact(modelmeter::Metric::IoBytes))
        {
            row.status = Status::Fail;
            row.note = Some(format!(
                "{} counted ops never reported their outputs, so the measured bytes are incomplete",
                c.ops_without_outputs
            ));
        }
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
            unavailable: false,
        });
    }
    let status = worst(&metrics);
    LayerResult {
        metrics,
        ops: c.by_op(),
        unknown_ops: c.unknown_ops.clone(),
        attention_kernels: c.attention_kernels(),
        experts_used: run.experts_hit().map(|n| n as usize),
        tokens_per_expert: run.tokens_per_expert.clone(),
        ..LayerResult::new(name.to_string(), status)
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
        unavailable: false,
    })
}

/// The analytic metrics of `layer` with the plan's test perturbation applied.
pub(crate) fn perturbed(
    hooks: &TestHooks,
    layer: &str,
    mut metrics: modelmeter::Metrics,
) -> modelmeter::Metrics {
    for metric in modelmeter::Metric::ALL {
        if let Some(delta) = hooks.perturbation(layer, metric.name()) {
            let value = metric.get(&metrics);
            metric.set(&mut metrics, value.saturating_add(delta));
        }
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::layers::AttentionImpl;
    use modelmeter::{ModelConfig, Workload};

    #[test]
    fn sharing_weights_changes_no_count_row_or_routing() {
        // Every layer of a small multi-head and a small MLA config, run with the weights
        // handed from module to module (what `verify` does on the CPU) and each building
        // its own: the same rows (analytic, measured, status, notes), op records and
        // tokens per expert.
        let mla = r#"{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96,
            "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_shared_experts": 1, "num_hidden_layers": 2, "first_k_dense_replace": 1,
            "vocab_size": 100, "kv_lora_rank": 16, "q_lora_rank": 24,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}"#;
        let mla = ModelConfig::from_json_str("small", mla).unwrap();
        for config in [crate::plan::small_moe_config(), mla] {
            let workload = fp32_prefill_on_cpu(8);
            let plan = Plan {
                layers: crate::plan::applicable_layers(&config),
                ..Plan::on_cpu(config, workload)
            };
            let shared = verify_with(&plan, Counting::Plain, true, &mut |_| {});
            let own = verify_with(&plan, Counting::Plain, false, &mut |_| {});
            assert_eq!(shared.len(), 7);
            for (a, b) in shared.iter().zip(&own) {
                assert_eq!(a.error, None, "{}", a.name);
                assert_eq!(
                    (&a.name, a.status, &a.metrics, &a.ops, &a.tokens_per_expert),
                    (&b.name, b.status, &b.metrics, &b.ops, &b.tokens_per_expert)
                );
            }
        }
    }

    /// One sequence of `seq_len` tokens in fp32 on the CPU.
    fn fp32_prefill_on_cpu(seq_len: u64) -> Workload {
        Workload::prefill(1, seq_len)
            .unwrap()
            .with_dtype(modelmeter::Dtype::F32)
            .unwrap()
            .on(modelmeter::Platform::Cpu)
    }

    /// A real run of a small dense MLP on the CPU in fp32, with its plan and analytic cost.
    fn small_mlp_run() -> (Plan, Pairing, Cost, LayerRun) {
        let config = ModelConfig::from_json_str(
            "small",
            r#"{"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48,
                "num_hidden_layers": 1, "vocab_size": 100}"#,
        )
        .unwrap();
        let workload = fp32_prefill_on_cpu(4);
        let pairing = Pairing {
            layer: modelmeter::layers::LayerId::Mlp,
        };
        let plan = Plan {
            layers: vec![pairing],
            ..Plan::on_cpu(config, workload)
        };
        let analytic = pairing
            .analytic(&plan.config, &plan.workload, plan.attention)
            .unwrap()
            .cost()
            .unwrap();
        let setup = Setup {
            device: plan.device,
            seed: plan.seed,
        };
        let module = pairing.module(&plan.config).unwrap();
        let run = modelmeter_reference::harness::run_layer(
            module,
            &plan.config,
            &plan.workload,
            plan.attention,
            &setup,
        )
        .unwrap();
        (plan, pairing, analytic, run)
    }

    /// What the measured side cannot vouch for fails the layer, whatever the counts say:
    /// lost allocator reports fail both memory rows, ops the conventions cannot cost add a
    /// failing `uncounted_ops` row, ops whose outputs went unseen fail `io_bytes`, and a TF32
    /// switch other than the workload's makes the layer an error. The untouched run passes.
    #[test]
    fn a_run_the_measured_side_cannot_vouch_for_never_passes() {
        let (plan, pairing, analytic, run) = small_mlp_run();
        let row = |r: &LayerResult, check: Check| {
            r.metrics
                .iter()
                .find(|m| m.metric == check)
                .cloned()
                .unwrap_or_else(|| panic!("no {} row: {:?}", check.name(), r.metrics))
        };
        let judged = |run: &LayerRun| judge(pairing, &plan, "DeepseekV2MLP".into(), &analytic, run);
        let clean = judged(&run);
        assert_eq!(clean.status, Status::Pass, "{:?}", clean.metrics);
        assert!(clean
            .metrics
            .iter()
            .all(|m| m.metric != Check::UncountedOps));

        let (_, _, _, mut lost) = small_mlp_run();
        lost.allocation_errors
            .push("a free of an unknown block".into());
        let r = judged(&lost);
        assert_eq!(r.status, Status::Fail);
        for check in [
            Check::Exact(modelmeter::Metric::ActivationBytes),
            Check::PeakActivationBytes,
        ] {
            let m = row(&r, check);
            assert_eq!(m.status, Status::Fail, "{m:?}");
            assert!(m.note.unwrap().contains("a free of an unknown block"));
        }

        for (op, error) in [
            (Some("aten::foo"), None),
            (None, Some("a record without shapes")),
        ] {
            let (_, _, _, mut incomplete) = small_mlp_run();
            if let Some(op) = op {
                incomplete.counts.unknown_ops.insert(op.into(), 2);
            }
            if let Some(error) = error {
                incomplete.counts.errors.push(error.into());
            }
            let r = judged(&incomplete);
            assert_eq!(r.status, Status::Fail);
            let m = row(&r, Check::UncountedOps);
            assert_eq!((m.status, m.rel_diff), (Status::Fail, None));
            assert_eq!(m.measured, if op.is_some() { 2 } else { 1 });
            assert!(m.note.unwrap().contains(op.or(error).unwrap()));
        }

        let (_, _, _, mut unseen) = small_mlp_run();
        unseen.counts.ops_without_outputs = 1;
        let r = judged(&unseen);
        assert_eq!(r.status, Status::Fail);
        let m = row(&r, Check::Exact(modelmeter::Metric::IoBytes));
        assert_eq!(m.analytic, m.measured, "the totals agree, yet it fails");
        assert_eq!(m.status, Status::Fail);
        assert!(m.note.unwrap().contains("never reported their outputs"));

        let (_, _, _, mut switched) = small_mlp_run();
        switched.counts.tf32.matmul = !plan.workload.allow_tf32;
        let r = judged(&switched);
        assert_eq!(r.status, Status::Error);
        assert!(r.error.unwrap().contains("TF32 switch"));
    }

    #[test]
    fn only_a_run_in_profiler_ranges_says_whether_its_range_opened() {
        for opened in [false, true] {
            assert_eq!(Counting::Plain.range_opened(opened), None);
            assert_eq!(Counting::InProfilerRange.range_opened(opened), Some(opened));
        }
    }

    /// The notes a judged row carries, each from what the run saw: the flops row explained
    /// by the blind elementwise work (no caveat), the peak exact or by how much not, the
    /// allocator's transient bytes only when there are any, and where `io_bytes` differs,
    /// by op; and the result keeps the run's op list.
    #[test]
    fn the_notes_of_a_judged_layer_follow_what_its_run_saw() {
        let (plan, pairing, analytic, run) = small_mlp_run();
        let judged = |run: &LayerRun| judge(pairing, &plan, "DeepseekV2MLP".into(), &analytic, run);
        let note = |r: &LayerResult, check: Check| {
            r.metrics
                .iter()
                .find(|m| m.metric == check)
                .unwrap_or_else(|| panic!("no {} row", check.name()))
                .note
                .clone()
                .unwrap_or_default()
        };
        let activation = Check::Exact(modelmeter::Metric::ActivationBytes);
        let io = Check::Exact(modelmeter::Metric::IoBytes);

        let clean = judged(&run);
        assert_eq!(clean.status, Status::Pass);
        assert_eq!(clean.ops, run.counts.by_op());
        assert!(!clean.ops.is_empty());
        assert!(
            !note(&clean, Check::Flops).contains("within the tolerance, but"),
            "{}",
            note(&clean, Check::Flops)
        );
        assert!(note(&clean, Check::PeakActivationBytes).starts_with("exact; "));
        assert_eq!(note(&clean, io), "");

        // The allocator saw exactly the op outputs: nothing to say on the CPU.
        let (_, _, _, mut none) = small_mlp_run();
        none.allocations.allocated_bytes = none.output_allocated_bytes;
        assert_eq!(note(&judged(&none), activation), "");
        let (_, _, _, mut scratch) = small_mlp_run();
        scratch.allocations.allocated_bytes = scratch.output_allocated_bytes + 100;
        let n = note(&judged(&scratch), activation);
        assert!(
            n.starts_with("the allocator also saw 100 bytes in blocks that held no op output")
                && n.contains("; peak "),
            "{n}"
        );

        // A measured peak 8 bytes above the analytic one.
        let (_, _, _, mut higher) = small_mlp_run();
        higher.output_peak_live_bytes += 8;
        let peak = analytic.peak_on(false).peak_bytes;
        let n = note(&judged(&higher), Check::PeakActivationBytes);
        assert!(
            n.starts_with(&format!(
                "not exact: analytic {peak} bytes, measured {}",
                peak + 8
            )),
            "{n}"
        );

        // 10 bytes more measured on one op: its row names that op alone.
        let (_, _, _, mut more) = small_mlp_run();
        more.counts.io_bytes += 10;
        let (op, bytes) = more
            .counts
            .io_bytes_by_op
            .iter_mut()
            .max_by_key(|(_, bytes)| **bytes)
            .expect("an op moved bytes");
        *bytes += 10;
        let (op, measured) = (op.clone(), *bytes);
        let n = note(&judged(&more), io);
        assert!(
            n.ends_with(&format!(
                "; bytes by op, analytic vs measured: {op} {} vs {measured}",
                measured - 10
            )),
            "{n}"
        );
    }

    /// What the result keeps of the run besides its rows: the attention kernels it ran,
    /// the unknown ops, and the routing (experts hit, tokens per expert).
    #[test]
    fn a_compared_run_keeps_its_kernels_unknown_ops_and_routing() {
        let config = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 16).unwrap();
        let plan = Plan::on_cpu(config.clone(), w.clone());
        let cost = modelmeter::layers::LayerId::Attention
            .build(&config, &w, AttentionImpl::Sdpa)
            .unwrap()
            .cost()
            .unwrap();
        let kernel = "aten::_scaled_dot_product_flash_attention_for_cpu";
        let mut run = run_with_kernel(kernel);
        run.counts.unknown_ops.insert("aten::foo".into(), 3);
        run.tokens_per_expert = Some(vec![0, 3, 1]);
        let r = compare_run("L", "L", &cost, &run, &plan);
        assert_eq!(r.attention_kernels, [kernel]);
        assert_eq!(r.unknown_ops.get("aten::foo"), Some(&3));
        assert_eq!(r.experts_used, Some(2));
        assert_eq!(r.tokens_per_expert, Some(vec![0, 3, 1]));
    }

    /// A MoE layer's bytes are costed under the routing its run measured (each expert
    /// that received tokens reads its own weights), and the `io_bytes` row says so, with
    /// what the default model (every routing slot a new expert) would have said.
    #[test]
    fn a_moe_layer_is_judged_under_the_routing_it_measured() {
        let config = crate::plan::small_moe_config();
        let plan = Plan {
            layers: vec![Pairing {
                layer: modelmeter::layers::LayerId::MoE,
            }],
            ..Plan::on_cpu(config, fp32_prefill_on_cpu(4))
        };
        let results = verify_with(&plan, Counting::Plain, false, &mut |_| {});
        let r = &results[0];
        assert_eq!(r.status, Status::Pass, "{:?}", r.metrics);
        // 4 tokens × 2 slots over 8 experts: seed 0 leaves some expert without tokens.
        let hit = r.experts_used.expect("routed");
        assert!(hit < 8, "{hit}");
        let io = r
            .metrics
            .iter()
            .find(|m| m.metric == Check::Exact(modelmeter::Metric::IoBytes))
            .unwrap();
        assert_eq!(io.analytic, io.measured);
        let note = io.note.clone().unwrap_or_default();
        assert!(
            note.starts_with(&format!(
                "analytic with the measured routing, {hit} experts receiving tokens"
            )) && note.contains("min(E, N·k) experts, says "),
            "{note}"
        );
        for other in r.metrics.iter().filter(|m| m.metric != io.metric) {
            let n = other.note.as_deref().unwrap_or_default();
            assert!(!n.contains("measured routing"), "{n}");
        }
    }

    #[test]
    fn layers_that_share_weights_run_next_to_each_other() {
        let config = ModelConfig::deepseek_ocr();
        let plan = Plan {
            layers: crate::pairing::REGISTRY.to_vec(),
            config,
            workload: Workload::prefill(1, 8).unwrap(),
            attention: AttentionImpl::Sdpa,
            device: tch::Device::Cpu,
            tolerance: 0.05,
            seed: 0,
            hooks: Default::default(),
        };
        let names: Vec<&str> = sharing_order(&plan)
            .into_iter()
            .map(|i| plan.layers[i].name(AttentionImpl::Sdpa))
            .collect();
        assert_eq!(
            names,
            [
                "DeepseekV2RMSNorm",
                "MoEGate",
                "DeepseekV2MoE",
                "DeepseekV2DecoderLayer_moe",
                "LlamaFlashAttention2",
                "DeepseekV2DecoderLayer_dense",
                "DeepseekV2MLP"
            ]
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
            kv_cache_bytes: 0,
            tokens_per_expert: None,
            allocations: Default::default(),
            output_allocated_bytes: 0,
            output_peak_live_bytes: 0,
            allocation_errors: Vec::new(),
            timings: Default::default(),
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
}

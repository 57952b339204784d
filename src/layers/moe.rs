//! `DeepseekV2MoE`, inference path (`moe_infer`).
//!
//! Vendor code, after `topk_idx, topk_weight = self.gate(x)`:
//! ```python
//! cnts = topk_ids.new_zeros((N, E)); cnts.scatter_(1, topk_ids, 1)
//! tokens_per_expert = cnts.sum(dim=0)
//! idxs = topk_ids.view(-1).argsort()
//! sorted_tokens = x[idxs // topk_ids.shape[1]]
//! for each expert i with tokens: outputs.append(expert(sorted_tokens[start:end]))
//! outs = torch.cat(outputs, dim=0)
//! new_x = torch.empty_like(outs); new_x[idxs] = outs
//! final_out = new_x.view(N, k, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1))
//!                  .sum(dim=1).type(new_x.dtype)
//! y = final_out.view(orig_shape) + self.shared_experts(identity)
//! ```
//! The routed experts' GEMM rows add up to exactly N·k whatever the routing, so the
//! experts cost the same as one MLP of width m over N·k rows: 6·N·k·h·m matmul FLOPs.
//! Matmul total = 2·N·h·E + 6·N·k·h·m + 6·N·h·(m·n_shared).

use crate::checked::product;
use crate::config::{ModelConfig, MoeConfig};
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layers::mlp::DeepseekV2MLP;
use crate::layers::moe_gate::MoEGate;
use crate::layers::vendor_ops::{arg, bytes_of, t};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::{Platform, Workload};

/// The cost-tree node of the routed experts (all of them, under the MoE): the work whose
/// GEMMs are as many rows as tokens each expert received.
pub const ROUTED_EXPERTS_ROLE: &str = "experts";

/// `DeepseekV2MoE` over an input of shape `[B, S_q, h]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2MoE {
    input: TensorMeta,
    moe: MoeConfig,
    allow_tf32: bool,
    expert_rows: Option<Vec<u64>>,
    platform: Platform,
}

impl DeepseekV2MoE {
    /// The MoE block of a decoder layer; errors when the config has no routed experts.
    pub fn new(config: &ModelConfig, workload: &Workload) -> Result<DeepseekV2MoE> {
        Ok(DeepseekV2MoE {
            input: t(
                &[workload.batch, workload.query_len(), config.hidden_size],
                workload.dtype,
            ),
            moe: config.moe()?.clone(),
            allow_tf32: workload.allow_tf32,
            expert_rows: workload.expert_rows.clone(),
            platform: workload.platform,
        })
    }
}

impl DeepseekV2MoE {
    /// (experts, rows each) of the routed experts that receive tokens, in the order they
    /// run: the measured rows when the workload has them (each > 0, at most E experts, N·k
    /// rows in all), in expert index order as the vendor loop runs them, neighbours with
    /// equal rows as one group; else the N·k rows spread as evenly as integers allow over
    /// min(E, N·k) experts, most rows first.
    fn expert_loads(&self, rows: u64) -> Result<Vec<(u64, u64)>> {
        let experts = self.moe.n_routed_experts;
        let Some(measured) = &self.expert_rows else {
            let hit = experts.min(rows);
            if hit == 0 {
                return Ok(Vec::new());
            }
            let (base, extra) = (rows / hit, rows % hit);
            return Ok([(extra, base + 1), (hit - extra, base)]
                .into_iter()
                .filter(|(calls, _)| *calls > 0)
                .collect());
        };
        // Rows whose sum overflows cannot add up to N·k: invalid like any other wrong total.
        let total = measured.iter().try_fold(0u64, |acc, r| acc.checked_add(*r));
        if measured.is_empty()
            || measured.len() as u64 > experts
            || measured.contains(&0)
            || total != Some(rows)
        {
            return Err(Error::invalid(
                "expert_rows",
                format!("{measured:?}"),
                &format!(
                    "1 to {experts} experts with at least one row each, N·k = {rows} rows in all"
                ),
            ));
        }
        let mut loads: Vec<(u64, u64)> = Vec::new();
        for &r in measured {
            match loads.last_mut() {
                Some((calls, last)) if *last == r => *calls += 1,
                _ => loads.push((1, r)),
            }
        }
        Ok(loads)
    }

    /// The routed experts over the `rows` = N·k sorted rows: each expert that received
    /// tokens runs the MLP over its own slice and reads its own weights. FLOPs depend only
    /// on the N·k rows; the weight bytes read on how many experts run, and the CUDA
    /// blocks on each expert's rows ([`Workload::expert_rows`]; by default the rows
    /// spread as evenly as integers allow). Neighbouring experts with the same rows are one
    /// node, repeated. The experts run in index order, as the vendor's loop runs them,
    /// each output kept for the `cat`: the peak is an expert's intermediates on top of the
    /// outputs of the experts before it, so the order matters where those intermediates
    /// (rows·m) outweigh the combine that follows (N·k·h), as when m > h.
    fn routed_experts(&self, sorted: &TensorMeta, rows: u64) -> Result<Cost> {
        let experts = self.moe.n_routed_experts;
        let loads = self.expert_loads(rows)?;
        let hit = loads.iter().map(|(calls, _)| calls).sum::<u64>();
        let hidden = *sorted.shape.last().unwrap_or(&1);
        let m = self.moe.moe_intermediate_size;
        let mut b = CostBuilder::new(ROUTED_EXPERTS_ROLE, self.allow_tf32);
        for (calls, rows) in loads {
            let slice = t(&[rows, hidden], sorted.dtype);
            let mlp = DeepseekV2MLP::over(slice, m, self.allow_tf32);
            b.child(
                mlp.cost_as(&format!("{calls} × expert({rows} rows)"))?
                    .repeated(calls)?,
            )?;
        }
        // The experts that received no tokens still hold their parameters.
        let idle = product("idle expert parameters", &[experts - hit, 3, hidden, m])?;
        b.weights(bytes_of("idle expert weights", idle, sorted.dtype)?)?;
        Ok(b.finish())
    }
}

impl Layer for DeepseekV2MoE {
    fn name(&self) -> String {
        "DeepseekV2MoE".into()
    }

    fn cost(&self) -> Result<Cost> {
        let x = &self.input;
        let dtype = x.dtype;
        let hidden = *x.shape.last().unwrap_or(&1);
        let tokens = product("MoE tokens", &x.shape[..x.shape.len().saturating_sub(1)])?;
        let (experts, k, m) = (
            self.moe.n_routed_experts,
            self.moe.num_experts_per_tok,
            self.moe.moe_intermediate_size,
        );
        let routed_rows = product("routed rows (N·k)", &[tokens, k])?;
        let mut b = CostBuilder::new(self.name(), self.allow_tf32);

        // topk_idx, topk_weight: locals until the MoE returns.
        let gate = MoEGate::over(x.clone(), self.moe.clone(), self.allow_tf32).cost()?;
        let _routing = b.call_first(gate, x)?;

        // `moe_infer`: its locals (cnts … new_x) live until it returns.
        // Dispatch: count tokens per expert, sort the (token, slot) pairs by expert, gather.
        let ids = t(&[tokens, k], Dtype::I64);
        let counts = b.copy(
            "cnts = new_zeros(N, E)",
            "aten::new_zeros",
            [&ids],
            t(&[tokens, experts], Dtype::I64),
        )?;
        b.copy(
            "cnts.scatter_(1, topk_ids, 1)",
            "aten::scatter_",
            [&counts, &ids],
            counts.clone(),
        )?;
        let [per_expert] = b.op(
            "tokens_per_expert = cnts.sum(0)",
            "aten::sum",
            &[
                arg(&counts),
                ArgRef::IntList(&[0]),
                ArgRef::Bool(false),
                ArgRef::None,
            ],
            [t(&[experts], Dtype::I64)],
        )?;
        let flat_ids = t(&[routed_rows], Dtype::I64);
        let idxs = b.copy(
            "idxs = argsort",
            "aten::argsort",
            [&flat_ids],
            flat_ids.clone(),
        )?;
        let token_of = b.elementwise("idxs // k", "aten::floor_divide", [&idxs], Dtype::I64)?;
        let flat_x = t(&[tokens, hidden], dtype);
        let sorted = b.copy(
            "sorted_tokens = x[idxs // k]",
            "aten::index",
            [&flat_x, &token_of],
            t(&[routed_rows, hidden], dtype),
        )?;
        b.release(&[&token_of])?;
        // `tokens_per_expert.cpu()`: on a GPU a copy to the host (read on the device,
        // written in host memory); on the CPU `to` hands back its input.
        if self.platform == Platform::Cuda {
            b.op_with_host_outputs(
                "tokens_per_expert.cpu()",
                "aten::to",
                &[arg(&per_expert)],
                Vec::new(),
                std::slice::from_ref(&per_expert),
            )?;
            // `tokens_per_expert = ….cpu().numpy()` drops the device tensor.
            b.release(&[&per_expert])?;
        }

        // Experts that received tokens, one after another over contiguous slices:
        // together exactly N·k rows of a width-m MLP. Their outputs stay in `outputs`.
        let [expert_outputs] = b.call(self.routed_experts(&sorted, routed_rows)?, [&sorted])?;

        // Combine: cat, unsort, weight in fp32, sum over k, back to the model dtype.
        let outs = b.copy(
            "outs = cat(outputs)",
            "aten::cat",
            [&sorted],
            sorted.clone(),
        )?;
        let new_x = b.copy(
            "new_x = empty_like(outs)",
            "aten::empty_like",
            [&outs],
            outs.clone(),
        )?;
        b.copy(
            "new_x[idxs] = outs",
            "aten::index_put_",
            [&new_x, &idxs, &outs],
            new_x.clone(),
        )?;
        let viewed = new_x.viewed_as(&[tokens, k, hidden]);
        let as_f32 = b.cast("type(topk_weight.dtype)", &viewed, Dtype::F32)?;
        let weights = t(&[tokens, k, 1], Dtype::F32);
        let weighted = b.elementwise(
            "mul_(topk_weight)",
            "aten::mul_",
            [&as_f32, &weights],
            Dtype::F32,
        )?;
        let [combined] = b.op(
            "sum(dim=1)",
            "aten::sum",
            &[
                arg(&weighted),
                ArgRef::IntList(&[1]),
                ArgRef::Bool(false),
                ArgRef::None,
            ],
            [t(&[tokens, hidden], Dtype::F32)],
        )?;
        // Temporaries of the one expression: the fp32 copy (when it is one), the sum
        // (when the cast copies it).
        b.release_unless_same(&as_f32, &new_x)?;
        let y = b.cast("type(new_x.dtype)", &combined, dtype)?;
        b.release_unless_same(&combined, &y)?;
        // `.view(*orig_shape)`
        let mut y = y.viewed_as(&x.shape);
        // `moe_infer` returns: its locals are freed.
        b.release(&[&counts, &idxs, &sorted, &expert_outputs, &outs, &new_x])?;
        if self.platform != Platform::Cuda {
            b.release(&[&per_expert])?;
        }

        if self.moe.n_shared_experts > 0 {
            let width = product("shared expert width", &[m, self.moe.n_shared_experts])?;
            let [shared] = b.call(
                DeepseekV2MLP::over(x.clone(), width, self.allow_tf32).cost_as("shared_experts")?,
                [x],
            )?;
            let sum = b.elementwise(
                "y + shared_experts(identity)",
                "aten::add",
                [&y, &shared],
                dtype,
            )?;
            b.release(&[&y, &shared])?;
            y = sum;
        }
        b.returns(&[&y]);
        Ok(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn moe(workload: &Workload) -> Metrics {
        DeepseekV2MoE::new(&ModelConfig::deepseek_ocr(), workload)
            .unwrap()
            .metrics()
            .unwrap()
    }

    #[test]
    fn moe_matches_the_reference_measurement() {
        let m = moe(&Workload::prefill(1, 512).unwrap());
        assert_eq!(
            m.matmul_flops, 28_269_608_960,
            "FlopCounterMode, docs/deepseek-ocr.md"
        );
        assert_eq!(
            m.weight_bytes,
            227_164_160 * 2,
            "227,164,160 bf16 parameters"
        );
        let (n, h, e, k, mi, shared) = (512u64, 1280u64, 64u64, 6u64, 896u64, 1792u64);
        let gate = 6 * n * e + n * k;
        let routed = 5 * n * k * mi;
        let combine = 2 * n * k * h;
        let shared_mlp = 5 * n * shared;
        assert_eq!(
            m.elementwise_flops,
            gate + routed + combine + shared_mlp + n * h
        );
        // The gate's fp32 GEMM is the only CUDA-core matmul.
        assert_eq!(m.tensor_core_flops, m.matmul_flops - 2 * n * h * e);
    }

    /// The one difference between a GPU and a CPU call, by hand: on a GPU
    /// `tokens_per_expert.cpu()` copies the E int64 counts to the host (read on the
    /// device, written in host memory: no device allocation); on the CPU `to` hands its
    /// input back. The CUDA bytes fixture has no MoE rows and the libtorch tests run on
    /// the CPU, so without this nothing noticed the copy going missing.
    #[test]
    fn on_a_gpu_the_counts_go_to_the_host_and_nothing_else_changes() {
        for w in [
            Workload::prefill(1, 512).unwrap(),
            Workload::decode(3, 40).unwrap(),
        ] {
            let cpu = moe(&w.clone().on(Platform::Cpu));
            let cuda = moe(&w.on(Platform::Cuda));
            let experts = 64;
            assert_eq!(
                cuda.io_bytes - cpu.io_bytes,
                2 * experts * 8,
                "read + written"
            );
            assert_eq!(
                Metrics {
                    io_bytes: cpu.io_bytes,
                    ..cuda
                },
                cpu,
                "FLOPs and allocations are the platform's own"
            );
        }
    }

    #[test]
    fn no_shared_experts_means_no_shared_mlp() {
        let mut c = ModelConfig::deepseek_ocr();
        c.moe.as_mut().unwrap().n_shared_experts = 0;
        let cost = DeepseekV2MoE::new(&c, &Workload::prefill(1, 8).unwrap())
            .unwrap()
            .cost()
            .unwrap();
        assert!(cost.child("shared_experts").is_none());
        assert_eq!(
            cost.metrics.matmul_flops,
            2 * 8 * 1280 * 64 + 6 * 8 * 6 * 1280 * 896
        );
    }

    /// The MoE layer of DeepSeek-OCR (E = 64, k = 6, h = 1280, m = 896) over a prefill of
    /// 16 tokens: N·k = 96 routed rows, with `rows` the measured routing if any.
    fn routed(rows: Option<Vec<u64>>) -> Result<Metrics> {
        let mut w = Workload::prefill(1, 16).unwrap();
        if let Some(rows) = rows {
            w = w.with_expert_rows(rows);
        }
        DeepseekV2MoE::new(&ModelConfig::deepseek_ocr(), &w)?.metrics()
    }

    #[test]
    fn measured_routing_costs_the_flops_of_the_even_spread() {
        // FLOPs depend only on the N·k = 96 rows, not on which experts get them: the
        // even spread (64 experts, 32 with 2 rows and 32 with 1) and skewed routings.
        let even = routed(None).unwrap();
        let (n, h, e, k, m, shared) = (16u64, 1280u64, 64u64, 6u64, 896u64, 1792u64);
        let matmul = 2 * n * h * e + 6 * n * k * h * m + 6 * n * h * shared;
        assert_eq!(even.matmul_flops, matmul);
        let one_expert_params = 3 * h * m;
        for rows in [
            vec![96],
            vec![50, 30, 10, 5, 1],
            vec![2; 48],
            std::iter::repeat(1)
                .take(63)
                .chain([33])
                .collect::<Vec<u64>>(),
        ] {
            let hit = rows.len() as u64;
            let measured = routed(Some(rows.clone())).unwrap();
            assert_eq!(measured.matmul_flops, matmul, "{rows:?}");
            assert_eq!(
                measured.elementwise_flops, even.elementwise_flops,
                "{rows:?}"
            );
            assert_eq!(
                measured.tensor_core_flops, even.tensor_core_flops,
                "{rows:?}"
            );
            assert_eq!(measured.cuda_core_flops, even.cuda_core_flops, "{rows:?}");
            // Idle experts still hold their parameters: all 64 experts' weights count.
            assert_eq!(
                measured.weight_bytes, even.weight_bytes,
                "{rows:?}: idle experts' weights count"
            );
            assert_eq!(measured.weight_bytes, 227_164_160 * 2, "{rows:?}");
            // Only the experts that run read their weights (3·h·m bf16 each); the rows
            // they read and write add up to N·k either way.
            assert_eq!(
                even.io_bytes - measured.io_bytes,
                (e - hit) * one_expert_params * 2,
                "{rows:?}"
            );
        }
    }

    /// The experts run in index order, each output kept for the `cat`, so where an
    /// expert's intermediates (3·rows·m live at its peak) outweigh the outputs, the peak
    /// depends on how many rows ran before the busiest expert. A small MoE (h = 16,
    /// m = 64, E = 4, k = 2, no shared experts), B = 2, S = 1, fp32 on the CPU: with the
    /// busiest expert last ([1, 1, 2]) the two earlier outputs (2 rows · h · 4 bytes =
    /// 128 bytes) sit under its peak, with it first ([2, 1, 1]) nothing does. libtorch
    /// measured 2,096 bytes for the first routing (seed 1 routed [1, 1, 0, 2]).
    #[test]
    fn the_experts_peak_follows_their_index_order() {
        let config = ModelConfig::from_json_str(
            "small MoE",
            r#"{"hidden_size": 16, "num_attention_heads": 1, "head_dim": 2,
                "intermediate_size": 32, "moe_intermediate_size": 64,
                "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": null,
                "num_hidden_layers": 2, "first_k_dense_replace": 1, "vocab_size": 100}"#,
        )
        .unwrap();
        // B sequences of one token, routed as `rows` measured, or by the default spread.
        let moe = |batch, rows: Option<Vec<u64>>| {
            let w = Workload::prefill(batch, 1)
                .unwrap()
                .with_dtype(Dtype::F32)
                .unwrap()
                .on(Platform::Cpu);
            let w = match rows {
                Some(rows) => w.with_expert_rows(rows),
                None => w,
            };
            DeepseekV2MoE::new(&config, &w).unwrap()
        };
        let peak = |batch, rows| moe(batch, rows).cost().unwrap().peak.peak_bytes;
        let (last, first) = (peak(2, Some(vec![1, 1, 2])), peak(2, Some(vec![2, 1, 1])));
        assert_eq!(last, 2_096);
        assert_eq!(last - first, 2 * 16 * 4);
        // Without measured rows, N·k = 6 rows over 4 experts spread as [2, 2, 1, 1]: the
        // busiest first (the documented convention), which is the smaller peak here.
        assert_eq!(moe(3, None).expert_loads(6).unwrap(), [(2, 2), (2, 1)]);
        // Rows that divide evenly make one group (no "0 ×" group), fewer rows than
        // experts one group of single rows.
        assert_eq!(moe(4, None).expert_loads(8).unwrap(), [(4, 2)]);
        assert_eq!(moe(1, None).expert_loads(2).unwrap(), [(2, 1)]);
        // Measured rows: neighbours with equal rows run as one group, in expert order.
        let measured = moe(3, Some(vec![2, 2, 1, 1])).expert_loads(6).unwrap();
        assert_eq!(measured, [(2, 2), (2, 1)]);
        let measured = moe(3, Some(vec![1, 2, 2, 1])).expert_loads(6).unwrap();
        assert_eq!(measured, [(1, 1), (2, 2), (1, 1)]);
        let default = peak(3, None);
        assert_eq!(default, peak(3, Some(vec![2, 2, 1, 1])));
        assert!(
            default < peak(3, Some(vec![1, 1, 2, 2])),
            "the order shows in the peak"
        );
    }

    #[test]
    fn invalid_expert_rows_are_errors_naming_them() {
        let too_many: Vec<u64> = std::iter::repeat(1).take(64).chain([32]).collect();
        assert_eq!(too_many.iter().sum::<u64>(), 96, "only the count is wrong");
        for rows in [
            vec![],
            vec![96, 0],
            vec![50, 0, 46],
            too_many,
            vec![50, 45],
            vec![50, 47],
            // A sum that overflows is a wrong total too, not wrapped into a valid one.
            vec![u64::MAX, 97],
        ] {
            let e = routed(Some(rows.clone())).unwrap_err().to_string();
            assert!(
                e.starts_with("expert_rows = ")
                    && e.contains("is invalid: expected 1 to 64 experts")
                    && e.contains("N·k = 96 rows in all"),
                "{rows:?}: {e}"
            );
        }
    }
}

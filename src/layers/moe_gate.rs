//! `MoEGate`: top-k routing computed in fp32, for every `scoring_func` and `topk_method`
//! of the DeepSeek-V2/V3 family ([`crate::routing`]).
//!
//! Vendor code for DeepSeek-OCR's greedy softmax routing (inference path; the auxiliary
//! loss exists in training only):
//! ```python
//! hidden_states = hidden_states.view(-1, h)
//! logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
//! scores = logits.softmax(dim=-1, dtype=torch.float32)
//! topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
//! if self.top_k > 1 and self.norm_topk_prob:
//!     denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
//!     topk_weight = topk_weight / denominator * self.routed_scaling_factor
//! else:
//!     topk_weight = topk_weight * self.routed_scaling_factor
//! ```
//! Matmul 2·N·h·E in fp32, so CUDA-core work even in a bf16 model (TF32 off):
//! `tensor_core_flops` = 0. Elementwise 6·N·E + N·k (softmax 5, top-k 1, scaling 1).
//!
//! The other methods (DeepSeek-VL2's `modeling_deepseek.py` `MoEGate`, which DeepSeek-V3's
//! copies for `noaux_tc`) replace the `topk` line; with G groups of E/G experts:
//! ```python
//! scores = logits.sigmoid()                                   # scoring_func sigmoid
//! # group_limited_greedy:
//! group_scores = scores.view(N, G, -1).max(dim=-1).values
//! # noaux_tc:
//! scores_for_choice = scores.view(N, -1) + self.e_score_correction_bias.unsqueeze(0)
//! group_scores = scores_for_choice.view(N, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
//! # both:
//! group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
//! group_mask = torch.zeros_like(group_scores); group_mask.scatter_(1, group_idx, 1)
//! score_mask = group_mask.unsqueeze(-1).expand(N, G, E // G).reshape(N, -1)
//! tmp_scores = scores(_for_choice).masked_fill(~score_mask.bool(), 0.0)
//! topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
//! topk_weight = scores.gather(1, topk_idx)                    # noaux_tc only
//! ```
//! Elementwise per token: sigmoid 4·E instead of softmax 5·E; group-limited greedy adds
//! E (max) + G (group top-k); noaux_tc adds E (bias) + E (top-2) + 2·G (sum) + G (group
//! top-k). Masks, scatters and gathers move data only.

use crate::checked::product;
use crate::config::{ModelConfig, MoeConfig};
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::layers::vendor_ops::{arg, bytes_of, t, with_last};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::routing::{ScoringFunc, TopkMethod};
use crate::workload::Workload;

/// `MoEGate` over an input of shape `[B, S_q, h]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoEGate {
    input: TensorMeta,
    moe: MoeConfig,
    allow_tf32: bool,
}

impl MoEGate {
    /// The gate of an MoE layer; errors when the config has no routed experts.
    pub fn new(config: &ModelConfig, workload: &Workload) -> Result<MoEGate> {
        Ok(MoEGate::over(
            t(
                &[workload.batch, workload.query_len(), config.hidden_size],
                workload.dtype,
            ),
            config.moe()?.clone(),
            workload.allow_tf32,
        ))
    }

    /// A gate over `input` (`[.., h]`) with `moe`'s routing settings.
    pub fn over(input: TensorMeta, moe: MoeConfig, allow_tf32: bool) -> MoEGate {
        MoEGate {
            input,
            moe,
            allow_tf32,
        }
    }
}

impl Layer for MoEGate {
    fn name(&self) -> String {
        "MoEGate".into()
    }

    fn cost(&self) -> Result<Cost> {
        let x = &self.input;
        let hidden = *x.shape.last().unwrap_or(&1);
        let tokens = product("gate tokens", &x.shape[..x.shape.len().saturating_sub(1)])?;
        let experts = self.moe.n_routed_experts;
        let k = self.moe.num_experts_per_tok;
        let mut b = CostBuilder::new(self.name(), self.allow_tf32);
        let flat = t(&[tokens, hidden], x.dtype);
        let x32 = b.cast("hidden_states.type(float32)", &flat, Dtype::F32)?;
        let w32 = b.cast(
            "weight.type(float32)",
            &t(&[experts, hidden], x.dtype),
            Dtype::F32,
        )?;
        let logits = b.linear("logits (F.linear)", &x32, experts, false)?;
        // The two fp32 casts are temporaries of the `F.linear` call.
        b.release(&[&x32, &w32])?;
        let scores = match self.moe.routing.scoring_func {
            ScoringFunc::Softmax => {
                let [scores] = b.op(
                    "softmax",
                    "aten::softmax",
                    &[arg(&logits), ArgRef::Int(-1), ArgRef::Other("ScalarType")],
                    [t(&logits.shape, Dtype::F32)],
                )?;
                scores
            }
            ScoringFunc::Sigmoid => {
                b.elementwise("sigmoid", "aten::sigmoid", [&logits], Dtype::F32)?
            }
        };
        let weights = with_last(&scores, k);
        let routing = self.moe.routing;
        // The vendor forward is one function: every local below (group scores, masks,
        // the masked scores) lives until it returns; temporaries go as they are consumed.
        let choice = match routing.topk_method {
            TopkMethod::Greedy => scores.clone(),
            TopkMethod::GroupLimitedGreedy | TopkMethod::NoauxTc => {
                let (groups, per) = (routing.n_group, routing.experts_per_group(experts));
                let group_shape = [tokens, groups];
                let (choice, group_scores) = if routing.topk_method == TopkMethod::NoauxTc {
                    let bias = t(&[1, experts], x.dtype);
                    let choice = b.elementwise(
                        "scores + e_score_correction_bias",
                        "aten::add",
                        [&scores, &bias],
                        Dtype::F32,
                    )?;
                    let grouped = choice.viewed_as(&[tokens, groups, per]);
                    let top2 = t(&[tokens, groups, 2], Dtype::F32);
                    // `.topk(2, dim=-1)[0].sum(dim=-1)`: the indices go at `[0]`, the
                    // values after the sum.
                    let [top2, top2_ids] = topk(&mut b, "group top-2", &grouped, 2, &top2)?;
                    b.release(&[&top2_ids])?;
                    let [group_scores] = b.op(
                        "group_scores = top-2 sum(-1)",
                        "aten::sum",
                        &[
                            arg(&top2),
                            ArgRef::IntList(&[-1]),
                            ArgRef::Bool(false),
                            ArgRef::None,
                        ],
                        [t(&group_shape, Dtype::F32)],
                    )?;
                    b.release(&[&top2])?;
                    (choice, group_scores)
                } else {
                    // `.max(dim=-1).values`: the indices go with the tuple.
                    let grouped = scores.viewed_as(&[tokens, groups, per]);
                    let [max, max_ids] = b.op(
                        "group_scores = max(-1)",
                        "aten::max",
                        &[arg(&grouped), ArgRef::Int(-1), ArgRef::Bool(false)],
                        [t(&group_shape, Dtype::F32), t(&group_shape, Dtype::I64)],
                    )?;
                    b.release(&[&max_ids])?;
                    (scores.clone(), max)
                };
                // `topk(group_scores, topk_group)[1]`: the values go at once.
                let kept = t(&[tokens, routing.topk_group], Dtype::F32);
                let [kept, group_idx] = topk(
                    &mut b,
                    "group_idx = topk(topk_group)",
                    &group_scores,
                    routing.topk_group,
                    &kept,
                )?;
                b.release(&[&kept])?;
                let mask = b.copy(
                    "group_mask = zeros_like",
                    "aten::zeros_like",
                    [&group_scores],
                    t(&group_shape, Dtype::F32),
                )?;
                b.copy(
                    "group_mask.scatter_(1, group_idx, 1)",
                    "aten::scatter_",
                    [&mask, &group_idx],
                    mask.clone(),
                )?;
                // `[N, G, E/G]` expanded with stride 0 reshapes to `[N, E]` as a view only
                // when G or E/G is 1; else `reshape` copies it, reading the expanded size.
                let expanded = mask.viewed_as(&[tokens, experts]);
                let score_mask = if groups > 1 && per > 1 {
                    b.copy(
                        "score_mask = expand(…).reshape (copy)",
                        "aten::clone",
                        [&expanded],
                        t(&expanded.shape, Dtype::F32),
                    )?
                } else {
                    expanded
                };
                // `~score_mask.bool()`: both temporaries of the `masked_fill` call.
                let as_bool = b.cast("score_mask.bool()", &score_mask, Dtype::Bool)?;
                let blocked =
                    b.elementwise("~score_mask", "aten::bitwise_not", [&as_bool], Dtype::Bool)?;
                b.release(&[&as_bool])?;
                let masked = b.copy(
                    "masked_fill(~score_mask, 0.0)",
                    "aten::masked_fill",
                    [&choice, &blocked],
                    t(&choice.shape, Dtype::F32),
                )?;
                b.release(&[&blocked])?;
                masked
            }
        };
        // noaux_tc: `_, topk_idx = torch.topk(…)`: `_` keeps the values until return.
        let [mut top_weights, top_ids] = topk(&mut b, "topk", &choice, k, &weights)?;
        if routing.topk_method == TopkMethod::NoauxTc {
            top_weights = b.copy(
                "topk_weight = scores.gather(1, topk_idx)",
                "aten::gather",
                [&scores, &top_ids],
                t(&weights.shape, Dtype::F32),
            )?;
        }
        let scaled = if k > 1 && self.moe.norm_topk_prob {
            let [sum] = b.op(
                "topk_weight.sum(-1)",
                "aten::sum",
                &[
                    arg(&top_weights),
                    ArgRef::IntList(&[-1]),
                    ArgRef::Bool(true),
                    ArgRef::None,
                ],
                [with_last(&weights, 1)],
            )?;
            let denominator = b.elementwise("+ 1e-20", "aten::add", [&sum], Dtype::F32)?;
            b.release(&[&sum])?;
            let normed = b.elementwise(
                "/ denominator",
                "aten::div",
                [&top_weights, &denominator],
                Dtype::F32,
            )?;
            let scaled = b.elementwise(
                "* routed_scaling_factor",
                "aten::mul",
                [&normed],
                Dtype::F32,
            )?;
            b.release(&[&normed])?;
            scaled
        } else {
            b.elementwise(
                "* routed_scaling_factor",
                "aten::mul",
                [&top_weights],
                Dtype::F32,
            )?
        };
        b.returns(&[&scaled, &top_ids]);
        let mut params = product("gate parameters", &[experts, hidden])?;
        if routing.topk_method == TopkMethod::NoauxTc {
            // e_score_correction_bias [E], a parameter in the model dtype.
            params = crate::checked::sum("gate parameters", &[params, experts])?;
        }
        b.weights(bytes_of("gate weight", params, x.dtype)?)?;
        Ok(b.finish())
    }
}

/// `torch.topk(x, k, dim=-1, sorted=False)`: values `out` and int64 indices.
fn topk(
    b: &mut CostBuilder,
    role: &str,
    x: &TensorMeta,
    k: u64,
    out: &TensorMeta,
) -> Result<[TensorMeta; 2]> {
    b.op(
        role,
        "aten::topk",
        &[
            arg(x),
            ArgRef::Int(k as i64),
            ArgRef::Int(-1),
            ArgRef::Bool(true),
            ArgRef::Bool(false),
        ],
        [out.clone(), t(&out.shape, Dtype::I64)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `topk_weight = scores.gather(1, topk_idx)` is noaux_tc's step only (V3); greedy
    /// routing takes the top-k values themselves.
    #[test]
    fn only_noaux_tc_gathers_its_weights() {
        let gathers = |c: &ModelConfig| {
            let gate = MoEGate::new(c, &Workload::prefill(1, 8).unwrap()).unwrap();
            let cost = gate.cost().unwrap();
            cost.ops()
                .iter()
                .filter(|o| o.op == Some("aten::gather"))
                .count()
        };
        assert_eq!(gathers(&ModelConfig::deepseek_ocr()), 0);
        let v3 = ModelConfig::builtin("deepseek-v3").unwrap().unwrap();
        assert_eq!(gathers(&v3), 1);
    }

    #[test]
    fn gate_matches_the_reference_measurement_and_runs_on_cuda_cores() {
        let c = ModelConfig::deepseek_ocr();
        let m = MoEGate::new(&c, &Workload::prefill(1, 512).unwrap())
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(m.matmul_flops, 83_886_080);
        assert_eq!(m.elementwise_flops, 6 * 512 * 64 + 512 * 6);
        assert_eq!(
            m.tensor_core_flops, 0,
            "fp32 GEMM with TF32 off runs as SIMT sgemm"
        );
        assert_eq!(m.cuda_core_flops, m.matmul_flops + m.elementwise_flops);
        assert_eq!(m.weight_bytes, 81_920 * 2);
    }

    #[test]
    fn tf32_moves_the_gate_gemm_to_tensor_cores() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 512).unwrap().with_tf32(true);
        let m = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        assert_eq!(m.tensor_core_flops, 83_886_080);
    }

    #[test]
    fn renormalised_weights_add_their_ops() {
        let mut c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 4).unwrap();
        let plain = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        c.moe.as_mut().unwrap().norm_topk_prob = true;
        let normed = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        // sum (N·k) + add (N) + divide (N·k) on top of the same scaling multiply.
        assert_eq!(
            normed.elementwise_flops - plain.elementwise_flops,
            4 * 6 + 4 + 4 * 6
        );
    }

    /// One expert per token: the vendor renormalises only when `top_k > 1`, so
    /// `norm_topk_prob` adds nothing; the scaling multiply stays. B = 1, S = 4, E = 64:
    /// softmax 5·E + top-k E per token, and one multiply per token.
    #[test]
    fn one_expert_per_token_is_not_renormalised() {
        let mut c = ModelConfig::deepseek_ocr();
        let moe = c.moe.as_mut().unwrap();
        moe.num_experts_per_tok = 1;
        moe.norm_topk_prob = true;
        let m = MoEGate::new(&c, &Workload::prefill(1, 4).unwrap())
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(m.elementwise_flops, 4 * (5 * 64 + 64) + 4);
    }

    /// The group-limited router's `scores.view(N, G, E/G)` reshape copies (`clone`) only
    /// when both G and E/G exceed 1; with one expert per group it is a view. And its
    /// group top-k reads the N·G group maxima and writes N·topk_group values and int64
    /// indices: V2 (G = 8, topk_group 3), N = 4: 4·8·4 + 4·3·(4 + 8) = 272 bytes.
    #[test]
    fn group_limited_routing_copies_and_moves_what_its_shapes_say() {
        let clones = |c: &ModelConfig| -> (usize, Cost) {
            let cost = MoEGate::new(c, &Workload::prefill(1, 4).unwrap())
                .unwrap()
                .cost()
                .unwrap();
            let n = cost
                .ops()
                .iter()
                .filter(|o| o.op == Some("aten::clone"))
                .count();
            (n, cost)
        };
        let v2 = ModelConfig::builtin("deepseek-v2").unwrap().unwrap();
        let (n, cost) = clones(&v2);
        assert_eq!(n, 1);
        let group_topk = cost
            .ops()
            .into_iter()
            .find(|o| o.name.contains("topk(topk_group)"))
            .expect("the group top-k op");
        assert_eq!(group_topk.metrics.io_bytes, 4 * 8 * 4 + 4 * 3 * (4 + 8));
        let mut per_expert = v2;
        let routing = &mut per_expert.moe.as_mut().unwrap().routing;
        routing.n_group = 160;
        routing.topk_group = 8;
        assert_eq!(clones(&per_expert).0, 0);
    }

    #[test]
    fn v3_router_matches_the_hand_derivation() {
        // docs/deepseek-family.md, "The V3 router": B = 1, S = 512.
        let c = ModelConfig::builtin("deepseek-v3").unwrap().unwrap();
        let m = MoEGate::new(&c, &Workload::prefill(1, 512).unwrap())
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(m.matmul_flops, 1_879_048_192);
        assert_eq!(m.elementwise_flops, 942_592);
        assert_eq!(m.tensor_core_flops, 0, "fp32 logits, TF32 off");
        assert_eq!(m.weight_bytes, (1_835_008 + 256) * 2);
    }

    #[test]
    fn group_limited_greedy_and_sigmoid_cost_their_own_ops() {
        // V2's group_limited_greedy (softmax) over E = 160, G = 8, topk_group 3, k = 6:
        // softmax 5·E + group max E + group top-3 G + top-6 E + scale k, per token.
        let c = ModelConfig::builtin("deepseek-v2").unwrap().unwrap();
        let m = MoEGate::new(&c, &Workload::prefill(1, 4).unwrap())
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(m.elementwise_flops, 4 * (5 * 160 + 160 + 8 + 160 + 6));
        // Greedy routing with sigmoid scores: 4 per score instead of 5.
        let mut ocr = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 4).unwrap();
        let softmax = MoEGate::new(&ocr, &w).unwrap().metrics().unwrap();
        ocr.moe.as_mut().unwrap().routing.scoring_func = crate::routing::ScoringFunc::Sigmoid;
        let sigmoid = MoEGate::new(&ocr, &w).unwrap().metrics().unwrap();
        assert_eq!(
            softmax.elementwise_flops - sigmoid.elementwise_flops,
            4 * 64
        );
    }
}

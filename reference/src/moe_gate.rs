//! `RefMoEGate`: the vendor `MoEGate` (DeepSeek-VL2's `modeling_deepseek.py`, which the
//! DeepSeek-V2/V3 checkpoints' code matches on the inference path): fp32 logits, softmax
//! or sigmoid scores, greedy, group-limited greedy or `noaux_tc` top-k, optional
//! normalisation and the routing scale.

use modelmeter::{ModelConfig, MoeConfig, ScoringFunc, TopkMethod};
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::weights::{dim, linear, Init};
use crate::Parameters;

/// ```python
/// hidden_states = hidden_states.view(-1, h)
/// logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
/// scores = logits.softmax(dim=-1, dtype=torch.float32)   # or logits.sigmoid()
/// # greedy:
/// topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
/// # group_limited_greedy: group_scores = scores.view(N, G, -1).max(dim=-1).values
/// # noaux_tc: scores_for_choice = scores.view(N, -1) + self.e_score_correction_bias.unsqueeze(0)
/// #           group_scores = scores_for_choice.view(N, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
/// # both: group_idx = topk(group_scores, topk_group)[1]; group_mask = zeros_like(group_scores)
/// #       group_mask.scatter_(1, group_idx, 1)
/// #       score_mask = group_mask.unsqueeze(-1).expand(N, G, E // G).reshape(N, -1)
/// #       tmp_scores = scores(_for_choice).masked_fill(~score_mask.bool(), 0.0)
/// #       topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
/// # noaux_tc: topk_weight = scores.gather(1, topk_idx)
/// if self.top_k > 1 and self.norm_topk_prob: ... / (sum + 1e-20) * routed_scaling_factor
/// else: topk_weight = topk_weight * self.routed_scaling_factor
/// ```
/// The weight (and `e_score_correction_bias`, a parameter of the model dtype) is stored in
/// the model dtype, as the checkpoint loads it; the weight is cast to fp32 on every call.
#[derive(Debug)]
pub struct RefMoEGate {
    weight: Tensor,
    e_score_correction_bias: Option<Tensor>,
    moe: MoeConfig,
    hidden: i64,
}

/// The gate's output: expert ids `[N, k]` (int64) and weights `[N, k]` (fp32).
#[derive(Debug)]
pub struct Routing {
    pub topk_idx: Tensor,
    pub topk_weight: Tensor,
}

impl RefMoEGate {
    pub(crate) fn new(config: &ModelConfig, init: &Init) -> Result<RefMoEGate> {
        let moe = config.moe()?.clone();
        let hidden = dim(config.hidden_size, "hidden_size")?;
        let experts = dim(moe.n_routed_experts, "n_routed_experts")?;
        let e_score_correction_bias = match moe.routing.topk_method {
            // Trained per-expert offsets; drawn like a bias (σ 0.1) so they change choices.
            TopkMethod::NoauxTc => Some(init.bias("e_score_correction_bias", experts)?),
            _ => None,
        };
        Ok(RefMoEGate {
            weight: init.linear("weight", experts, hidden)?,
            e_score_correction_bias,
            moe,
            hidden,
        })
    }

    /// One forward call (inference: no auxiliary loss).
    pub fn forward(&self, x: &Tensor) -> Result<Routing> {
        let flat = x.f_view([-1, self.hidden])?;
        let logits = linear(
            &flat.f_to_kind(Kind::Float)?,
            &self.weight.f_to_kind(Kind::Float)?,
            None,
        )?;
        let scores = match self.moe.routing.scoring_func {
            ScoringFunc::Softmax => logits.f_softmax(-1, Kind::Float)?,
            ScoringFunc::Sigmoid => logits.f_sigmoid()?,
        };
        let k = dim(self.moe.num_experts_per_tok, "num_experts_per_tok")?;
        // Python's forward is one function: the group-limited locals (group scores, masks,
        // masked scores) and noaux_tc's `_` live until it returns, so they are held here.
        let mut locals: Vec<Tensor> = Vec::new();
        let (weights, topk_idx) = match self.moe.routing.topk_method {
            TopkMethod::Greedy => scores.f_topk(k, -1, true, false)?,
            TopkMethod::GroupLimitedGreedy => {
                let choice = self.group_masked(&scores, false, &mut locals)?;
                let top = choice.f_topk(k, -1, true, false)?;
                locals.push(choice);
                top
            }
            TopkMethod::NoauxTc => {
                let bias = self
                    .e_score_correction_bias
                    .as_ref()
                    .expect("built for noaux_tc");
                let tokens = scores.size()[0];
                let for_choice = scores.f_view([tokens, -1])?.f_add(&bias.f_unsqueeze(0)?)?;
                let choice = self.group_masked(&for_choice, true, &mut locals)?;
                let (values, topk_idx) = choice.f_topk(k, -1, true, false)?;
                locals.extend([for_choice, choice, values]);
                (scores.f_gather(1, &topk_idx, false)?, topk_idx)
            }
        };
        let scale = self.moe.routed_scaling_factor;
        let topk_weight = if k > 1 && self.moe.norm_topk_prob {
            let denominator = weights
                .f_sum_dim_intlist(&[-1i64][..], true, None::<Kind>)?
                .f_add_scalar(1e-20)?;
            weights.f_div(&denominator)?.f_mul_scalar(scale)?
        } else {
            weights.f_mul_scalar(scale)?
        };
        Ok(Routing {
            topk_idx,
            topk_weight,
        })
    }

    /// `choice` with the experts outside each token's `topk_group` best groups set to
    /// 0.0; a group scores its best expert (`max`), or with `top2_sum` the sum of its two
    /// best (`noaux_tc`). The vendor's locals (group scores, group index, group mask,
    /// score mask) are pushed to `locals`: they live until the gate returns.
    fn group_masked(
        &self,
        choice: &Tensor,
        top2_sum: bool,
        locals: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let routing = self.moe.routing;
        let tokens = choice.size()[0];
        let groups = dim(routing.n_group, "n_group")?;
        let experts = dim(self.moe.n_routed_experts, "n_routed_experts")?;
        let grouped = choice.f_view([tokens, groups, -1])?;
        let group_scores = if top2_sum {
            let (top2, _) = grouped.f_topk(2, -1, true, true)?;
            // `.topk(2)[0].sum(-1)`: the values are a temporary of the sum.
            let sum = top2.f_sum_dim_intlist(&[-1i64][..], false, None::<Kind>)?;
            drop(top2);
            sum
        } else {
            grouped.f_max_dim(-1, false)?.0
        };
        let topk_group = dim(routing.topk_group, "topk_group")?;
        let (_, group_idx) = group_scores.f_topk(topk_group, -1, true, false)?;
        let mut group_mask = group_scores.f_zeros_like()?;
        let _ = group_mask.f_scatter_value_(1, &group_idx, 1)?;
        let score_mask = group_mask
            .f_unsqueeze(-1)?
            .f_expand([tokens, groups, experts / groups], false)?
            .f_reshape([tokens, -1])?;
        let blocked = score_mask.f_to_kind(Kind::Bool)?.f_bitwise_not()?;
        let masked = choice.f_masked_fill(&blocked, 0.0)?;
        drop(blocked);
        locals.extend([group_scores, group_idx, group_mask, score_mask]);
        Ok(masked)
    }
}

impl Parameters for RefMoEGate {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("weight".into(), self.weight.shallow_clone())];
        if let Some(bias) = &self.e_score_correction_bias {
            out.push(("e_score_correction_bias".into(), bias.shallow_clone()));
        }
        out
    }
}

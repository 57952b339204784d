//! `RefDeepseekV2MoE`: the vendor `DeepseekV2MoE` on its inference path (`moe_infer`).

use modelmeter::{ModelConfig, MoeConfig};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::mlp::RefDeepseekV2MLP;
use crate::moe_gate::RefMoEGate;
use crate::weights::{dim, Init};
use crate::{prefixed, Parameters};

/// Gate, routed experts (only those that receive tokens run) and shared experts.
#[derive(Debug)]
pub struct RefDeepseekV2MoE {
    gate: RefMoEGate,
    experts: Vec<RefDeepseekV2MLP>,
    shared_experts: Option<RefDeepseekV2MLP>,
    moe: MoeConfig,
}

impl RefDeepseekV2MoE {
    pub(crate) fn new(config: &ModelConfig, init: &Init) -> Result<RefDeepseekV2MoE> {
        let moe = config.moe()?.clone();
        let experts_init = init.sub("experts");
        let experts = (0..moe.n_routed_experts)
            .map(|i| {
                RefDeepseekV2MLP::new(
                    config.hidden_size,
                    moe.moe_intermediate_size,
                    &experts_init.sub(&i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = match moe.n_shared_experts {
            0 => None,
            n => Some(RefDeepseekV2MLP::new(
                config.hidden_size,
                moe.moe_intermediate_size * n,
                &init.sub("shared_experts"),
            )?),
        };
        Ok(RefDeepseekV2MoE {
            gate: RefMoEGate::new(config, &init.sub("gate"))?,
            experts,
            shared_experts,
            moe,
        })
    }

    /// One forward call.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_routing(x)?.0)
    }

    /// One forward call and the number of tokens each expert received.
    pub fn forward_with_routing(&self, x: &Tensor) -> Result<(Tensor, Vec<i64>)> {
        let identity = x;
        let shape = x.size();
        let hidden = *shape.last().unwrap_or(&1);
        let routing = self.gate.forward(x)?;
        let flat = x.f_view([-1, hidden])?;
        let (y, tokens_per_expert) =
            self.moe_infer(&flat, &routing.topk_idx, &routing.topk_weight)?;
        let mut y = y.f_view(shape.as_slice())?;
        if let Some(shared) = &self.shared_experts {
            y = y.f_add(&shared.forward(identity)?)?;
        }
        Ok((y, tokens_per_expert))
    }

    /// ```python
    /// cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
    /// cnts.scatter_(1, topk_ids, 1)
    /// tokens_per_expert = cnts.sum(dim=0)
    /// idxs = topk_ids.view(-1).argsort()
    /// sorted_tokens = x[idxs // topk_ids.shape[1]]
    /// tokens_per_expert = tokens_per_expert.cpu().numpy()
    /// for i, num_tokens in enumerate(tokens_per_expert): ... expert(sorted_tokens[start:end])
    /// outs = torch.cat(outputs, dim=0)
    /// new_x = torch.empty_like(outs); new_x[idxs] = outs
    /// final_out = new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype)
    ///                  .mul_(topk_weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype)
    /// ```
    fn moe_infer(
        &self,
        x: &Tensor,
        topk_ids: &Tensor,
        topk_weight: &Tensor,
    ) -> Result<(Tensor, Vec<i64>)> {
        let tokens = topk_ids.size()[0];
        let k = topk_ids.size()[1];
        let experts = dim(self.moe.n_routed_experts, "n_routed_experts")?;
        let mut cnts = topk_ids.f_new_zeros([tokens, experts], (Kind::Int64, topk_ids.device()))?;
        let _ = cnts.f_scatter_value_(1, topk_ids, 1)?;
        let tokens_per_expert = cnts.f_sum_dim_intlist(&[0i64][..], false, None::<Kind>)?;
        let idxs = topk_ids.f_view([-1])?.f_argsort(0, false)?;
        let sorted_tokens = x.f_index(&[Some(idxs.f_floor_divide_scalar(k)?)])?;
        let counts = Vec::<i64>::try_from(&tokens_per_expert.f_to_device(Device::Cpu)?)?;
        // `tokens_per_expert = tokens_per_expert.cpu().numpy()`: on a GPU the reassignment
        // frees the device tensor; on the CPU `.cpu()` is the tensor itself, which the
        // NumPy array keeps alive until `moe_infer` returns.
        if tokens_per_expert.device().is_cuda() {
            drop(tokens_per_expert);
        }

        let mut outputs = Vec::new();
        let mut start = 0i64;
        for (expert, &count) in self.experts.iter().zip(&counts) {
            if count == 0 {
                continue;
            }
            let slice = sorted_tokens.f_slice(0, start, start + count, 1)?;
            outputs.push(expert.forward(&slice)?);
            start += count;
        }
        let outs = if outputs.is_empty() {
            sorted_tokens.f_new_empty([0], (sorted_tokens.kind(), sorted_tokens.device()))?
        } else {
            Tensor::f_cat(&outputs, 0)?
        };
        let mut new_x = outs.f_empty_like()?;
        let _ = new_x.f_index_put_(&[Some(&idxs)], &outs, false)?;
        let mut weighted = new_x
            .f_view([tokens, k, -1])?
            .f_to_kind(topk_weight.kind())?;
        let _ = weighted.f_mul_(&topk_weight.f_unsqueeze(-1)?)?;
        let summed = weighted.f_sum_dim_intlist(&[1i64][..], false, None::<Kind>)?;
        // The fp32 copy is a temporary of the Python expression: gone before the cast.
        drop(weighted);
        let final_out = summed.f_to_kind(new_x.kind())?;
        Ok((final_out, counts))
    }
}

impl Parameters for RefDeepseekV2MoE {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = prefixed("gate", self.gate.parameters());
        for (i, expert) in self.experts.iter().enumerate() {
            out.extend(prefixed(&format!("experts.{i}"), expert.parameters()));
        }
        if let Some(shared) = &self.shared_experts {
            out.extend(prefixed("shared_experts", shared.parameters()));
        }
        out
    }
}

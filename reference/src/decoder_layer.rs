//! `RefDeepseekV2DecoderLayer`: the vendor pre-norm decoder layer, dense or MoE by index.

use modelmeter::layers::AttentionImpl;
use modelmeter::{MlaForm, MlpKind, ModelConfig};
use tch::Tensor;

use crate::attention::KvCache;
use crate::error::Result;
use crate::mlp::RefDeepseekV2MLP;
use crate::moe::RefDeepseekV2MoE;
use crate::rms_norm::RefDeepseekV2RMSNorm;
use crate::self_attention::SelfAttention;
use crate::weights::Init;
use crate::{prefixed, Parameters};

/// The feed-forward block of a decoder layer.
#[derive(Debug)]
pub enum FeedForward {
    Dense(RefDeepseekV2MLP),
    /// Boxed: far larger than the dense variant.
    Moe(Box<RefDeepseekV2MoE>),
}

/// ```python
/// residual = hidden_states
/// hidden_states = self.input_layernorm(hidden_states)
/// hidden_states, _, _ = self.self_attn(hidden_states, attention_mask, position_ids, past_key_value, ...)
/// hidden_states = residual + hidden_states
/// residual = hidden_states
/// hidden_states = self.post_attention_layernorm(hidden_states)
/// hidden_states = self.mlp(hidden_states)
/// hidden_states = residual + hidden_states
/// ```
#[derive(Debug)]
pub struct RefDeepseekV2DecoderLayer {
    input_layernorm: RefDeepseekV2RMSNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RefDeepseekV2RMSNorm,
    mlp: FeedForward,
}

impl RefDeepseekV2DecoderLayer {
    /// Its attention (for state that persists between calls).
    pub(crate) fn self_attn(&self) -> &SelfAttention {
        &self.self_attn
    }

    pub(crate) fn new(
        config: &ModelConfig,
        index: u64,
        init: &Init,
        attention: AttentionImpl,
        mla: MlaForm,
    ) -> Result<RefDeepseekV2DecoderLayer> {
        let mlp = match config.layer_kind(index)? {
            MlpKind::Dense => FeedForward::Dense(RefDeepseekV2MLP::new(
                config.hidden_size,
                config.intermediate_size,
                &init.sub(crate::harness::MLP),
            )?),
            MlpKind::Moe => FeedForward::Moe(Box::new(RefDeepseekV2MoE::new(
                config,
                &init.sub(crate::harness::MLP),
            )?)),
        };
        Ok(RefDeepseekV2DecoderLayer {
            input_layernorm: RefDeepseekV2RMSNorm::new(
                config,
                &init.sub(crate::harness::INPUT_LAYERNORM),
            )?,
            self_attn: SelfAttention::new(
                config,
                &init.sub(crate::harness::SELF_ATTN),
                attention,
                mla,
            )?,
            post_attention_layernorm: RefDeepseekV2RMSNorm::new(
                config,
                &init.sub(crate::harness::POST_ATTENTION_LAYERNORM),
            )?,
            mlp,
        })
    }

    /// True when the attention takes the additive causal mask.
    pub fn needs_mask(&self, attention: AttentionImpl) -> bool {
        self.self_attn.needs_mask(attention)
    }

    /// One forward call; the layer's KV cache is `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.forward_with_routing(x, position_ids, cache, mask)?.0)
    }

    /// One forward call and, for an MoE layer, the tokens each routed expert received.
    pub fn forward_with_routing(
        &self,
        x: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Vec<i64>>)> {
        // Python's reassignments of `hidden_states` free each block's input and output
        // as soon as the next value exists; `residual` keeps the sums.
        let normed = self.input_layernorm.forward(x)?;
        let attended = self.self_attn.forward(&normed, position_ids, cache, mask)?;
        drop(normed);
        let residual = x.f_add(&attended)?;
        drop(attended);
        let normed = self.post_attention_layernorm.forward(&residual)?;
        let (mlp_out, routing) = match &self.mlp {
            FeedForward::Dense(mlp) => (mlp.forward(&normed)?, None),
            FeedForward::Moe(moe) => {
                let (y, routing) = moe.forward_with_routing(&normed)?;
                (y, Some(routing))
            }
        };
        drop(normed);
        Ok((residual.f_add(&mlp_out)?, routing))
    }
}

impl Parameters for RefDeepseekV2DecoderLayer {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = prefixed("input_layernorm", self.input_layernorm.parameters());
        out.extend(prefixed("self_attn", self.self_attn.parameters()));
        out.extend(prefixed(
            "post_attention_layernorm",
            self.post_attention_layernorm.parameters(),
        ));
        out.extend(prefixed(
            "mlp",
            match &self.mlp {
                FeedForward::Dense(m) => m.parameters(),
                FeedForward::Moe(m) => m.parameters(),
            },
        ));
        out
    }
}

//! `self_attn` of a decoder layer: the attention class the config names — Llama-style
//! multi-head attention (DeepSeek-OCR, `use_mla: false`) or MLA (DeepSeek-V2/V3).

use modelmeter::layers::AttentionImpl;
use modelmeter::{MlaForm, ModelConfig};
use tch::Tensor;

use crate::attention::{KvCache, RefLlamaAttention};
use crate::error::Result;
use crate::mla::RefDeepseekV2Attention;
use crate::weights::Init;
use crate::Parameters;

/// The attention of a decoder layer.
#[derive(Debug)]
pub enum SelfAttention {
    Mha(RefLlamaAttention),
    Mla(RefDeepseekV2Attention),
}

impl SelfAttention {
    /// The MLA rotary embedding (its tables persist between calls); `None` for
    /// multi-head attention, whose rotary tables are built in every call.
    pub(crate) fn mla_rotary(&self) -> Option<&crate::mla_rotary::RefDeepseekV2RotaryEmbedding> {
        match self {
            SelfAttention::Mha(_) => None,
            SelfAttention::Mla(mla) => Some(mla.rotary()),
        }
    }

    /// MLA when the config has MLA dimensions (run in `form`), else multi-head attention.
    pub(crate) fn new(
        config: &ModelConfig,
        init: &Init,
        implementation: AttentionImpl,
        form: MlaForm,
    ) -> Result<SelfAttention> {
        Ok(match config.mla {
            Some(_) => SelfAttention::Mla(RefDeepseekV2Attention::new(
                config,
                init,
                implementation,
                form,
            )?),
            None => SelfAttention::Mha(RefLlamaAttention::new(config, init, implementation)?),
        })
    }

    /// True when the forward takes the additive causal mask.
    pub fn needs_mask(&self, implementation: AttentionImpl) -> bool {
        match self {
            SelfAttention::Mha(_) => implementation == AttentionImpl::Eager,
            SelfAttention::Mla(m) => m.needs_mask(),
        }
    }

    /// One forward call (see the attention classes).
    pub fn forward(
        &self,
        x: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            SelfAttention::Mha(m) => m.forward(x, position_ids, cache, mask),
            SelfAttention::Mla(m) => m.forward(x, position_ids, cache, mask),
        }
    }
}

impl Parameters for SelfAttention {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            SelfAttention::Mha(m) => m.parameters(),
            SelfAttention::Mla(m) => m.parameters(),
        }
    }
}

//! `RefDeepseekV2RMSNorm`: the vendor `DeepseekV2RMSNorm` in libtorch.

use modelmeter::ModelConfig;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::weights::{dim, Init};
use crate::Parameters;

/// ```python
/// input_dtype = hidden_states.dtype
/// hidden_states = hidden_states.to(torch.float32)
/// variance = hidden_states.pow(2).mean(-1, keepdim=True)
/// hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
/// return self.weight * hidden_states.to(input_dtype)
/// ```
#[derive(Debug)]
pub struct RefDeepseekV2RMSNorm {
    weight: Tensor,
    eps: f64,
}

impl RefDeepseekV2RMSNorm {
    pub(crate) fn new(config: &ModelConfig, init: &Init) -> Result<RefDeepseekV2RMSNorm> {
        Self::with_width(
            dim(config.hidden_size, "hidden_size")?,
            config.rms_norm_eps,
            init,
        )
    }

    /// A norm over `width` features (MLA's `q_a_layernorm` and `kv_a_layernorm`).
    pub(crate) fn with_width(width: i64, eps: f64, init: &Init) -> Result<RefDeepseekV2RMSNorm> {
        Ok(RefDeepseekV2RMSNorm {
            weight: init.norm("weight", width)?,
            eps,
        })
    }

    /// One forward call.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let input_kind = x.kind();
        let h = x.f_to_kind(Kind::Float)?;
        let variance = h
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(&[-1i64][..], true, None::<Kind>)?;
        let inv = variance.f_add_scalar(self.eps)?.f_rsqrt()?;
        let normed = h.f_mul(&inv)?;
        // `hidden_states = hidden_states * rsqrt(…)` drops the fp32 copy and the rsqrt.
        drop((h, inv));
        Ok(self.weight.f_mul(&normed.f_to_kind(input_kind)?)?)
    }
}

impl Parameters for RefDeepseekV2RMSNorm {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.shallow_clone())]
    }
}

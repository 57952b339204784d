//! `RefDeepseekV2MLP`: the vendor `DeepseekV2MLP` in libtorch.

use tch::Tensor;

use crate::error::Result;
use crate::weights::{dim, linear, Init};
use crate::Parameters;

/// `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, bias-free, SiLU.
#[derive(Debug)]
pub struct RefDeepseekV2MLP {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl RefDeepseekV2MLP {
    /// An MLP h → `width` → h.
    pub(crate) fn new(hidden: u64, width: u64, init: &Init) -> Result<RefDeepseekV2MLP> {
        let (h, w) = (dim(hidden, "hidden_size")?, dim(width, "MLP width")?);
        Ok(RefDeepseekV2MLP {
            gate_proj: init.linear("gate_proj.weight", w, h)?,
            up_proj: init.linear("up_proj.weight", w, h)?,
            down_proj: init.linear("down_proj.weight", h, w)?,
        })
    }

    /// One forward call.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Python frees each temporary as soon as its consumer returns: gate after the
        // SiLU, act and up after the product, before down_proj runs.
        let act = linear(x, &self.gate_proj, None)?.f_silu()?;
        let up = linear(x, &self.up_proj, None)?;
        let product = act.f_mul(&up)?;
        drop((act, up));
        linear(&product, &self.down_proj, None)
    }
}

impl Parameters for RefDeepseekV2MLP {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("gate_proj.weight".into(), self.gate_proj.shallow_clone()),
            ("up_proj.weight".into(), self.up_proj.shallow_clone()),
            ("down_proj.weight".into(), self.down_proj.shallow_clone()),
        ]
    }
}

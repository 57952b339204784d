//! `DeepseekV2RMSNorm`.
//!
//! Vendor code (`modeling_deepseekv2.py`):
//! ```python
//! input_dtype = hidden_states.dtype
//! hidden_states = hidden_states.to(torch.float32)
//! variance = hidden_states.pow(2).mean(-1, keepdim=True)
//! hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
//! return self.weight * hidden_states.to(input_dtype)
//! ```
//! Over N tokens of width h: elementwise FLOPs = 4·N·h + 2·N (pow, mean, ×rsqrt and
//! ×weight per element; + eps and rsqrt per token), no matmul. FlopCounterMode sees 0.

use crate::config::ModelConfig;
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::layers::vendor_ops::{arg, bytes_of, t, with_last};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::Workload;

/// `DeepseekV2RMSNorm` over an input of shape `[B, S_q, h]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2RMSNorm {
    input: TensorMeta,
    allow_tf32: bool,
}

impl DeepseekV2RMSNorm {
    /// The norm of a decoder layer for `workload`.
    pub fn new(config: &ModelConfig, workload: &Workload) -> DeepseekV2RMSNorm {
        DeepseekV2RMSNorm::over(
            t(
                &[workload.batch, workload.query_len(), config.hidden_size],
                workload.dtype,
            ),
            workload.allow_tf32,
        )
    }

    /// A norm over the last dimension of `input`.
    pub fn over(input: TensorMeta, allow_tf32: bool) -> DeepseekV2RMSNorm {
        DeepseekV2RMSNorm { input, allow_tf32 }
    }

    /// The norm's cost with `name` in place of the class name (`input_layernorm` …).
    pub fn cost_as(&self, name: &str) -> Result<Cost> {
        let x = &self.input;
        let hidden = *x.shape.last().unwrap_or(&1);
        let mut b = CostBuilder::new(name, self.allow_tf32);
        let x32 = b.cast("to(float32)", x, Dtype::F32)?;
        let squared = b.elementwise("pow(2)", "aten::pow", [&x32], Dtype::F32)?;
        let [variance] = b.op(
            "mean(-1)",
            "aten::mean",
            &[
                arg(&squared),
                ArgRef::IntList(&[-1]),
                ArgRef::Bool(true),
                ArgRef::None,
            ],
            [with_last(&squared, 1)],
        )?;
        b.release(&[&squared])?;
        let shifted = b.elementwise("+ eps", "aten::add", [&variance], Dtype::F32)?;
        let inv = b.elementwise("rsqrt", "aten::rsqrt", [&shifted], Dtype::F32)?;
        b.release(&[&shifted])?;
        let normed = b.elementwise("x * rsqrt", "aten::mul", [&x32, &inv], Dtype::F32)?;
        // `hidden_states = hidden_states * rsqrt(…)` drops the fp32 copy of the input.
        b.release(&[&inv, &x32])?;
        let back = b.cast("to(input dtype)", &normed, x.dtype)?;
        let weight = t(&[hidden], x.dtype);
        let out = b.elementwise("weight *", "aten::mul", [&weight, &back], x.dtype)?;
        b.release_unless_same(&back, &normed)?;
        b.returns(&[&out]);
        b.weights(bytes_of("RMSNorm weight", hidden, x.dtype)?)?;
        Ok(b.finish())
    }
}

impl Layer for DeepseekV2RMSNorm {
    fn name(&self) -> String {
        "DeepseekV2RMSNorm".into()
    }

    fn cost(&self) -> Result<Cost> {
        self.cost_as(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_and_parameters() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 512).unwrap();
        let m = DeepseekV2RMSNorm::new(&c, &w).metrics().unwrap();
        let (n, h) = (512, 1280);
        assert_eq!(m.matmul_flops, 0);
        assert_eq!(m.elementwise_flops, 4 * n * h + 2 * n);
        assert_eq!(m.tensor_core_flops, 0);
        assert_eq!(m.cuda_core_flops, m.elementwise_flops);
        assert_eq!(m.weight_bytes, 1280 * 2, "1,280 bf16 parameters");
    }

    #[test]
    fn fp32_input_skips_the_casts() {
        let bf16 = DeepseekV2RMSNorm::over(t(&[2, 3, 8], Dtype::Bf16), false)
            .cost()
            .unwrap();
        let fp32 = DeepseekV2RMSNorm::over(t(&[2, 3, 8], Dtype::F32), false)
            .cost()
            .unwrap();
        assert_eq!(bf16.ops().len(), fp32.ops().len() + 2);
        assert_eq!(
            bf16.metrics.elementwise_flops,
            fp32.metrics.elementwise_flops
        );
    }

    #[test]
    fn bytes_moved_and_allocated_by_hand() {
        // bf16 x [4, 1280] = 10,240 B; fp32 [4, 1280] = 20,480 B; fp32 [4, 1] = 16 B;
        // weight [1280] bf16 = 2,560 B. Per op, read + written:
        //   to(fp32) 10,240 + 20,480; pow 2·20,480; mean 20,480 + 16; + eps 2·16;
        //   rsqrt 2·16; x * rsqrt 20,480 + 16 + 20,480; to(bf16) 20,480 + 10,240;
        //   weight * 2,560 + 10,240 + 10,240.
        let w = Workload::prefill(1, 4).unwrap();
        let m = DeepseekV2RMSNorm::new(&ModelConfig::deepseek_ocr(), &w)
            .metrics()
            .unwrap();
        assert_eq!(
            m.io_bytes,
            30_720 + 40_960 + 20_496 + 32 + 32 + 40_976 + 30_720 + 23_040
        );
        // Outputs allocated: three fp32 [4, 1280], three fp32 [4, 1], two bf16 [4, 1280].
        assert_eq!(m.activation_bytes, 3 * 20_480 + 3 * 16 + 2 * 10_240);
    }
}

//! `DeepseekV2MLP`: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, three bias-free
//! linears h→w, h→w, w→h with SiLU.
//!
//! Over N rows: matmul FLOPs = 6·N·h·w; elementwise = 5·N·w (SiLU 4 + multiply 1).
//! The same module is the dense MLP (w = i), each routed expert (w = m) and the shared
//! experts (w = m · n_shared).

use crate::checked::product;
use crate::config::ModelConfig;
use crate::conventions::TensorMeta;
use crate::error::Result;
use crate::layers::vendor_ops::{bytes_of, t};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::Workload;

/// `DeepseekV2MLP` of width `intermediate` over `input` (`[.., h]`).
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2MLP {
    input: TensorMeta,
    intermediate: u64,
    allow_tf32: bool,
}

impl DeepseekV2MLP {
    /// The dense MLP of a decoder layer (width `intermediate_size`).
    pub fn new(config: &ModelConfig, workload: &Workload) -> DeepseekV2MLP {
        let input = t(
            &[workload.batch, workload.query_len(), config.hidden_size],
            workload.dtype,
        );
        DeepseekV2MLP::over(input, config.intermediate_size, workload.allow_tf32)
    }

    /// An MLP of width `intermediate` over `input`.
    pub fn over(input: TensorMeta, intermediate: u64, allow_tf32: bool) -> DeepseekV2MLP {
        DeepseekV2MLP {
            input,
            intermediate,
            allow_tf32,
        }
    }

    /// The MLP's cost under another name (`shared_experts`, `experts` …).
    pub fn cost_as(&self, name: &str) -> Result<Cost> {
        let x = &self.input;
        let hidden = *x.shape.last().unwrap_or(&1);
        let mut b = CostBuilder::new(name, self.allow_tf32);
        // One expression: each temporary is freed as soon as its consumer returns.
        let gate = b.linear("gate_proj", x, self.intermediate, false)?;
        let act = b.elementwise("act_fn (silu)", "aten::silu", [&gate], x.dtype)?;
        b.release(&[&gate])?;
        let up = b.linear("up_proj", x, self.intermediate, false)?;
        let prod = b.elementwise("act * up", "aten::mul", [&act, &up], x.dtype)?;
        b.release(&[&act, &up])?;
        let out = b.linear("down_proj", &prod, hidden, false)?;
        b.release(&[&prod])?;
        b.returns(&[&out]);
        let params = product("MLP parameters", &[3, hidden, self.intermediate])?;
        b.weights(bytes_of("MLP weights", params, x.dtype)?)?;
        Ok(b.finish())
    }
}

impl Layer for DeepseekV2MLP {
    fn name(&self) -> String {
        "DeepseekV2MLP".into()
    }

    fn cost(&self) -> Result<Cost> {
        self.cost_as(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_mlp_matches_the_reference_measurement() {
        let c = ModelConfig::deepseek_ocr();
        let m = DeepseekV2MLP::new(&c, &Workload::prefill(1, 512).unwrap())
            .metrics()
            .unwrap();
        assert_eq!(
            m.matmul_flops, 26_927_431_680,
            "FlopCounterMode, docs/deepseek-ocr.md"
        );
        assert_eq!(m.elementwise_flops, 5 * 512 * 6848);
        assert_eq!(m.weight_bytes, 26_296_320 * 2, "26,296,320 bf16 parameters");
        assert_eq!(m.tensor_core_flops, m.matmul_flops);
        assert_eq!(m.cuda_core_flops, m.elementwise_flops);
    }

    #[test]
    fn peak_by_hand_at_b1_s512() {
        // docs/memory.md, "Peak activation memory": gate is freed after the SiLU, act and
        // up after the product; the peak is act + up + product, 3·N·i elements (bf16).
        let c = ModelConfig::deepseek_ocr();
        let cost = DeepseekV2MLP::new(&c, &Workload::prefill(1, 512).unwrap())
            .cost()
            .unwrap();
        let ni = 512 * 6848 * 2;
        assert_eq!(cost.peak.peak_bytes, 3 * ni);
        assert_eq!(cost.peak.peak_bytes, 21_037_056);
        assert_eq!(cost.peak.returned_bytes, 512 * 1280 * 2);
        assert_eq!(cost.peak.kept_bytes, 0);
        // Every tensor is a whole number of 512-byte CUDA blocks here.
        assert_eq!(cost.cuda_peak, cost.peak);
        // The unfused sum of every output is larger: 4·N·i + N·h.
        assert_eq!(cost.metrics.activation_bytes, 4 * ni + 512 * 1280 * 2);
    }

    #[test]
    fn bytes_moved_and_allocated_by_hand() {
        // bf16, N = 4 rows, h = 1280, i = 6848. Per op, bytes read + written (unfused):
        //   gate_proj, up_proj: x 4·1280·2 = 10,240 + Wᵀ 1280·6848·2 = 17,530,880
        //                       + out 4·6848·2 = 54,784            → 17,595,904 each
        //   silu: 54,784 read + 54,784 written                     →    109,568
        //   act * up: 2·54,784 read + 54,784 written               →    164,352
        //   down_proj: 54,784 + 17,530,880 read + 10,240 written   → 17,595,904
        // Allocated outputs: four [4, 6848] tensors and one [4, 1280]: 229,376.
        let c = ModelConfig::deepseek_ocr();
        let m = DeepseekV2MLP::new(&c, &Workload::prefill(1, 4).unwrap())
            .metrics()
            .unwrap();
        assert_eq!(m.io_bytes, 3 * 17_595_904 + 109_568 + 164_352);
        assert_eq!(m.activation_bytes, 4 * 54_784 + 10_240);
        assert_eq!(m.kv_cache_bytes, 0);
    }
}

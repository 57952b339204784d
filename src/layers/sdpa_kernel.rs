//! Which kernel `scaled_dot_product_attention` dispatches to, as libtorch 2.11 decides it
//! for the inputs the DeepSeek-V2 attention passes (contiguous `[B, H, S, d]` q, k, v
//! after `repeat_kv`, no explicit mask, causal in prefill, no dropout, no grad).
//!
//! The choice changes what executes: the CUDA flash kernel pads the head dim to a
//! multiple of 8 (so its FLOPs are those of the padded d), and where no fused kernel
//! accepts the inputs the math path runs op by op.
//!
//! The CUDA rules are those of libtorch 2.11 on Hopper (sm90: H100, H200) with cuDNN ≥
//! 9.10 (torch 2.11.0+cu130 ships 9.19), from `sdp_utils.cpp` (`check_cudnn_tensor_shapes`:
//! d % 8 == 0, d ≤ 256 on sm90, S_kv ≠ 1) and checked on an NVIDIA H200
//! (docs/results/2026-11-27-h200): bf16/fp16 with d ∈ {40, 64, 96, 128, 160, 192, 256}
//! ran cuDNN, with d ∈ {6, 20, 36} or S_kv = 1 the flash kernel (padded inputs); fp32
//! with d % 4 == 0 (20 … 256) ran the memory-efficient kernel, with d = 6 the math path.
//! On the CPU the CPU flash kernel ran for every head dim. Head dims above 256 are
//! predicted but were never run. `verify-decoder` checks each prediction against the
//! kernel that ran and fails the layer when they differ.

use serde::Serialize;

use crate::conventions::TensorMeta;
use crate::dtype::Dtype;
use crate::workload::Platform;

/// The tensors a fused kernel hands back in inference (no grad, no dropout), besides
/// the attention output itself: what it writes and allocates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelOutputs {
    /// On the kernel's device: the output first, then the side outputs.
    pub device: Vec<TensorMeta>,
    /// On the host (the memory-efficient kernel's philox seed and offset): written, so
    /// they count in `io_bytes`, but no block of the device's allocator holds them.
    pub host: Vec<TensorMeta>,
}

/// A kernel behind `scaled_dot_product_attention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SdpaKernel {
    /// `_scaled_dot_product_flash_attention_for_cpu`: any head dim.
    CpuFlash,
    /// `_scaled_dot_product_cudnn_attention`: bf16/fp16, d % 8 == 0, d ≤ 256, S_kv > 1.
    Cudnn,
    /// `_scaled_dot_product_flash_attention`: bf16/fp16 that cuDNN refuses, d ≤ 256; q, k
    /// and v are padded to a multiple of 8 first (`aten::pad` → `constant_pad_nd`) and
    /// the output sliced.
    Flash,
    /// `_scaled_dot_product_efficient_attention`: fp32 with d % 4 == 0 (cuDNN and flash
    /// take no fp32), and (never run here) bf16/fp16 with d > 256, d % 8 == 0.
    Efficient,
    /// `_scaled_dot_product_attention_math`: no fused kernel accepts the inputs; it runs
    /// as scale, `bmm`, mask add, `_safe_softmax`, `bmm`.
    Math,
}

impl SdpaKernel {
    /// The kernel libtorch picks on `platform` for `dtype`, head dim `d` and `key_len`
    /// keys per query.
    pub fn select(platform: Platform, dtype: Dtype, head_dim: u64, key_len: u64) -> SdpaKernel {
        match (platform, dtype) {
            (Platform::Cpu, _) => SdpaKernel::CpuFlash,
            (Platform::Cuda, Dtype::Bf16 | Dtype::F16) => {
                if head_dim % 8 == 0 && head_dim <= 256 && key_len != 1 {
                    SdpaKernel::Cudnn
                } else if head_dim <= 256 {
                    SdpaKernel::Flash
                } else if head_dim % 8 == 0 {
                    SdpaKernel::Efficient
                } else {
                    SdpaKernel::Math
                }
            }
            (Platform::Cuda, _) => {
                if head_dim % 4 == 0 {
                    SdpaKernel::Efficient
                } else {
                    SdpaKernel::Math
                }
            }
        }
    }

    /// The ATen op of the fused kernel (`None` for the math path, which is composite).
    pub fn op(self) -> Option<&'static str> {
        match self {
            SdpaKernel::CpuFlash => Some("aten::_scaled_dot_product_flash_attention_for_cpu"),
            SdpaKernel::Cudnn => Some("aten::_scaled_dot_product_cudnn_attention"),
            SdpaKernel::Flash => Some("aten::_scaled_dot_product_flash_attention"),
            SdpaKernel::Efficient => Some("aten::_scaled_dot_product_efficient_attention"),
            SdpaKernel::Math => None,
        }
    }

    /// The head dim the kernel computes with: flash pads d to a multiple of 8.
    pub fn computed_head_dim(self, head_dim: u64) -> u64 {
        match self {
            SdpaKernel::Flash => head_dim.div_ceil(8) * 8,
            _ => head_dim,
        }
    }

    /// For an output of `rows` = B·H·S_q query rows that the kernel computed at a padded
    /// head dim (flash pads `head_dim` to a multiple of 8) and sliced back: each row keeps
    /// the padded stride, so the output is dense in any layout only with one row (an H200
    /// copied it for B = 3, H = 8, one query; docs/results/2026-11-28-h200). `None` when
    /// the kernel does not pad this head dim. The one rule for the Llama and the MLA
    /// attention's merge of heads.
    pub fn padded_output_dense(self, head_dim: u64, rows: u64) -> Option<bool> {
        (self.computed_head_dim(head_dim) != head_dim).then_some(rows == 1)
    }

    /// True when the attention output the kernel hands back, `[B, H, S, d]`, already lies
    /// in memory as `[B, S, H, d]`, so the vendor's `transpose(1, 2).contiguous()` returns
    /// it without a copy: the fused kernels write that layout (measured on the CPU: the
    /// `contiguous` hands back its input); the math path's `bmm` writes `[B, H, S, d]`, and
    /// flash's padded output is sliced back to d, which no longer is contiguous.
    pub fn writes_bshd(self, head_dim: u64) -> bool {
        match self {
            SdpaKernel::Math => false,
            SdpaKernel::Flash => self.computed_head_dim(head_dim) == head_dim,
            SdpaKernel::CpuFlash | SdpaKernel::Cudnn | SdpaKernel::Efficient => true,
        }
    }

    /// What the fused kernel hands back for attention output `out` (`[B, H, S_q, d]` as
    /// computed) over `batch` × `heads` × `query_len` queries, in libtorch 2.11 without
    /// grad; empty for the math path, whose ops allocate their own. Recorded on an NVIDIA
    /// H200 with torch's own `TorchDispatchMode` (`scripts/sdpa-outputs.py`,
    /// docs/results/2026-11-28-h200):
    ///
    /// - CPU flash: the output and the fp32 log-sum-exp `[B, H, S_q]`;
    /// - cuDNN: the output and the philox seed and offset, two int64 scalars on the GPU;
    ///   no log-sum-exp (`compute_log_sumexp` is false without grad);
    /// - flash: the output, the fp32 log-sum-exp `[B, H, S_q]` (always), the philox state
    ///   as uint64 `[2]` and uint64 `[]`, and an empty debug mask;
    /// - memory-efficient: the output, an empty log-sum-exp `[B, H, 0]`, and the philox
    ///   seed and offset as int64 scalars on the host.
    pub fn outputs(self, out: TensorMeta, batch: u64, heads: u64, query_len: u64) -> KernelOutputs {
        let lse = TensorMeta::new(&[batch, heads, query_len], Dtype::F32);
        let scalar = |dtype| TensorMeta::new(&[], dtype);
        let (device, host) = match self {
            SdpaKernel::CpuFlash => (vec![out, lse], vec![]),
            SdpaKernel::Cudnn => (vec![out, scalar(Dtype::I64), scalar(Dtype::I64)], vec![]),
            SdpaKernel::Flash => {
                let debug_mask = TensorMeta::new(&[0], out.dtype);
                (
                    vec![
                        out,
                        lse,
                        TensorMeta::new(&[2], Dtype::U64),
                        scalar(Dtype::U64),
                        debug_mask,
                    ],
                    vec![],
                )
            }
            SdpaKernel::Efficient => (
                vec![out, TensorMeta::new(&[batch, heads, 0], Dtype::F32)],
                vec![scalar(Dtype::I64), scalar(Dtype::I64)],
            ),
            SdpaKernel::Math => (vec![], vec![]),
        };
        KernelOutputs { device, host }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_runs_its_flash_kernel() {
        for d in [6, 20, 64, 128, 300] {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                assert_eq!(
                    SdpaKernel::select(Platform::Cpu, dtype, d, 1),
                    SdpaKernel::CpuFlash
                );
            }
        }
    }

    #[test]
    fn cuda_choices_follow_what_an_h200_ran() {
        use SdpaKernel::*;
        let cuda = |dtype, d| SdpaKernel::select(Platform::Cuda, dtype, d, 40);
        assert_eq!(cuda(Dtype::Bf16, 128), Cudnn);
        assert_eq!(cuda(Dtype::F16, 128), Cudnn);
        for d in [40, 64, 96, 160, 192, 256] {
            assert_eq!(cuda(Dtype::Bf16, d), Cudnn, "d = {d}");
        }
        // cuDNN takes no single key: a one-token prefill ran flash.
        assert_eq!(
            SdpaKernel::select(Platform::Cuda, Dtype::Bf16, 128, 1),
            Flash
        );
        assert_eq!(
            SdpaKernel::select(Platform::Cuda, Dtype::Bf16, 128, 2),
            Cudnn
        );
        for d in [160, 256] {
            assert_eq!(cuda(Dtype::F32, d), Efficient, "d = {d}");
        }
        assert_eq!(cuda(Dtype::Bf16, 20), Flash);
        assert_eq!(cuda(Dtype::Bf16, 36), Flash);
        assert_eq!(cuda(Dtype::Bf16, 6), Flash);
        assert_eq!(cuda(Dtype::F32, 128), Efficient);
        assert_eq!(cuda(Dtype::F32, 20), Efficient);
        assert_eq!(cuda(Dtype::F32, 36), Efficient);
        assert_eq!(cuda(Dtype::F32, 6), Math);
    }

    #[test]
    fn half_precision_head_dims_above_256_follow_sdp_utils() {
        // Never run on a GPU here, so pinned to libtorch 2.11's sdp_utils.cpp: cuDNN and
        // flash take d ≤ 256 on sm90; the memory-efficient kernel takes half-precision d
        // with d % 8 == 0 (its alignment), any size; otherwise the math path. Each choice
        // changes the FLOPs analyze prints (flash pads d; math runs op by op).
        use SdpaKernel::*;
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let cuda = |d, keys| SdpaKernel::select(Platform::Cuda, dtype, d, keys);
            assert_eq!(cuda(256, 40), Cudnn, "the largest cuDNN head dim");
            assert_eq!(
                cuda(256, 1),
                Flash,
                "one key: cuDNN refuses, flash takes d ≤ 256"
            );
            assert_eq!(cuda(250, 40), Flash, "d % 8 != 0: flash, padded to 256");
            assert_eq!(cuda(264, 40), Efficient);
            assert_eq!(cuda(264, 1), Efficient);
            assert_eq!(cuda(512, 40), Efficient);
            assert_eq!(cuda(257, 40), Math);
            assert_eq!(cuda(260, 40), Math, "d % 8 != 0 above 256: no fused kernel");
        }
        assert_eq!(Efficient.computed_head_dim(264), 264, "no padding");
        assert_eq!(Flash.computed_head_dim(250), 256);
    }

    #[test]
    fn kernel_outputs_follow_what_an_h200_handed_back() {
        let bytes = |ts: &[TensorMeta]| ts.iter().map(|t| t.bytes().unwrap()).sum::<u64>();
        let out = TensorMeta::new(&[1, 10, 512, 128], Dtype::Bf16);
        let o = 1_310_720;
        // cuDNN: no log-sum-exp, two 8-byte philox scalars.
        let k = SdpaKernel::Cudnn.outputs(out.clone(), 1, 10, 512);
        assert_eq!((bytes(&k.device), bytes(&k.host)), (o + 16, 0));
        // flash: lse [1, 10, 512] fp32 (20480), uint64 [2] and [] (24), empty mask.
        let k = SdpaKernel::Flash.outputs(out.clone(), 1, 10, 512);
        assert_eq!((bytes(&k.device), bytes(&k.host)), (o + 20_480 + 24, 0));
        assert_eq!(k.device.len(), 5);
        // memory-efficient: empty lse on the GPU, the seeds on the host.
        let k = SdpaKernel::Efficient.outputs(out.clone(), 1, 10, 512);
        assert_eq!((bytes(&k.device), bytes(&k.host)), (o, 16));
        let k = SdpaKernel::CpuFlash.outputs(out, 1, 10, 512);
        assert_eq!((bytes(&k.device), bytes(&k.host)), (o + 20_480, 0));
        assert_eq!(
            SdpaKernel::Math.outputs(TensorMeta::new(&[1], Dtype::F32), 1, 1, 1),
            KernelOutputs::default()
        );
    }

    #[test]
    fn flash_pads_to_a_multiple_of_eight() {
        assert_eq!(SdpaKernel::Flash.computed_head_dim(6), 8);
        assert_eq!(SdpaKernel::Flash.computed_head_dim(20), 24);
        assert_eq!(SdpaKernel::Flash.computed_head_dim(24), 24);
        assert_eq!(SdpaKernel::Cudnn.computed_head_dim(20), 20);
        assert_eq!(SdpaKernel::Math.op(), None);
    }
}

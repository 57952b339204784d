//! The conventions table: how many FLOPs each ATen op costs, on which engine, and
//! whether it moves data.
//!
//! This is the one place where an op's FLOP rule lives. The analytic layers describe
//! the vendor code as a sequence of ATen op calls and cost each call here; the
//! measured side (crate `modelmeter-reference`) observes the ops libtorch really
//! dispatches and costs each of them here too. So wherever analytic model and executed
//! ops follow the same conventions, they agree to the FLOP.
//!
//! The rules, in words (also echoed into every JSON report by [`conventions_json`]):
//! - FLOPs are 2 per multiply-accumulate. GEMM-like ops use PyTorch
//!   `FlopCounterMode`'s formulas (torch 2.11 registry); bias adds, which
//!   FlopCounterMode ignores, are counted as elementwise work (1 per output element).
//! - Attention cores are the full `S_q × S_kv` rectangle: causal masking is never
//!   discounted (as FlopCounterMode counts them).
//! - Fused attention kernels (SDPA flash/efficient/cuDNN/CPU) also do softmax work
//!   inside the kernel: 6 elementwise FLOPs per score in forward (scale 1 + softmax 5),
//!   8 in backward (recomputed scale and softmax 6 + softmax gradient 2).
//! - Elementwise ops and reductions cost `flops_per_element` per element of the
//!   broadcast shape of their tensor inputs (the output for elementwise ops, the input
//!   for reductions, softmax and top-k). Ops whose first tensor input is an integer or
//!   boolean tensor are index bookkeeping and cost 0.
//! - Copies, casts, gathers, scatters, sorts, allocations and random fills cost 0
//!   FLOPs but move bytes; views move nothing.
//! - Engines (of an NVIDIA GPU, sm80 or newer): GEMMs whose first operand is bf16, fp16
//!   or fp8 run on tensor cores; fp32 cuBLAS GEMMs run on CUDA cores unless matmul TF32
//!   is allowed (PyTorch's default is off); fp32 cuDNN convolutions follow cuDNN's own
//!   TF32 switch (PyTorch's default is ON); the memory-efficient attention kernels
//!   compute fp32 on tensor cores whatever the switches say ("fast fp32", 3×TF32:
//!   `OpMultiplyAddFastF32` in torch's `mem_eff_attention/gemm_kernel_utils.h`; an H200's
//!   counters show TF32 tensor ops and no FFMA work). All other dtypes and all
//!   elementwise work run on CUDA cores.
//! - In-place variants (`aten::mul_`) follow the rule of their op (`aten::mul`).

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU64;
use std::sync::OnceLock;

use crate::checked::{product, sum};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::shape::{broadcast, Shape};

/// Shape and element type of a tensor argument.
///
/// In a layer's op list a tensor may also name the allocation that holds it (its
/// [`StorageId`], given by the [`crate::metrics::CostBuilder`] op that allocated it, and
/// passed on by views), so the builder can tell when its memory is released: the
/// liveness behind `peak_activation_bytes`. Two metas are equal when shape and dtype
/// are; the storage is bookkeeping, not part of the tensor's description.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub shape: Shape,
    pub dtype: Dtype,
    pub(crate) storage: Option<StorageId>,
}

/// Which allocation of which cost builder holds a tensor (see [`TensorMeta`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageId {
    /// The builder, unique in the process (never zero, so that an `Option<StorageId>`
    /// takes no more room than a `StorageId` in every tensor description).
    pub(crate) builder: NonZeroU64,
    /// The allocation's index in that builder.
    pub(crate) index: usize,
}

impl PartialEq for TensorMeta {
    fn eq(&self, other: &TensorMeta) -> bool {
        self.shape == other.shape && self.dtype == other.dtype
    }
}

impl Eq for TensorMeta {}

impl TensorMeta {
    /// A tensor of `shape` and `dtype`.
    pub fn new(shape: &[u64], dtype: Dtype) -> TensorMeta {
        TensorMeta::from_shape(Shape::new(shape), dtype)
    }

    /// A tensor of `shape` (moved in, not copied) and `dtype`.
    pub fn from_shape(shape: Shape, dtype: Dtype) -> TensorMeta {
        TensorMeta {
            shape,
            dtype,
            storage: None,
        }
    }

    /// The allocation holding this tensor, when a cost builder made it.
    pub fn storage(&self) -> Option<StorageId> {
        self.storage
    }

    /// This tensor held by `storage` (an op's output, or a view of `storage`'s tensor).
    pub(crate) fn held_by(mut self, storage: Option<StorageId>) -> TensorMeta {
        self.storage = storage;
        self
    }

    /// A view of this tensor with another shape (`view`, `reshape` of a contiguous
    /// tensor, `transpose`): the same storage, no allocation.
    pub fn viewed_as(&self, shape: &[u64]) -> TensorMeta {
        TensorMeta::new(shape, self.dtype).held_by(self.storage)
    }

    /// Number of elements.
    pub fn numel(&self) -> Result<u64> {
        product("tensor element count", &self.shape)
    }

    /// Bytes of the tensor's elements.
    pub fn bytes(&self) -> Result<u64> {
        // Every op call asks for the bytes of each of its tensors, so the arithmetic runs
        // without building results; the rare failure says why in `bytes_error`.
        let bytes = self.dtype.size_bytes().and_then(|size| {
            self.shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))?
                .checked_mul(size)
        });
        match bytes {
            Some(bytes) => Ok(bytes),
            None => Err(self.bytes_error()),
        }
    }

    /// Why [`TensorMeta::bytes`] has no answer: a dtype without a size, or an overflow.
    #[cold]
    fn bytes_error(&self) -> Error {
        let Some(size) = self.dtype.size_bytes() else {
            return Error::op_shape("tensor", format!("no byte size for dtype {}", self.dtype));
        };
        match self.numel() {
            Err(e) => e,
            Ok(numel) => product("tensor bytes", &[numel, size])
                .err()
                .unwrap_or_else(|| Error::overflow("tensor bytes")),
        }
    }
}

/// One argument of an op call, as the dispatcher boxes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Tensor(TensorMeta),
    List(Vec<Arg>),
    Int(i64),
    IntList(Vec<i64>),
    Float(f64),
    Bool(bool),
    BoolList(Vec<bool>),
    Str(String),
    /// `None`, or an undefined tensor.
    None,
    /// Anything else (devices, generators, complex scalars …), by kind.
    Other(String),
}

/// One argument of an op call as the rules read it: an [`Arg`] borrowed. The analytic
/// layers describe their op calls with these, so that an op's tensors are read where the
/// layer keeps them instead of being copied into an argument list (and dropped after it)
/// for every call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgRef<'a> {
    Tensor(&'a TensorMeta),
    List(&'a [Arg]),
    Int(i64),
    IntList(&'a [i64]),
    Float(f64),
    Bool(bool),
    BoolList(&'a [bool]),
    Str(&'a str),
    /// `None`, or an undefined tensor.
    None,
    /// Anything else (devices, generators, complex scalars …), by kind.
    Other(&'a str),
}

/// An argument the conventions can cost: an [`Arg`] (what the dispatcher boxed, as the
/// counter records it) or an [`ArgRef`] (what an analytic layer passes). Every rule reads
/// its arguments through [`AsArg::as_arg`], so both kinds are costed by the same rules.
pub trait AsArg {
    /// The argument, borrowed.
    fn as_arg(&self) -> ArgRef<'_>;
}

impl AsArg for Arg {
    fn as_arg(&self) -> ArgRef<'_> {
        match self {
            Arg::Tensor(t) => ArgRef::Tensor(t),
            Arg::List(items) => ArgRef::List(items),
            Arg::Int(v) => ArgRef::Int(*v),
            Arg::IntList(v) => ArgRef::IntList(v),
            Arg::Float(v) => ArgRef::Float(*v),
            Arg::Bool(v) => ArgRef::Bool(*v),
            Arg::BoolList(v) => ArgRef::BoolList(v),
            Arg::Str(v) => ArgRef::Str(v),
            Arg::None => ArgRef::None,
            Arg::Other(v) => ArgRef::Other(v),
        }
    }
}

impl AsArg for ArgRef<'_> {
    fn as_arg(&self) -> ArgRef<'_> {
        *self
    }
}

/// The argument at `index`, if there is one.
fn arg_at<A: AsArg>(args: &[A], index: usize) -> Option<ArgRef<'_>> {
    args.get(index).map(AsArg::as_arg)
}

/// The engine that executes FLOPs on an NVIDIA GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    TensorCore,
    CudaCore,
}

/// The engine a GEMM with first operand `dtype` runs on.
pub fn matmul_engine(dtype: Dtype, allow_tf32: bool) -> Engine {
    match dtype {
        Dtype::Bf16 | Dtype::F16 | Dtype::F8 => Engine::TensorCore,
        Dtype::F32 if allow_tf32 => Engine::TensorCore,
        _ => Engine::CudaCore,
    }
}

/// GEMM-like formulas (FlopCounterMode's, plus the CPU SDPA kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gemm {
    /// `mm(a[m,k], b[k,n])` = 2mkn; `_scaled_mm` too.
    Mm,
    /// `addmm(bias, a, b)` = 2mkn, bias add as elementwise.
    Addmm,
    /// `bmm(a[b,m,k], b[b,k,n])` = 2bmkn.
    Bmm,
    /// `baddbmm(bias, a, b)` = 2bmkn, bias add as elementwise.
    Baddbmm,
    /// A forward convolution; the fields give argument positions.
    Convolution(ConvArgs),
    /// `convolution_backward`, FlopCounterMode's formula.
    ConvolutionBackward,
    /// Fused attention with `[B, H, S, D]` inputs at positions 0, 1, 2 (forward).
    AttentionForward,
    /// Fused attention backward with `[B, H, S, D]` q, k, v at positions 1, 2, 3.
    AttentionBackward,
    /// The inner flash/efficient kernels, `[B, S, H, D]` q, k, v at 0, 1, 2 (forward) or
    /// 1, 2, 3 (backward); `cum_seq` is where their variable-length sequence offsets are.
    AttentionBshd { backward: bool, cum_seq: usize },
}

/// Where a forward convolution keeps its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvArgs {
    pub bias: Option<usize>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: Option<usize>,
    pub transposed: Option<usize>,
}

/// Argument layout of `aten::convolution` and the ops that share it.
const CONVOLUTION: ConvArgs = ConvArgs {
    bias: Some(2),
    stride: 3,
    padding: 4,
    dilation: Some(5),
    transposed: Some(6),
};

/// How an op is costed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// GEMM-like work.
    Matmul(Gemm),
    /// Elementwise or reduction work, per element of the broadcast of the tensor inputs.
    Elementwise { flops_per_element: u64 },
    /// Moves, copies or allocates data: 0 FLOPs.
    Copy,
    /// Reinterprets metadata only: 0 FLOPs and 0 bytes.
    View,
    /// Decomposes into the ops it dispatches, which are costed one by one.
    Composite,
}

/// One row of the conventions table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpConvention {
    /// The ATen op name as the dispatcher reports it, without overload (`aten::mm`).
    pub op: &'static str,
    pub rule: Rule,
    /// True when torch 2.11's `FlopCounterMode` registry has this op.
    pub flop_counter_mode: bool,
    /// Where its fp32 matmul work runs (bf16/fp16/fp8 work always runs on tensor cores).
    pub fp32_engine: Fp32Engine,
    /// Which of its tensor arguments it reads (for `io_bytes`).
    pub reads: Reads,
}

/// Which tensor arguments an op reads, for the unfused byte convention of
/// [`OpConvention::io_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Every tensor argument, lists included.
    All,
    /// None: its tensor arguments give only shape, dtype and device (factories such as
    /// `new_zeros`, `empty_like`).
    Metadata,
    /// Every tensor argument but the first, which it overwrites without reading
    /// (`copy_(src)`, `fill_`, `zero_`, random fills).
    AllButSelf,
    /// A gather (`embedding`, `index`, `index_select`, `gather`): of its first tensor
    /// argument, the source, only the elements it gathers — as many bytes as it writes —
    /// and every other tensor argument (the indices) in full.
    Gathered,
}

/// Which switch decides the engine of an op's fp32 matmul work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp32Engine {
    /// cuBLAS GEMMs: tensor cores only when `torch.backends.cuda.matmul.allow_tf32`.
    MatmulTf32Flag,
    /// cuDNN convolutions: tensor cores when `torch.backends.cudnn.allow_tf32`, which
    /// PyTorch turns ON by default.
    CudnnTf32Flag,
    /// Always tensor cores: the memory-efficient attention kernels compute fp32 as
    /// "fast fp32" (3×TF32, `OpMultiplyAddFastF32`) whatever the flags say.
    TensorCores,
}

/// PyTorch's two TF32 switches, which decide where fp32 matmul work runs. The default is
/// PyTorch's: matmul off, cuDNN on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tf32 {
    /// `torch.backends.cuda.matmul.allow_tf32` (cuBLAS; PyTorch's default: off).
    pub matmul: bool,
    /// `torch.backends.cudnn.allow_tf32` (cuDNN convolutions; PyTorch's default: on).
    pub cudnn: bool,
}

impl Default for Tf32 {
    fn default() -> Tf32 {
        Tf32::matmul(false)
    }
}

impl Tf32 {
    /// The matmul switch as given, the cuDNN switch at PyTorch's default (on).
    pub fn matmul(allow: bool) -> Tf32 {
        Tf32 {
            matmul: allow,
            cudnn: true,
        }
    }

    /// Whether fp32 work of an op with `engine` runs on tensor cores.
    pub fn fp32_on_tensor_cores(self, engine: Fp32Engine) -> bool {
        match engine {
            Fp32Engine::MatmulTf32Flag => self.matmul,
            Fp32Engine::CudnnTf32Flag => self.cudnn,
            Fp32Engine::TensorCores => true,
        }
    }
}

/// Elementwise FLOPs per score of a fused attention kernel, forward: scale 1 + softmax 5.
pub const FUSED_ATTENTION_FORWARD_FLOPS_PER_SCORE: u64 = 6;
/// Elementwise FLOPs per score of a fused attention kernel, backward.
pub const FUSED_ATTENTION_BACKWARD_FLOPS_PER_SCORE: u64 = 8;

const fn ew(op: &'static str, flops_per_element: u64) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Elementwise { flops_per_element },
        flop_counter_mode: false,
        fp32_engine: Fp32Engine::MatmulTf32Flag,
        reads: Reads::All,
    }
}
const fn copy(op: &'static str) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Copy,
        flop_counter_mode: false,
        fp32_engine: Fp32Engine::MatmulTf32Flag,
        reads: Reads::All,
    }
}
/// A copy that allocates (and perhaps fills) a tensor without reading its tensor
/// arguments' data: a factory.
const fn factory(op: &'static str) -> OpConvention {
    OpConvention {
        reads: Reads::Metadata,
        ..copy(op)
    }
}
/// A gather: reads of its source only what it writes.
const fn gather(op: &'static str) -> OpConvention {
    OpConvention {
        reads: Reads::Gathered,
        ..copy(op)
    }
}
/// A copy that overwrites its first argument without reading it.
const fn overwrite(op: &'static str) -> OpConvention {
    OpConvention {
        reads: Reads::AllButSelf,
        ..copy(op)
    }
}
const fn view(op: &'static str) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::View,
        flop_counter_mode: false,
        fp32_engine: Fp32Engine::MatmulTf32Flag,
        reads: Reads::All,
    }
}
const fn composite(op: &'static str) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Composite,
        flop_counter_mode: false,
        fp32_engine: Fp32Engine::MatmulTf32Flag,
        reads: Reads::All,
    }
}
const fn gemm(op: &'static str, formula: Gemm, flop_counter_mode: bool) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Matmul(formula),
        flop_counter_mode,
        fp32_engine: Fp32Engine::MatmulTf32Flag,
        reads: Reads::All,
    }
}
/// A convolution: cuDNN decides its fp32 engine by its own TF32 switch (on by default).
const fn conv(op: &'static str, formula: Gemm) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Matmul(formula),
        flop_counter_mode: true,
        fp32_engine: Fp32Engine::CudnnTf32Flag,
        reads: Reads::All,
    }
}
/// TF32 tensor-core MMAs per product of a "fast fp32" kernel ([`Fp32Engine::TensorCores`]):
/// PyTorch's memory-efficient attention takes CUTLASS's `OpMultiplyAddFastF32` for fp32 on
/// compute capability ≥ 8.0 (`DefaultGemmType<ArchTag, float>` in
/// `aten/src/ATen/native/transformers/cuda/mem_eff_attention/gemm_kernel_utils.h`):
/// big·big + big·small + small·big, to keep fp32 accuracy. The FLOPs booked are the
/// products' (2 per multiply-add); the tensor pipes execute this many times as much.
pub const FAST_FP32_MMAS_PER_PRODUCT: u64 = 3;

/// True when `op`'s fp32 work runs as 3xTF32 on tensor cores whatever the TF32 flag
/// ([`FAST_FP32_MMAS_PER_PRODUCT`] MMAs per product).
pub fn runs_fast_fp32(op: &str) -> bool {
    convention(op).is_some_and(|c| c.fp32_engine == Fp32Engine::TensorCores)
}

/// A GEMM-like kernel that runs fp32 on tensor cores ("fast fp32", 3×TF32) regardless of
/// the TF32 flag: the memory-efficient attention kernels (sm80+).
const fn fast_fp32_gemm(op: &'static str, formula: Gemm) -> OpConvention {
    OpConvention {
        op,
        rule: Rule::Matmul(formula),
        flop_counter_mode: true,
        fp32_engine: Fp32Engine::TensorCores,
        reads: Reads::All,
    }
}

/// The table. Ops absent from it are reported by name wherever they are executed.
pub const OPS: &[OpConvention] = &[
    // GEMM-like: FlopCounterMode's torch 2.11 registry, plus the CPU SDPA kernel.
    gemm("aten::mm", Gemm::Mm, true),
    gemm("aten::addmm", Gemm::Addmm, true),
    gemm("aten::bmm", Gemm::Bmm, true),
    gemm("aten::baddbmm", Gemm::Baddbmm, true),
    gemm("aten::_scaled_mm", Gemm::Mm, true),
    conv("aten::convolution", Gemm::Convolution(CONVOLUTION)),
    conv("aten::_convolution", Gemm::Convolution(CONVOLUTION)),
    conv(
        "aten::convolution_overrideable",
        Gemm::Convolution(CONVOLUTION),
    ),
    conv(
        "aten::cudnn_convolution",
        Gemm::Convolution(ConvArgs {
            bias: None,
            stride: 3,
            padding: 2,
            dilation: Some(4),
            transposed: None,
        }),
    ),
    gemm(
        "aten::_slow_conv2d_forward",
        Gemm::Convolution(ConvArgs {
            bias: Some(3),
            stride: 4,
            padding: 5,
            dilation: None,
            transposed: None,
        }),
        true,
    ),
    conv("aten::convolution_backward", Gemm::ConvolutionBackward),
    gemm(
        "aten::_scaled_dot_product_flash_attention",
        Gemm::AttentionForward,
        true,
    ),
    fast_fp32_gemm(
        "aten::_scaled_dot_product_efficient_attention",
        Gemm::AttentionForward,
    ),
    gemm(
        "aten::_scaled_dot_product_cudnn_attention",
        Gemm::AttentionForward,
        true,
    ),
    gemm(
        "aten::_scaled_dot_product_flash_attention_backward",
        Gemm::AttentionBackward,
        true,
    ),
    fast_fp32_gemm(
        "aten::_scaled_dot_product_efficient_attention_backward",
        Gemm::AttentionBackward,
    ),
    gemm(
        "aten::_scaled_dot_product_cudnn_attention_backward",
        Gemm::AttentionBackward,
        true,
    ),
    gemm(
        "aten::_flash_attention_forward",
        Gemm::AttentionBshd {
            backward: false,
            cum_seq: 3,
        },
        true,
    ),
    fast_fp32_gemm(
        "aten::_efficient_attention_forward",
        Gemm::AttentionBshd {
            backward: false,
            cum_seq: 4,
        },
    ),
    gemm(
        "aten::_flash_attention_backward",
        Gemm::AttentionBshd {
            backward: true,
            cum_seq: 6,
        },
        true,
    ),
    fast_fp32_gemm(
        "aten::_efficient_attention_backward",
        Gemm::AttentionBshd {
            backward: true,
            cum_seq: 6,
        },
    ),
    gemm(
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        Gemm::AttentionForward,
        false,
    ),
    gemm(
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        Gemm::AttentionBackward,
        false,
    ),
    // Elementwise arithmetic: FLOPs per output element.
    ew("aten::add", 1),
    ew("aten::sub", 1),
    ew("aten::rsub", 1),
    ew("aten::mul", 1),
    ew("aten::div", 1),
    ew("aten::floor_divide", 1),
    ew("aten::remainder", 1),
    ew("aten::neg", 1),
    ew("aten::reciprocal", 1),
    ew("aten::abs", 1),
    ew("aten::pow", 1),
    ew("aten::square", 1),
    ew("aten::sqrt", 1),
    ew("aten::rsqrt", 1),
    ew("aten::exp", 1),
    ew("aten::log", 1),
    ew("aten::cos", 1),
    ew("aten::sin", 1),
    ew("aten::tanh", 1),
    ew("aten::relu", 1),
    ew("aten::clamp", 1),
    ew("aten::maximum", 1),
    ew("aten::minimum", 1),
    ew("aten::eq", 1),
    ew("aten::ne", 1),
    ew("aten::gt", 1),
    ew("aten::ge", 1),
    ew("aten::lt", 1),
    ew("aten::le", 1),
    ew("aten::isneginf", 1),
    ew("aten::isposinf", 1),
    ew("aten::isinf", 1),
    ew("aten::isnan", 1),
    ew("aten::logical_not", 1),
    ew("aten::logical_and", 1),
    ew("aten::logical_or", 1),
    // `~mask` on the boolean group mask of MoEGate's group-limited routing: 0 FLOPs by
    // the integer rule; on an integer tensor, bookkeeping too.
    ew("aten::bitwise_not", 1),
    ew("aten::addcmul", 2),
    // silu(x) = x / (1 + exp(-x)): negate, exp, add, divide.
    ew("aten::silu", 4),
    // sigmoid(x) = 1 / (1 + exp(-x)): negate, exp, add, divide.
    ew("aten::sigmoid", 4),
    // Reductions, softmax and top-k: FLOPs per input element.
    ew("aten::sum", 1),
    ew("aten::mean", 1),
    ew("aten::amax", 1),
    ew("aten::max", 1),
    ew("aten::cumsum", 1),
    // all/any over a boolean tensor (the math attention's fully-masked-row test) are
    // bookkeeping and cost 0 by the integer rule; over floats, 1 per input element.
    ew("aten::all", 1),
    ew("aten::any", 1),
    // softmax: max, subtract, exp, sum, divide.
    ew("aten::softmax", 5),
    ew("aten::_softmax", 5),
    ew("aten::log_softmax", 5),
    ew("aten::_log_softmax", 5),
    // top-k: one comparison per input element.
    ew("aten::topk", 1),
    // Data movement: 0 FLOPs.
    copy("aten::to"),
    copy("aten::_to_copy"),
    copy("aten::type_as"),
    overwrite("aten::copy_"),
    copy("aten::clone"),
    copy("aten::contiguous"),
    copy("aten::cat"),
    copy("aten::stack"),
    gather("aten::index"),
    gather("aten::index_select"),
    gather("aten::gather"),
    copy("aten::scatter"),
    copy("aten::index_put"),
    copy("aten::_index_put_impl"),
    copy("aten::masked_fill"),
    copy("aten::where"),
    gather("aten::embedding"),
    copy("aten::sort"),
    copy("aten::argsort"),
    copy("aten::repeat"),
    copy("aten::repeat_interleave"),
    copy("aten::one_hot"),
    copy("aten::bincount"),
    copy("aten::nonzero"),
    copy("aten::triu"),
    copy("aten::tril"),
    copy("aten::flip"),
    factory("aten::empty"),
    factory("aten::empty_like"),
    factory("aten::empty_strided"),
    factory("aten::new_empty"),
    factory("aten::new_empty_strided"),
    factory("aten::zeros"),
    factory("aten::zeros_like"),
    factory("aten::new_zeros"),
    factory("aten::ones"),
    factory("aten::ones_like"),
    factory("aten::new_ones"),
    factory("aten::full"),
    factory("aten::full_like"),
    overwrite("aten::fill"),
    overwrite("aten::zero"),
    factory("aten::arange"),
    factory("aten::scalar_tensor"),
    // Padding copies into a larger tensor (the CUDA flash kernel pads the head dim).
    copy("aten::constant_pad_nd"),
    // Random fills: generated data, not arithmetic on data.
    factory("aten::rand"),
    factory("aten::randn"),
    factory("aten::randint"),
    factory("aten::randperm"),
    overwrite("aten::normal"),
    overwrite("aten::uniform"),
    copy("aten::resize"),
    copy("aten::_local_scalar_dense"),
    copy("aten::item"),
    // Views: metadata only.
    view("aten::view"),
    view("aten::_unsafe_view"),
    view("aten::_reshape_alias"),
    view("aten::view_as"),
    view("aten::as_strided"),
    view("aten::t"),
    view("aten::transpose"),
    // `x.mT`: the last two dims transposed (MLA's absorbed form).
    view("aten::mT"),
    view("aten::permute"),
    view("aten::expand"),
    view("aten::expand_as"),
    view("aten::unsqueeze"),
    view("aten::squeeze"),
    view("aten::slice"),
    view("aten::select"),
    view("aten::narrow"),
    view("aten::split"),
    view("aten::split_with_sizes"),
    view("aten::chunk"),
    view("aten::unbind"),
    view("aten::detach"),
    view("aten::alias"),
    view("aten::lift_fresh"),
    view("aten::resolve_conj"),
    view("aten::resolve_neg"),
    // Dropout: in eval mode it dispatches nothing; in training its kernels are costed.
    composite("aten::dropout"),
    // Composite ops: costed through the ops they dispatch.
    composite("aten::linear"),
    composite("aten::matmul"),
    composite("aten::einsum"),
    // `torch.outer(a, b)`: `a.reshape(-1, 1) * b` (MLA's rotary tables).
    composite("aten::outer"),
    composite("aten::reshape"),
    composite("aten::flatten"),
    composite("aten::scaled_dot_product_attention"),
    composite("aten::_scaled_dot_product_attention_math"),
    // softmax, then zeroes rows that were fully masked (isneginf, all, where).
    composite("aten::_safe_softmax"),
    composite("aten::pad"),
    composite("aten::_pad_enum"),
    composite("aten::conv1d"),
    composite("aten::conv2d"),
    composite("aten::conv3d"),
    composite("aten::conv_transpose1d"),
    composite("aten::conv_transpose2d"),
    composite("aten::conv_transpose3d"),
    composite("aten::_convolution_mode"),
];

/// A hasher for the op-name index: every op call of an analytic layer looks its name up,
/// so the lookup hashes 8 bytes a step (FxHash's mixing) instead of SipHash's rounds; the
/// keys are the table's own names, never adversarial.
#[derive(Default)]
struct OpNameHasher(u64);

impl Hasher for OpNameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The convention for `op`; in-place variants (`aten::mul_`) fall back to their op.
pub fn convention(op: &str) -> Option<&'static OpConvention> {
    type Index = HashMap<&'static str, &'static OpConvention, BuildHasherDefault<OpNameHasher>>;
    static INDEX: OnceLock<Index> = OnceLock::new();
    let index = INDEX.get_or_init(|| OPS.iter().map(|c| (c.op, c)).collect());
    index
        .get(op)
        .or_else(|| op.strip_suffix('_').and_then(|base| index.get(base)))
        .copied()
}

/// [`convention`] for an op name the program spells out (every op call of the analytic
/// layers): a string is looked up by name the first time it is seen, and afterwards found
/// by its address and length, which no hashing or comparing of names needs. A string at a
/// `'static` address never changes, so the answer is always [`convention`]'s. The slots are
/// shared by all threads, each filled once and then read without a lock (a `OnceLock`),
/// and are probed from the address's home slot onwards, so names whose homes collide do
/// not evict each other; a name that finds no free slot within the probes is looked up by
/// name every time (the layers spell about a hundred op names, in 256 slots).
pub(crate) fn convention_of_static(op: &'static str) -> Option<&'static OpConvention> {
    type Slot = OnceLock<(usize, usize, &'static OpConvention)>;
    const BITS: u32 = 8;
    const SLOTS: usize = 1 << BITS;
    const PROBES: usize = 8;
    static BY_ADDRESS: [Slot; SLOTS] = [const { OnceLock::new() }; SLOTS];
    let (address, len) = (op.as_ptr() as usize, op.len());
    // Fibonacci hashing of the address: its top bits pick the home slot.
    let home = address.wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as usize) >> (usize::BITS - BITS);
    for probe in 0..PROBES {
        let slot = &BY_ADDRESS[(home + probe) % SLOTS];
        match slot.get() {
            Some(&(a, l, conv)) if (a, l) == (address, len) => return Some(conv),
            Some(_) => {}
            None => {
                let conv = convention(op)?;
                // Another thread may fill the slot first, with its own name: then this
                // one is placed at a later call.
                let _ = slot.set((address, len, conv));
                return Some(conv);
            }
        }
    }
    convention(op)
}

/// A scratch copy of the table for tests of the independent witnesses: inside
/// [`scratch::with_scaled_matmul`] one GEMM op's FLOPs are multiplied by a factor, for both the
/// analytic layers and the counter (which cost ops through this table on the calling
/// thread). Both sides then still agree with each other; only a witness that does not use
/// this table (torch's own FlopCounterMode, the `--oracle`) can notice. Never used by the
/// binaries.
pub mod scratch {
    use std::cell::Cell;

    use crate::error::{Error, Result};

    thread_local! {
        static SCALED: Cell<Option<(&'static str, u64)>> = const { Cell::new(None) };
    }

    /// Runs `f` with `op`'s matmul FLOPs multiplied by `factor` on this thread.
    pub fn with_scaled_matmul<T>(op: &'static str, factor: u64, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<(&'static str, u64)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCALED.with(|s| s.set(self.0));
            }
        }
        let _restore = Restore(SCALED.with(|s| s.replace(Some((op, factor)))));
        f()
    }

    pub(super) fn scaled(op: &str, flops: u64) -> Result<u64> {
        match SCALED.with(Cell::get) {
            Some((scaled_op, factor)) if scaled_op == op => flops
                .checked_mul(factor)
                .ok_or_else(|| Error::overflow(format!("{op} scaled by {factor}"))),
            _ => Ok(flops),
        }
    }
}

/// True when `op` is a fused attention kernel (SDPA's flash, efficient, cuDNN or CPU
/// kernels, their inner kernels and backwards): the ops that say which kernel ran.
pub fn is_fused_attention(op: &str) -> bool {
    convention(op).is_some_and(|c| {
        matches!(
            c.rule,
            Rule::Matmul(
                Gemm::AttentionForward | Gemm::AttentionBackward | Gemm::AttentionBshd { .. }
            )
        )
    })
}

/// FLOP counts in both views (by op class, by engine) plus what `FlopCounterMode` sees:
/// what one op call costs, and the one struct every sum of counted ops uses (the
/// counter's totals, its op records and per-op summaries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpCost {
    /// GEMM-like FLOPs (the extended counter: registry ops and the CPU SDPA kernel).
    pub matmul_flops: u64,
    /// Elementwise, reduction, softmax and top-k FLOPs.
    pub elementwise_flops: u64,
    /// What `FlopCounterMode` counts for this op (0 for ops outside its registry).
    pub flop_counter_mode_flops: u64,
    /// FLOPs on tensor cores.
    pub tensor_core_flops: u64,
    /// FLOPs on CUDA cores.
    pub cuda_core_flops: u64,
}

impl OpCost {
    /// Field-wise sum; `None` when any field overflows 64 bits.
    pub fn checked_add(&self, other: &OpCost) -> Option<OpCost> {
        Some(OpCost {
            matmul_flops: self.matmul_flops.checked_add(other.matmul_flops)?,
            elementwise_flops: self
                .elementwise_flops
                .checked_add(other.elementwise_flops)?,
            flop_counter_mode_flops: self
                .flop_counter_mode_flops
                .checked_add(other.flop_counter_mode_flops)?,
            tensor_core_flops: self
                .tensor_core_flops
                .checked_add(other.tensor_core_flops)?,
            cuda_core_flops: self.cuda_core_flops.checked_add(other.cuda_core_flops)?,
        })
    }

    /// All FLOPs (`matmul + elementwise`), saturating.
    pub fn total(&self) -> u64 {
        self.matmul_flops.saturating_add(self.elementwise_flops)
    }
}

impl OpConvention {
    /// Costs one call of this op with `args` under the TF32 switches `tf32`. Composite
    /// ops, views and copies cost 0.
    #[inline]
    pub fn cost<A: AsArg>(&self, args: &[A], tf32: Tf32) -> Result<OpCost> {
        match self.rule {
            Rule::View | Rule::Copy | Rule::Composite => Ok(OpCost::default()),
            Rule::Elementwise { flops_per_element } => {
                let flops = elementwise_flops(self.op, args, flops_per_element)?;
                Ok(OpCost {
                    elementwise_flops: flops,
                    cuda_core_flops: flops,
                    ..OpCost::default()
                })
            }
            Rule::Matmul(formula) => {
                let (matmul, elementwise, dtype) = gemm_flops(self.op, formula, args)?;
                let matmul = scratch::scaled(self.op, matmul)?;
                let fcm = if self.flop_counter_mode { matmul } else { 0 };
                let engine = matmul_engine(dtype, tf32.fp32_on_tensor_cores(self.fp32_engine));
                let (tensor, cuda) = match engine {
                    Engine::TensorCore => (matmul, elementwise),
                    Engine::CudaCore => (0, sum(self.op, &[matmul, elementwise])?),
                };
                Ok(OpCost {
                    matmul_flops: matmul,
                    elementwise_flops: elementwise,
                    flop_counter_mode_flops: fcm,
                    tensor_core_flops: tensor,
                    cuda_core_flops: cuda,
                })
            }
        }
    }
}

impl OpConvention {
    /// Bytes one call moves under the unfused convention: the bytes of every tensor
    /// argument it reads (per [`Reads`], lists included) plus the bytes of every tensor it
    /// returns (`outputs`). A tensor counts numel × element size as the op sees it (an
    /// expanded input its expanded size). Views and composite ops move nothing: the ops a
    /// composite dispatches are costed one by one. An in-place op reads `self` and writes
    /// it (`x.mul_(y)`: x and y read, x written); one that overwrites `self` without
    /// reading it says so in its [`Reads`] (`copy_`). The analytic layers and the counter
    /// both call this, on the arguments they describe and the dispatcher saw (`outputs`: a
    /// slice, or the counter's output tensors as they are, without copying them).
    pub fn io_bytes<'t, A: AsArg>(
        &self,
        args: &[A],
        outputs: impl IntoIterator<Item = &'t TensorMeta>,
    ) -> Result<u64> {
        if matches!(self.rule, Rule::View | Rule::Composite) {
            return Ok(0);
        }
        self.io_bytes_writing(args, written_bytes(0, outputs)?)
    }

    /// [`OpConvention::io_bytes`] of a call whose outputs take `written` bytes (which a
    /// caller that also needs each output's size has added up already).
    #[inline]
    pub fn io_bytes_writing<A: AsArg>(&self, args: &[A], written: u64) -> Result<u64> {
        if matches!(self.rule, Rule::View | Rule::Composite) {
            return Ok(0);
        }
        /// `total` plus the bytes of `arg`'s tensors (a list's, item by item, out of line:
        /// the tensor case, nearly every argument, stays inline).
        #[inline(always)]
        fn add(total: u64, arg: ArgRef<'_>) -> Result<u64> {
            match arg {
                ArgRef::Tensor(t) => sum("io_bytes", &[total, t.bytes()?]),
                ArgRef::List(items) => add_list(total, items),
                _ => Ok(total),
            }
        }
        #[inline(never)]
        fn add_list<A: AsArg>(total: u64, items: &[A]) -> Result<u64> {
            items
                .iter()
                .try_fold(total, |total, item| add(total, item.as_arg()))
        }
        let mut total = 0;
        let read: &[A] = match self.reads {
            Reads::All => args,
            Reads::Metadata => &[],
            Reads::AllButSelf | Reads::Gathered => {
                let first = args
                    .iter()
                    .position(|a| matches!(a.as_arg(), ArgRef::Tensor(_)));
                first.map_or(args, |i| &args[i + 1..])
            }
        };
        for arg in read {
            total = add(total, arg.as_arg())?;
        }
        // A gather reads of its source as many bytes as it writes.
        if self.reads == Reads::Gathered {
            total = sum("io_bytes", &[total, written])?;
        }
        sum("io_bytes", &[total, written])
    }
}

/// `total` plus the bytes of `tensors`, as [`OpConvention::io_bytes`] adds what an op
/// writes (an overflow is an `io_bytes` error).
#[inline]
pub(crate) fn written_bytes<'t>(
    total: u64,
    tensors: impl IntoIterator<Item = &'t TensorMeta>,
) -> Result<u64> {
    tensors
        .into_iter()
        .try_fold(total, |total, t| sum("io_bytes", &[total, t.bytes()?]))
}

/// Bytes of the temporary an op allocates inside itself and frees before it returns, where
/// the conventions know of one; `None` for every other op. `aten::softmax` and
/// `aten::log_softmax` with a `dtype` (their `.int` overloads, what
/// `softmax(x, dim, dtype=torch.float32)` dispatches) whose input has another dtype convert
/// the input first (`input.toType(dtype)` in ATen's `SoftMax.cpp`) and run `_softmax` on
/// the copy: a temporary the size of the output, live while the op runs. Not an op output,
/// so neither side of `activation_bytes` or `peak_activation_bytes` counts it, but the
/// allocator holds it ([`crate::liveness::Peak::allocator_peak_bytes`]). On CUDA an fp16
/// input converted to fp32 runs `_softmax(half_to_float)` instead, without the copy: the
/// figure is the CPU's and bf16's, an allowance on the safe side for CUDA fp16.
pub fn converted_input_bytes<A: AsArg>(
    op: &str,
    inputs: &[A],
    outputs: &[TensorMeta],
) -> Result<Option<u64>> {
    if !matches!(op, "aten::softmax" | "aten::log_softmax") {
        return Ok(None);
    }
    // Only a `dtype` argument makes the output's dtype differ from the input's.
    match (inputs.first().map(|a| a.as_arg()), outputs.first()) {
        (Some(ArgRef::Tensor(input)), Some(out)) if input.dtype != out.dtype => {
            out.bytes().map(Some)
        }
        _ => Ok(None),
    }
}

/// True for an in-place op (`aten::mul_`, `aten::copy_`): by ATen's naming rule its name
/// ends in `_`, and it returns (and writes) its first argument instead of allocating.
pub fn is_in_place(op: &str) -> bool {
    op.ends_with('_') && !op.ends_with("::_")
}

fn tensor_at<'a, A: AsArg>(op: &str, args: &'a [A], index: usize) -> Result<&'a TensorMeta> {
    match arg_at(args, index) {
        Some(ArgRef::Tensor(t)) => Ok(t),
        other => Err(Error::op_shape(
            op,
            format!("argument {index} should be a tensor, found {other:?}"),
        )),
    }
}

fn ints_at<A: AsArg>(op: &str, args: &[A], index: usize) -> Result<Vec<i64>> {
    match arg_at(args, index) {
        Some(ArgRef::IntList(v)) => Ok(v.to_vec()),
        Some(ArgRef::Int(v)) => Ok(vec![v]),
        other => Err(Error::op_shape(
            op,
            format!("argument {index} should be an int list, found {other:?}"),
        )),
    }
}

fn dims<const N: usize>(op: &str, t: &TensorMeta) -> Result<[u64; N]> {
    <[u64; N]>::try_from(t.shape.as_slice()).map_err(|_| {
        Error::op_shape(
            op,
            format!("expected a {N}-d tensor, found shape {:?}", t.shape),
        )
    })
}

fn elementwise_flops<A: AsArg>(op: &str, args: &[A], per_element: u64) -> Result<u64> {
    let mut tensors = args.iter().filter_map(|a| match a.as_arg() {
        ArgRef::Tensor(t) => Some(t),
        _ => None,
    });
    let Some(first) = tensors.next() else {
        return Err(Error::op_shape(op, "no tensor argument"));
    };
    if !first.dtype.is_floating() {
        return Ok(0);
    }
    // The first tensor's shape, broadcast with each of the others (a unary op's is its
    // input's, not copied).
    let mut broadcast_shape: Option<Shape> = None;
    for t in tensors {
        let shape = broadcast_shape.as_deref().unwrap_or(&first.shape);
        broadcast_shape = Some(broadcast(shape, &t.shape).ok_or_else(|| {
            Error::op_shape(
                op,
                format!("shapes {:?} and {:?} do not broadcast", shape, t.shape),
            )
        })?);
    }
    let shape = broadcast_shape.as_deref().unwrap_or(&first.shape);
    // The same multiplications, in the same order, as one product of shape and factor.
    product(op, &[product(op, shape)?, per_element])
}

/// (matmul FLOPs, elementwise FLOPs inside the op, dtype that picks the engine).
fn gemm_flops<A: AsArg>(op: &str, formula: Gemm, args: &[A]) -> Result<(u64, u64, Dtype)> {
    match formula {
        Gemm::Mm => {
            let (a, b) = (tensor_at(op, args, 0)?, tensor_at(op, args, 1)?);
            Ok((mm_flops(op, a, b)?, 0, a.dtype))
        }
        Gemm::Addmm => {
            let (a, b) = (tensor_at(op, args, 1)?, tensor_at(op, args, 2)?);
            let flops = mm_flops(op, a, b)?;
            let [m, _] = dims::<2>(op, a)?;
            let [_, n] = dims::<2>(op, b)?;
            Ok((flops, product(op, &[m, n])?, a.dtype))
        }
        Gemm::Bmm => {
            let (a, b) = (tensor_at(op, args, 0)?, tensor_at(op, args, 1)?);
            Ok((bmm_flops(op, a, b)?, 0, a.dtype))
        }
        Gemm::Baddbmm => {
            let (a, b) = (tensor_at(op, args, 1)?, tensor_at(op, args, 2)?);
            let flops = bmm_flops(op, a, b)?;
            let [batch, m, _] = dims::<3>(op, a)?;
            let [_, _, n] = dims::<3>(op, b)?;
            Ok((flops, product(op, &[batch, m, n])?, a.dtype))
        }
        Gemm::Convolution(layout) => convolution_flops(op, layout, args),
        Gemm::ConvolutionBackward => {
            let grad_out = tensor_at(op, args, 0)?;
            let x = tensor_at(op, args, 1)?;
            let w = tensor_at(op, args, 2)?;
            let transposed = matches!(arg_at(args, 7), Some(ArgRef::Bool(true)));
            let mask = match arg_at(args, 10) {
                Some(ArgRef::BoolList(m)) if m.len() == 3 => [m[0], m[1], m[2]],
                other => {
                    return Err(Error::op_shape(
                        op,
                        format!("argument 10 should be output_mask[3], found {other:?}"),
                    ))
                }
            };
            let swap = |s: &[u64]| -> Vec<u64> {
                let mut v = s.to_vec();
                if v.len() >= 2 {
                    v.swap(0, 1);
                }
                v
            };
            let mut flops = 0;
            if mask[0] {
                let f = conv_flop_count(op, &grad_out.shape, &w.shape, &x.shape, !transposed)?;
                flops = sum(op, &[flops, f])?;
            }
            if mask[1] {
                let f = if transposed {
                    conv_flop_count(
                        op,
                        &swap(&grad_out.shape),
                        &swap(&x.shape),
                        &swap(&w.shape),
                        false,
                    )?
                } else {
                    conv_flop_count(
                        op,
                        &swap(&x.shape),
                        &swap(&grad_out.shape),
                        &swap(&w.shape),
                        false,
                    )?
                };
                flops = sum(op, &[flops, f])?;
            }
            Ok((flops, 0, grad_out.dtype))
        }
        Gemm::AttentionForward | Gemm::AttentionBackward => {
            let first = usize::from(formula == Gemm::AttentionBackward);
            let q = dims::<4>(op, tensor_at(op, args, first)?)?;
            let k = dims::<4>(op, tensor_at(op, args, first + 1)?)?;
            let v = dims::<4>(op, tensor_at(op, args, first + 2)?)?;
            let dtype = tensor_at(op, args, first)?.dtype;
            attention_flops(op, formula == Gemm::AttentionBackward, q, k, v, dtype)
        }
        Gemm::AttentionBshd { backward, cum_seq } => {
            let first = usize::from(backward);
            // Varlen (cumulative sequence lengths) calls pack sequences; not modelled.
            if let Some(ArgRef::Tensor(_)) = arg_at(args, cum_seq) {
                return Err(Error::op_shape(
                    op,
                    "variable-length (cum_seq) attention is not modelled",
                ));
            }
            let bshd = |t: &TensorMeta| -> Result<[u64; 4]> {
                let [b, s, h, d] = dims::<4>(op, t)?;
                Ok([b, h, s, d])
            };
            let q = bshd(tensor_at(op, args, first)?)?;
            let k = bshd(tensor_at(op, args, first + 1)?)?;
            let v = bshd(tensor_at(op, args, first + 2)?)?;
            let dtype = tensor_at(op, args, first)?.dtype;
            attention_flops(op, backward, q, k, v, dtype)
        }
    }
}

fn mm_flops(op: &str, a: &TensorMeta, b: &TensorMeta) -> Result<u64> {
    let [m, k] = dims::<2>(op, a)?;
    let [k2, n] = dims::<2>(op, b)?;
    if k != k2 {
        return Err(Error::op_shape(
            op,
            format!("inner dims {k} and {k2} differ"),
        ));
    }
    product(op, &[2, m, k, n])
}

fn bmm_flops(op: &str, a: &TensorMeta, b: &TensorMeta) -> Result<u64> {
    let [batch, m, k] = dims::<3>(op, a)?;
    let [batch2, k2, n] = dims::<3>(op, b)?;
    if k != k2 || batch != batch2 {
        return Err(Error::op_shape(
            op,
            format!("shapes {:?} and {:?} do not multiply", a.shape, b.shape),
        ));
    }
    product(op, &[2, batch, m, k, n])
}

/// FlopCounterMode's `sdpa_flop_count` (forward) and `sdpa_backward_flop_count`,
/// `[B, H, S, D]` shapes, plus the fused kernel's softmax work as elementwise FLOPs.
fn attention_flops(
    op: &str,
    backward: bool,
    q: [u64; 4],
    k: [u64; 4],
    v: [u64; 4],
    dtype: Dtype,
) -> Result<(u64, u64, Dtype)> {
    let [b, h, sq, dq] = q;
    let [_, _, sk, dk] = k;
    let [_, _, sv, dv] = v;
    if dq != dk || sk != sv {
        return Err(Error::op_shape(
            op,
            format!("query {q:?}, key {k:?} and value {v:?} do not match"),
        ));
    }
    let scores = product(op, &[b, h, sq, sk])?;
    let (head_factor, per_score) = if backward {
        (
            sum(op, &[product(op, &[3, dq])?, product(op, &[2, dv])?])?,
            FUSED_ATTENTION_BACKWARD_FLOPS_PER_SCORE,
        )
    } else {
        (sum(op, &[dq, dv])?, FUSED_ATTENTION_FORWARD_FLOPS_PER_SCORE)
    };
    Ok((
        product(op, &[2, scores, head_factor])?,
        product(op, &[scores, per_score])?,
        dtype,
    ))
}

/// FlopCounterMode's `conv_flop_count`.
fn conv_flop_count(op: &str, x: &[u64], w: &[u64], out: &[u64], transposed: bool) -> Result<u64> {
    if x.len() < 2 || w.len() < 2 {
        return Err(Error::op_shape(
            op,
            format!("convolution shapes {x:?}, {w:?}"),
        ));
    }
    let spatial = if transposed {
        &x[2..]
    } else {
        out.get(2..).unwrap_or(&[])
    };
    let mut factors = vec![2, x[0], w[0], w[1]];
    factors.extend_from_slice(&w[2..]);
    factors.extend_from_slice(spatial);
    product(op, &factors)
}

fn convolution_flops<A: AsArg>(
    op: &str,
    layout: ConvArgs,
    args: &[A],
) -> Result<(u64, u64, Dtype)> {
    let x = tensor_at(op, args, 0)?;
    let w = tensor_at(op, args, 1)?;
    let transposed = layout
        .transposed
        .is_some_and(|i| matches!(arg_at(args, i), Some(ArgRef::Bool(true))));
    let spatial_dims = x.shape.len().saturating_sub(2);
    let expand = |v: Vec<i64>, default: i64| -> Vec<i64> {
        match v.len() {
            0 => vec![default; spatial_dims],
            1 => vec![v[0]; spatial_dims],
            _ => v,
        }
    };
    let stride = expand(ints_at(op, args, layout.stride)?, 1);
    let padding = expand(ints_at(op, args, layout.padding)?, 0);
    let dilation = match layout.dilation {
        Some(i) => expand(ints_at(op, args, i)?, 1),
        None => vec![1; spatial_dims],
    };
    if stride.len() != spatial_dims
        || padding.len() != spatial_dims
        || dilation.len() != spatial_dims
    {
        return Err(Error::op_shape(
            op,
            "stride/padding/dilation do not match the input rank",
        ));
    }
    if x.shape.len() < 3 || w.shape.len() != x.shape.len() {
        return Err(Error::op_shape(
            op,
            format!(
                "input {:?} and weight {:?} are not a convolution's",
                x.shape, w.shape
            ),
        ));
    }
    // FlopCounterMode's formula uses the output's spatial size for a forward convolution
    // (and the input's for a transposed one, so no output size is needed then).
    let mut out = vec![x.shape[0], w.shape[0]];
    if !transposed {
        let geometry = |i: usize| -> Option<u64> {
            let input = i64::try_from(x.shape[2 + i]).ok()?;
            let kernel = i64::try_from(w.shape[2 + i]).ok()?;
            let reach = dilation[i].checked_mul(kernel.checked_sub(1)?)?;
            let size = input
                .checked_add(padding[i].checked_mul(2)?)?
                .checked_sub(reach)?
                .checked_sub(1)?;
            if stride[i] <= 0 || size < 0 {
                return None;
            }
            u64::try_from(size / stride[i] + 1).ok()
        };
        for i in 0..spatial_dims {
            out.push(geometry(i).ok_or_else(|| {
                Error::op_shape(
                    op,
                    format!("invalid convolution geometry at spatial dim {i}"),
                )
            })?);
        }
    }
    let flops = conv_flop_count(op, &x.shape, &w.shape, &out, transposed)?;
    let bias = match layout.bias.and_then(|i| arg_at(args, i)) {
        Some(ArgRef::Tensor(_)) if transposed => {
            // 1 per output element, as for a forward convolution: the transposed output
            // is [N, C_out = w[1]·groups, (in − 1)·stride − 2·pad + dil·(k − 1) +
            // output_padding + 1 per spatial dim] (output_padding and groups follow the
            // `transposed` flag in aten::convolution's arguments).
            let at = layout.transposed.map_or(args.len(), |i| i + 1);
            let output_padding = expand(ints_at(op, args, at)?, 0);
            let groups = match arg_at(args, at + 1) {
                Some(ArgRef::Int(g)) => u64::try_from(g).ok().filter(|&g| g > 0),
                _ => None,
            }
            .ok_or_else(|| Error::op_shape(op, "a transposed convolution's groups"))?;
            if output_padding.len() != spatial_dims {
                return Err(Error::op_shape(
                    op,
                    "output_padding does not match the input rank",
                ));
            }
            let geometry = |i: usize| -> Option<u64> {
                let input = i64::try_from(x.shape[2 + i]).ok()?;
                let kernel = i64::try_from(w.shape[2 + i]).ok()?;
                let size = input
                    .checked_sub(1)?
                    .checked_mul(stride[i])?
                    .checked_sub(padding[i].checked_mul(2)?)?
                    .checked_add(dilation[i].checked_mul(kernel.checked_sub(1)?)?)?
                    .checked_add(output_padding[i])?
                    .checked_add(1)?;
                u64::try_from(size).ok().filter(|&n| n > 0)
            };
            let mut transposed_out = vec![x.shape[0], product(op, &[w.shape[1], groups])?];
            for i in 0..spatial_dims {
                transposed_out.push(geometry(i).ok_or_else(|| {
                    Error::op_shape(
                        op,
                        format!("invalid transposed convolution geometry at spatial dim {i}"),
                    )
                })?);
            }
            product(op, &transposed_out)?
        }
        Some(ArgRef::Tensor(_)) => product(op, &out)?,
        _ => 0,
    };
    Ok((flops, bias, x.dtype))
}

/// The conventions as JSON, echoed into every report so a reader knows what was counted.
pub fn conventions_json() -> Value {
    let ops: Vec<Value> = OPS
        .iter()
        .map(|c| {
            let (rule, detail) = match c.rule {
                Rule::Matmul(g) => ("matmul", json!(format!("{g:?}"))),
                Rule::Elementwise { flops_per_element } => {
                    ("elementwise", json!(flops_per_element))
                }
                Rule::Copy => ("copy", Value::Null),
                Rule::View => ("view", Value::Null),
                Rule::Composite => ("composite", Value::Null),
            };
            let mut row =
                json!({ "op": c.op, "rule": rule, "flop_counter_mode": c.flop_counter_mode });
            if let Rule::Matmul(_) = c.rule {
                row["fp32_engine"] = json!(match c.fp32_engine {
                    Fp32Engine::MatmulTf32Flag => "tensor cores if matmul TF32 is allowed",
                    Fp32Engine::CudnnTf32Flag =>
                        "tensor cores if cuDNN TF32 is allowed (PyTorch default: on)",
                    Fp32Engine::TensorCores => "tensor cores (3xTF32) always",
                });
            }
            match c.rule {
                Rule::Matmul(_) => row["formula"] = detail,
                Rule::Elementwise { .. } => row["flops_per_element"] = detail,
                _ => {}
            }
            row
        })
        .collect();
    json!({
        "flop": "2 FLOPs per multiply-accumulate",
        "matmul": "FlopCounterMode (torch 2.11) formulas; addmm/baddbmm/convolution bias adds are elementwise FLOPs (1 per output element)",
        "attention": "full S_q x S_kv rectangle, causal masking never discounted",
        "fused_attention_elementwise_per_score": {
            "forward": FUSED_ATTENTION_FORWARD_FLOPS_PER_SCORE,
            "backward": FUSED_ATTENTION_BACKWARD_FLOPS_PER_SCORE,
        },
        "elementwise": "flops_per_element x elements of the broadcast of the tensor inputs; 0 when the first tensor input is an integer or boolean tensor",
        "engines": "NVIDIA sm80+: bf16/fp16/fp8 matmul work on tensor cores; fp32 matmul work by each op's fp32_engine (cuBLAS GEMMs: tensor cores only if matmul TF32 is allowed; cuDNN convolutions: if cuDNN TF32 is allowed, PyTorch's default; memory-efficient attention: always, 3xTF32); everything else on CUDA cores",
        "in_place": "op_ follows the rule of op",
        "ops": ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[u64], dtype: Dtype) -> Arg {
        Arg::Tensor(TensorMeta::new(shape, dtype))
    }

    /// `aten::convolution_backward`'s arguments for a conv2d with weight [8, 3, 3, 3]
    /// (bias of 8, dilation 1, groups 1, not transposed): `grad_out`, input `x`, square
    /// `stride` and `padding`, and which gradients `mask` asks for.
    fn conv2d_backward_args(
        grad: &[u64],
        x: &[u64],
        stride: i64,
        padding: i64,
        mask: Vec<bool>,
    ) -> Vec<Arg> {
        vec![
            t(grad, Dtype::F32),
            t(x, Dtype::F32),
            t(&[8, 3, 3, 3], Dtype::F32),
            Arg::IntList(vec![8]),
            Arg::IntList(vec![stride, stride]),
            Arg::IntList(vec![padding, padding]),
            Arg::IntList(vec![1, 1]),
            Arg::Bool(false),
            Arg::IntList(vec![0, 0]),
            Arg::Int(1),
            Arg::BoolList(mask),
        ]
    }

    fn cost(op: &str, args: &[Arg]) -> OpCost {
        convention(op)
            .unwrap_or_else(|| panic!("{op} missing"))
            .cost(args, Tf32::matmul(false))
            .unwrap()
    }

    #[test]
    fn io_bytes_read_inputs_and_write_outputs_by_hand() {
        let io = |op: &str, args: &[Arg], outputs: &[TensorMeta]| {
            convention(op).unwrap().io_bytes(args, outputs).unwrap()
        };
        let f32 = |shape: &[u64]| TensorMeta::new(shape, Dtype::F32);
        // mm [64, 32] @ [32, 16] fp32: 8 KiB + 2 KiB read, 4 KiB written.
        let mm = io(
            "aten::mm",
            &[t(&[64, 32], Dtype::F32), t(&[32, 16], Dtype::F32)],
            &[f32(&[64, 16])],
        );
        assert_eq!(mm, 64 * 32 * 4 + 32 * 16 * 4 + 64 * 16 * 4);
        // cat reads every tensor of its list.
        let cat = io(
            "aten::cat",
            &[
                Arg::List(vec![t(&[10, 4], Dtype::F32), t(&[10, 4], Dtype::F32)]),
                Arg::Int(0),
            ],
            &[f32(&[20, 4])],
        );
        assert_eq!(cat, 2 * 160 + 320);
        // In place: x and y read, x written.
        let mul_ = io(
            "aten::mul_",
            &[t(&[8], Dtype::F32), t(&[8], Dtype::F32)],
            &[f32(&[8])],
        );
        assert_eq!(mul_, 3 * 32);
        // copy_ overwrites self without reading it; a factory reads nothing.
        let copy_ = io(
            "aten::copy_",
            &[t(&[8], Dtype::Bf16), t(&[8], Dtype::F32), Arg::Bool(false)],
            &[TensorMeta::new(&[8], Dtype::Bf16)],
        );
        assert_eq!(copy_, 32 + 16);
        // A gather reads of its source only what it writes, and its indices in full.
        let embedding = io(
            "aten::embedding",
            &[t(&[1000, 8], Dtype::F32), t(&[3], Dtype::I64)],
            &[f32(&[3, 8])],
        );
        assert_eq!(embedding, 96 + 24 + 96);
        // So do advanced indexing and index_select (the MoE's `x[idxs // k]`).
        let index = io(
            "aten::index",
            &[t(&[1000, 8], Dtype::F32), t(&[3], Dtype::I64)],
            &[f32(&[3, 8])],
        );
        assert_eq!(index, 96 + 24 + 96);
        let index_select = io(
            "aten::index_select",
            &[t(&[1000, 8], Dtype::F32), Arg::Int(0), t(&[3], Dtype::I64)],
            &[f32(&[3, 8])],
        );
        assert_eq!(index_select, 96 + 24 + 96);
        let zeros = io("aten::new_zeros", &[t(&[1000], Dtype::F32)], &[f32(&[4])]);
        assert_eq!(zeros, 16);
        // Views and composites move nothing themselves.
        assert_eq!(io("aten::view", &[t(&[8], Dtype::F32)], &[f32(&[2, 4])]), 0);
        assert_eq!(io("aten::linear", &[t(&[8], Dtype::F32)], &[f32(&[8])]), 0);
        assert!(is_in_place("aten::mul_") && !is_in_place("aten::_unsafe_view"));
        assert!(!is_in_place("aten::mul"));
    }

    /// A softmax whose output dtype differs from its input's converts the input first: a
    /// temporary of the output's size; none when the dtypes match or for other ops.
    #[test]
    fn a_converting_softmax_holds_a_temporary_of_its_output_size() {
        let out = [TensorMeta::new(&[2, 3], Dtype::F32)];
        let bf16 = [t(&[2, 3], Dtype::Bf16), Arg::Int(-1), Arg::None];
        assert_eq!(
            converted_input_bytes("aten::softmax", &bf16, &out).unwrap(),
            Some(24)
        );
        let f32 = [t(&[2, 3], Dtype::F32), Arg::Int(-1), Arg::None];
        assert_eq!(
            converted_input_bytes("aten::softmax", &f32, &out).unwrap(),
            None
        );
        assert_eq!(
            converted_input_bytes("aten::exp", &bf16, &out).unwrap(),
            None
        );
    }

    /// Only the memory-efficient attention kernels run fp32 as 3×TF32 whatever the flag
    /// (CUTLASS's `OpMultiplyAddFastF32`); the flash and cuDNN kernels take no fp32, and
    /// plain GEMMs follow the TF32 flag.
    #[test]
    fn only_the_efficient_attention_kernels_run_fast_fp32() {
        for op in [
            "aten::_efficient_attention_forward",
            "aten::_efficient_attention_backward",
            "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_efficient_attention_backward",
        ] {
            assert!(runs_fast_fp32(op), "{op}");
        }
        for op in [
            "aten::mm",
            "aten::bmm",
            "aten::_flash_attention_forward",
            "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_cudnn_attention",
            "aten::mul",
            "aten::made_up",
        ] {
            assert!(!runs_fast_fp32(op), "{op}");
        }
    }

    /// The scratch table scales the one op it names, on this thread, while its closure
    /// runs: what the witness tests rely on to plant a wrong rule.
    #[test]
    fn a_scaled_matmul_scales_only_its_op_and_only_inside() {
        let mm = [t(&[4, 8], Dtype::F32), t(&[8, 2], Dtype::F32)];
        let bmm = [t(&[3, 4, 8], Dtype::F32), t(&[3, 8, 2], Dtype::F32)];
        let plain = (cost("aten::mm", &mm), cost("aten::bmm", &bmm));
        assert_eq!((plain.0.matmul_flops, plain.1.matmul_flops), (128, 384));
        let inside = scratch::with_scaled_matmul("aten::mm", 3, || {
            let other_thread = std::thread::scope(|s| {
                s.spawn(|| cost("aten::mm", &mm).matmul_flops)
                    .join()
                    .unwrap()
            });
            (cost("aten::mm", &mm), cost("aten::bmm", &bmm), other_thread)
        });
        assert_eq!(inside.0.matmul_flops, 3 * 128, "the named op");
        assert_eq!(inside.1, plain.1, "another op");
        assert_eq!(inside.2, 128, "another thread");
        assert_eq!(cost("aten::mm", &mm), plain.0, "after the closure");
        let unwound = std::panic::catch_unwind(|| {
            scratch::with_scaled_matmul("aten::mm", 5, || panic!("a witness test that fails"))
        });
        assert!(unwound.is_err());
        assert_eq!(cost("aten::mm", &mm), plain.0, "after an unwind too");
    }

    #[test]
    fn op_costs_add_field_by_field_and_total_their_flops() {
        let a = OpCost {
            matmul_flops: 1,
            elementwise_flops: 2,
            flop_counter_mode_flops: 3,
            tensor_core_flops: 4,
            cuda_core_flops: 5,
        };
        let b = OpCost {
            matmul_flops: 10,
            elementwise_flops: 20,
            flop_counter_mode_flops: 30,
            tensor_core_flops: 40,
            cuda_core_flops: 50,
        };
        let sum = a.checked_add(&b).unwrap();
        assert_eq!(
            sum,
            OpCost {
                matmul_flops: 11,
                elementwise_flops: 22,
                flop_counter_mode_flops: 33,
                tensor_core_flops: 44,
                cuda_core_flops: 55,
            }
        );
        assert_eq!(sum.total(), 33, "matmul + elementwise");
        for field in 0..5 {
            let mut huge = OpCost::default();
            let slot = match field {
                0 => &mut huge.matmul_flops,
                1 => &mut huge.elementwise_flops,
                2 => &mut huge.flop_counter_mode_flops,
                3 => &mut huge.tensor_core_flops,
                _ => &mut huge.cuda_core_flops,
            };
            *slot = u64::MAX;
            assert_eq!(huge.checked_add(&b), None, "field {field} overflows");
        }
        let saturated = OpCost {
            matmul_flops: u64::MAX,
            elementwise_flops: 1,
            ..OpCost::default()
        };
        assert_eq!(saturated.total(), u64::MAX);
    }

    /// fp8 GEMMs (`_scaled_mm`) run on tensor cores, like bf16 and fp16.
    #[test]
    fn fp8_gemms_run_on_tensor_cores() {
        let c = cost(
            "aten::_scaled_mm",
            &[t(&[16, 32], Dtype::F8), t(&[32, 8], Dtype::F8)],
        );
        assert_eq!(
            (c.matmul_flops, c.tensor_core_flops, c.cuda_core_flops),
            (8192, 8192, 0)
        );
    }

    /// Two descriptions are equal when shape and dtype are, whichever allocation holds
    /// them (the same tensor before and after a builder allocates it).
    #[test]
    fn tensors_are_equal_by_shape_and_dtype_not_storage() {
        let a = TensorMeta::new(&[3, 5], Dtype::Bf16);
        let held = a.clone().held_by(Some(StorageId {
            builder: NonZeroU64::new(7).unwrap(),
            index: 2,
        }));
        assert_eq!(a, held);
        assert_ne!(a, TensorMeta::new(&[3, 5], Dtype::F32), "another dtype");
        assert_ne!(a, TensorMeta::new(&[5, 3], Dtype::Bf16), "another shape");
        assert_ne!(a, TensorMeta::new(&[5, 3], Dtype::F32), "both differ");
    }

    #[test]
    fn tensor_bytes_or_the_reason_there_are_none() {
        assert_eq!(TensorMeta::new(&[3, 5], Dtype::Bf16).bytes().unwrap(), 30);
        assert_eq!(TensorMeta::new(&[], Dtype::F32).bytes().unwrap(), 4);
        assert_eq!(
            TensorMeta::new(&[u64::MAX, 0], Dtype::F32).bytes().unwrap(),
            0
        );
        let no_size = TensorMeta::new(&[2], Dtype::Other).bytes().unwrap_err();
        assert!(no_size.to_string().contains("no byte size"), "{no_size}");
        let elements = TensorMeta::new(&[u64::MAX, 2], Dtype::F32)
            .bytes()
            .unwrap_err();
        assert!(
            elements.to_string().contains("tensor element count"),
            "{elements}"
        );
        let bytes = TensorMeta::new(&[u64::MAX / 2], Dtype::F32)
            .bytes()
            .unwrap_err();
        assert!(bytes.to_string().contains("tensor bytes"), "{bytes}");
    }

    #[test]
    fn table_has_no_duplicates_and_every_fcm_registry_op() {
        let mut names: Vec<&str> = OPS.iter().map(|c| c.op).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate op in the table");
        // torch 2.11's FlopCounterMode registry (flop_counter.py): 21 op packets.
        let registry = [
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::_scaled_mm",
            "aten::convolution",
            "aten::_convolution",
            "aten::cudnn_convolution",
            "aten::convolution_overrideable",
            "aten::_slow_conv2d_forward",
            "aten::convolution_backward",
            "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_cudnn_attention",
            "aten::_scaled_dot_product_efficient_attention_backward",
            "aten::_scaled_dot_product_flash_attention_backward",
            "aten::_scaled_dot_product_cudnn_attention_backward",
            "aten::_flash_attention_forward",
            "aten::_efficient_attention_forward",
            "aten::_flash_attention_backward",
            "aten::_efficient_attention_backward",
        ];
        assert_eq!(registry.len(), 21);
        for op in registry {
            assert!(convention(op).unwrap().flop_counter_mode, "{op}");
        }
        let fcm = OPS.iter().filter(|c| c.flop_counter_mode).count();
        assert_eq!(fcm, 21, "only registry ops are FlopCounterMode-visible");
    }

    #[test]
    fn lookup_by_address_answers_as_lookup_by_name() {
        // Twice each: the second answer comes from the address cache, or (a slot taken)
        // from the name: either way the same.
        for _ in 0..2 {
            for c in OPS {
                assert_eq!(convention_of_static(c.op), Some(c), "{}", c.op);
            }
            assert_eq!(convention_of_static("aten::mul_"), convention("aten::mul_"));
            assert_eq!(convention_of_static("aten::no_such_op"), None);
        }
    }

    #[test]
    fn threads_filling_the_shared_cache_at_once_get_the_same_answers() {
        // Every op name, from eight threads at once, each in its own order: the slots are
        // filled concurrently, and every answer is still the name lookup's.
        std::thread::scope(|scope| {
            for t in 0..8 {
                scope.spawn(move || {
                    for round in 0..50 {
                        for i in 0..OPS.len() {
                            let c = &OPS[(i * 7 + t + round) % OPS.len()];
                            assert_eq!(convention_of_static(c.op), Some(c), "{}", c.op);
                        }
                        assert_eq!(convention_of_static("aten::no_such_op"), None);
                    }
                });
            }
        });
    }

    #[test]
    fn in_place_variants_follow_their_op() {
        assert_eq!(convention("aten::mul_").unwrap().op, "aten::mul");
        assert_eq!(
            convention("aten::index_put_").unwrap().op,
            "aten::index_put"
        );
        assert!(convention("aten::no_such_op").is_none());
        assert!(convention("aten::no_such_op_").is_none());
    }

    #[test]
    fn gemm_formulas_match_flop_counter_mode() {
        let c = cost(
            "aten::mm",
            &[t(&[512, 1280], Dtype::Bf16), t(&[1280, 6848], Dtype::Bf16)],
        );
        assert_eq!(c.matmul_flops, 2 * 512 * 1280 * 6848);
        assert_eq!(c.flop_counter_mode_flops, c.matmul_flops);
        assert_eq!(c.tensor_core_flops, c.matmul_flops);
        let c = cost(
            "aten::addmm",
            &[
                t(&[32], Dtype::F32),
                t(&[10, 16], Dtype::F32),
                t(&[16, 32], Dtype::F32),
            ],
        );
        assert_eq!(c.matmul_flops, 10240);
        assert_eq!(c.elementwise_flops, 320, "bias add is elementwise");
        assert_eq!(
            c.flop_counter_mode_flops, 10240,
            "FlopCounterMode ignores the bias"
        );
        assert_eq!(
            c.cuda_core_flops,
            10240 + 320,
            "fp32 without TF32 is CUDA-core work"
        );
        let c = cost(
            "aten::bmm",
            &[t(&[4, 8, 16], Dtype::F32), t(&[4, 16, 2], Dtype::F32)],
        );
        assert_eq!(c.matmul_flops, 2 * 4 * 8 * 16 * 2);
        let c = cost(
            "aten::baddbmm",
            &[
                t(&[4, 8, 2], Dtype::F32),
                t(&[4, 8, 16], Dtype::F32),
                t(&[4, 16, 2], Dtype::F32),
            ],
        );
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (2 * 4 * 8 * 16 * 2, 4 * 8 * 2)
        );
    }

    #[test]
    fn attention_is_the_full_rectangle_plus_fused_softmax() {
        // Keys and values of different lengths (or query and key of different widths)
        // are no attention: an error, not a count.
        for (k, v) in [([1, 1, 6, 8], [1, 1, 5, 8]), ([1, 1, 6, 4], [1, 1, 6, 8])] {
            assert!(convention("aten::_scaled_dot_product_flash_attention")
                .unwrap()
                .cost(
                    &[
                        t(&[1, 1, 4, 8], Dtype::Bf16),
                        t(&k, Dtype::Bf16),
                        t(&v, Dtype::Bf16)
                    ],
                    Tf32::matmul(false)
                )
                .is_err());
        }
        let (b, h, s, d) = (1, 10, 512, 128);
        let q = t(&[b, h, s, d], Dtype::Bf16);
        let c = cost(
            "aten::_scaled_dot_product_cudnn_attention",
            &[q.clone(), q.clone(), q.clone()],
        );
        assert_eq!(
            c.matmul_flops, 1_342_177_280,
            "4·B·H·S²·d, docs/deepseek-ocr.md"
        );
        assert_eq!(c.elementwise_flops, 6 * b * h * s * s);
        assert_eq!(c.flop_counter_mode_flops, c.matmul_flops);
        let cpu = cost(
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            &[q.clone(), q.clone(), q.clone()],
        );
        assert_eq!(cpu.matmul_flops, 1_342_177_280);
        assert_eq!(
            cpu.flop_counter_mode_flops, 0,
            "invisible to FlopCounterMode"
        );
        // MLA shape from flop-counter.md: dq = 192, dv = 128, B = 2, H = 16, S = 512.
        let q = t(&[2, 16, 512, 192], Dtype::Bf16);
        let v = t(&[2, 16, 512, 128], Dtype::Bf16);
        let fwd = cost(
            "aten::_scaled_dot_product_cudnn_attention",
            &[q.clone(), q.clone(), v.clone()],
        );
        assert_eq!(fwd.matmul_flops, 5_368_709_120);
        let bwd = cost(
            "aten::_scaled_dot_product_cudnn_attention_backward",
            &[t(&[2, 16, 512, 128], Dtype::Bf16), q.clone(), q, v],
        );
        assert_eq!(bwd.matmul_flops, 13_958_643_712);
    }

    #[test]
    fn bshd_inner_kernels_are_transposed_before_counting() {
        // flop-counter.md 1.8.1: B=2, S=512, H=16, D=128 is 4,294,967,296, not 134,217,728.
        let q = t(&[2, 512, 16, 128], Dtype::F32);
        let c = cost(
            "aten::_efficient_attention_forward",
            &[q.clone(), q.clone(), q],
        );
        assert_eq!(c.matmul_flops, 4_294_967_296);
    }

    #[test]
    fn elementwise_counts_per_broadcast_element_and_skips_integers() {
        let c = cost(
            "aten::mul",
            &[t(&[512, 1280], Dtype::F32), t(&[512, 1], Dtype::F32)],
        );
        assert_eq!(c.elementwise_flops, 512 * 1280);
        assert_eq!(c.cuda_core_flops, 512 * 1280);
        let c = cost("aten::silu", &[t(&[3, 7], Dtype::Bf16)]);
        assert_eq!(c.elementwise_flops, 4 * 21);
        let c = cost(
            "aten::softmax",
            &[
                t(&[512, 64], Dtype::F32),
                Arg::Int(-1),
                Arg::Other("ScalarType".into()),
            ],
        );
        assert_eq!(c.elementwise_flops, 5 * 512 * 64);
        let c = cost(
            "aten::sum",
            &[t(&[512, 64], Dtype::I64), Arg::IntList(vec![0])],
        );
        assert_eq!(c.elementwise_flops, 0, "integer bookkeeping");
        assert!(convention("aten::mul")
            .unwrap()
            .cost(
                &[t(&[2, 3], Dtype::F32), t(&[4], Dtype::F32)],
                Tf32::matmul(false)
            )
            .is_err());
    }

    #[test]
    fn tf32_moves_fp32_gemms_to_tensor_cores() {
        let args = [t(&[8, 8], Dtype::F32), t(&[8, 8], Dtype::F32)];
        let conv = convention("aten::mm").unwrap();
        assert_eq!(
            conv.cost(&args, Tf32::matmul(false))
                .unwrap()
                .tensor_core_flops,
            0
        );
        assert_eq!(
            conv.cost(&args, Tf32::matmul(true))
                .unwrap()
                .tensor_core_flops,
            1024
        );
    }

    #[test]
    fn fp32_convolutions_follow_cudnns_tf32_switch_not_the_matmul_one() {
        // Conv2d(3→8, k=1) on [1,3,2,2] fp32: 2·1·8·3·1·2·2 = 192 FLOPs.
        let args = [
            t(&[1, 3, 2, 2], Dtype::F32),
            t(&[8, 3, 1, 1], Dtype::F32),
            Arg::None,
            Arg::IntList(vec![1, 1]),
            Arg::IntList(vec![0, 0]),
            Arg::IntList(vec![1, 1]),
            Arg::Bool(false),
        ];
        let conv = convention("aten::convolution").unwrap();
        assert_eq!(conv.fp32_engine, Fp32Engine::CudnnTf32Flag);
        // PyTorch's defaults: matmul TF32 off, cuDNN TF32 on → tensor cores.
        assert_eq!(
            conv.cost(&args, Tf32::matmul(false))
                .unwrap()
                .tensor_core_flops,
            192
        );
        let off = Tf32 {
            matmul: true,
            cudnn: false,
        };
        assert_eq!(conv.cost(&args, off).unwrap().tensor_core_flops, 0);
    }

    #[test]
    fn fp32_efficient_attention_runs_on_tensor_cores_whatever_the_tf32_flag() {
        // [B=1, H=2, S=4, d=8] fp32: 4·1·2·4·4·8 = 1024 matmul FLOPs, 6 per score.
        let qkv = t(&[1, 2, 4, 8], Dtype::F32);
        let args = [qkv.clone(), qkv.clone(), qkv, Arg::Bool(false)];
        for op in [
            "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_efficient_attention_backward",
        ] {
            assert_eq!(
                convention(op).unwrap().fp32_engine,
                Fp32Engine::TensorCores,
                "{op}"
            );
        }
        let eff = convention("aten::_scaled_dot_product_efficient_attention").unwrap();
        for tf32 in [false, true] {
            let c = eff
                .cost(
                    &args,
                    Tf32 {
                        matmul: tf32,
                        cudnn: tf32,
                    },
                )
                .unwrap();
            assert_eq!(c.matmul_flops, 1024);
            assert_eq!(c.tensor_core_flops, 1024, "tf32 = {tf32}");
            assert_eq!(
                c.cuda_core_flops,
                6 * 2 * 4 * 4,
                "its softmax stays on CUDA cores"
            );
        }
        // The same inputs through the CPU flash kernel or a plain fp32 GEMM follow the flag.
        let cpu = convention("aten::_scaled_dot_product_flash_attention_for_cpu").unwrap();
        assert_eq!(cpu.fp32_engine, Fp32Engine::MatmulTf32Flag);
        assert_eq!(
            cpu.cost(&args, Tf32::matmul(false))
                .unwrap()
                .tensor_core_flops,
            0
        );
        let mm = convention("aten::mm").unwrap();
        assert_eq!(mm.fp32_engine, Fp32Engine::MatmulTf32Flag);
    }

    #[test]
    fn padding_and_math_attention_ops_are_costed() {
        // The flash kernel's head-dim padding moves data only.
        let pad = convention("aten::constant_pad_nd").unwrap();
        assert_eq!(pad.rule, Rule::Copy);
        assert_eq!(convention("aten::pad").unwrap().rule, Rule::Composite);
        assert_eq!(convention("aten::_pad_enum").unwrap().rule, Rule::Composite);
        assert_eq!(
            convention("aten::_safe_softmax").unwrap().rule,
            Rule::Composite
        );
        assert_eq!(convention("aten::scalar_tensor").unwrap().rule, Rule::Copy);
        // isneginf over fp32 scores: 1 per element; all over its boolean result: 0.
        let scores = t(&[2, 3, 5], Dtype::F32);
        assert_eq!(cost("aten::isneginf", &[scores]).elementwise_flops, 30);
        let mask = t(&[2, 3, 5], Dtype::Bool);
        assert_eq!(
            cost("aten::all", &[mask.clone(), Arg::Int(-1)]).elementwise_flops,
            0
        );
        assert_eq!(cost("aten::logical_not", &[mask]).elementwise_flops, 0);
        let floats = t(&[2, 3, 5], Dtype::F32);
        assert_eq!(cost("aten::all", &[floats]).elementwise_flops, 30);
    }

    #[test]
    fn convolution_forward_and_backward_follow_flop_counter_mode() {
        // Conv2d(3→8, k=3, stride 1, pad 1) on [2,3,16,16]: 2·2·8·3·9·16·16.
        let args = [
            t(&[2, 3, 16, 16], Dtype::F32),
            t(&[8, 3, 3, 3], Dtype::F32),
            Arg::None,
            Arg::IntList(vec![1, 1]),
            Arg::IntList(vec![1, 1]),
            Arg::IntList(vec![1, 1]),
            Arg::Bool(false),
            Arg::IntList(vec![0, 0]),
            Arg::Int(1),
        ];
        let fwd = cost("aten::convolution", &args);
        assert_eq!(fwd.matmul_flops, 2 * 2 * 8 * 3 * 9 * 16 * 16);
        // convolution_backward of grad_out, x and w [8,3,3,3] (stride, padding), grad input
        // and grad weight asked for.
        let backward = |grad: &[u64], x: &[u64], stride: i64, padding: i64| {
            cost(
                "aten::convolution_backward",
                &conv2d_backward_args(grad, x, stride, padding, vec![true, true, false]),
            )
        };
        let bwd = backward(&[2, 8, 16, 16], &[2, 3, 16, 16], 1, 1);
        assert_eq!(
            bwd.matmul_flops,
            2 * fwd.matmul_flops,
            "grad input + grad weight"
        );
        // FlopCounterMode (torch 2.11) on conv_transpose2d(x [2,8,5,5], w [8,3,3,3],
        // b [3], stride 2): 21,600, output [2,3,11,11], so 726 bias adds; with groups 2
        // (x [2,6,5,5], w [6,2,3,3], b [4]): 10,800, output [2,4,11,11]; with padding 1
        // and output_padding 1: 21,600 again, output [2,3,10,10].
        let transposed = |x: &[u64], w: &[u64], pad: i64, out_pad: i64, groups: i64| {
            cost(
                "aten::convolution",
                &[
                    t(x, Dtype::F32),
                    t(w, Dtype::F32),
                    t(&[w[1] * groups as u64], Dtype::F32),
                    Arg::IntList(vec![2, 2]),
                    Arg::IntList(vec![pad, pad]),
                    Arg::IntList(vec![1, 1]),
                    Arg::Bool(true),
                    Arg::IntList(vec![out_pad, out_pad]),
                    Arg::Int(groups),
                ],
            )
        };
        let c = transposed(&[2, 8, 5, 5], &[8, 3, 3, 3], 0, 0, 1);
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (21_600, 2 * 3 * 11 * 11)
        );
        let c = transposed(&[2, 6, 5, 5], &[6, 2, 3, 3], 0, 0, 2);
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (10_800, 2 * 4 * 11 * 11)
        );
        let c = transposed(&[2, 8, 5, 5], &[8, 3, 3, 3], 1, 1, 1);
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (21_600, 2 * 3 * 10 * 10)
        );
        // A strided backward (FlopCounterMode: 27,648 for conv2d(x [2,3,9,9], w [8,3,3,3],
        // stride 2), grad input and grad weight 13,824 each): the input's spatial size
        // is not the output's.
        let strided = backward(&[2, 8, 4, 4], &[2, 3, 9, 9], 2, 0);
        assert_eq!(strided.matmul_flops, 27_648);
    }

    #[test]
    fn malformed_convolutions_are_errors_not_panics() {
        let conv = convention("aten::convolution").unwrap();
        let args = |x: &[u64], w: &[u64], padding: i64, transposed: bool| {
            vec![
                t(x, Dtype::F32),
                t(w, Dtype::F32),
                Arg::None,
                Arg::IntList(vec![1]),
                Arg::IntList(vec![padding]),
                Arg::IntList(vec![1]),
                Arg::Bool(transposed),
                Arg::IntList(vec![0]),
                Arg::Int(1),
            ]
        };
        assert!(conv
            .cost(&args(&[1, 3, 8, 8], &[], 0, false), Tf32::matmul(false))
            .is_err());
        assert!(conv
            .cost(
                &args(&[1, 3, 8, 8], &[8, 3, 3], 0, false),
                Tf32::matmul(false)
            )
            .is_err());
        assert!(conv
            .cost(
                &args(&[1, 3, 8, 8], &[8, 3, 3, 3], i64::MAX, false),
                Tf32::matmul(false)
            )
            .is_err());
        assert!(conv
            .cost(
                &args(&[1, 3, 1, 1], &[8, 3, 3, 3], 0, false),
                Tf32::matmul(false)
            )
            .is_err());
        // A transposed convolution of a 1×1 input is valid; its FLOPs use the input size.
        let c = conv
            .cost(
                &args(&[1, 3, 1, 1], &[3, 8, 3, 3], 0, true),
                Tf32::matmul(false),
            )
            .unwrap();
        assert_eq!(c.matmul_flops, 2 * 3 * 8 * 9);
    }

    /// The `[B, S, H, D]` kernels with every size distinct (a decode step: one query
    /// against a longer cache, value heads narrower than query heads, as in MLA), so that
    /// reading one operand in another's place changes the count. FlopCounterMode's
    /// `sdpa_flop_count`: 2·B·H·Sq·Sk·(Dq + Dv); its backward:
    /// 2·B·H·Sq·Sk·(3·Dq + 2·Dv) (torch 2.11's functions give 2,016 and 5,376 for these
    /// sizes); the fused kernels' softmax work per score on top.
    #[test]
    fn bshd_attention_reads_query_key_and_value_where_they_are() {
        let (b, sq, sk, h, dq, dv) = (2, 1, 7, 3, 16, 8);
        let q = t(&[b, sq, h, dq], Dtype::Bf16);
        let k = t(&[b, sk, h, dq], Dtype::Bf16);
        let v = t(&[b, sk, h, dv], Dtype::Bf16);
        let scores = b * h * sq * sk;
        for op in [
            "aten::_flash_attention_forward",
            "aten::_efficient_attention_forward",
        ] {
            let c = cost(op, &[q.clone(), k.clone(), v.clone(), Arg::None, Arg::None]);
            assert_eq!(c.matmul_flops, 2 * scores * (dq + dv), "{op}");
            assert_eq!(
                c.elementwise_flops,
                scores * FUSED_ATTENTION_FORWARD_FLOPS_PER_SCORE,
                "{op}"
            );
        }
        let grad = t(&[b, sq, h, dv], Dtype::Bf16);
        for op in [
            "aten::_flash_attention_backward",
            "aten::_efficient_attention_backward",
        ] {
            let c = cost(op, &[grad.clone(), q.clone(), k.clone(), v.clone()]);
            assert_eq!(c.matmul_flops, 2 * scores * (3 * dq + 2 * dv), "{op}");
            assert_eq!(
                c.elementwise_flops,
                scores * FUSED_ATTENTION_BACKWARD_FLOPS_PER_SCORE,
                "{op}"
            );
        }
        // A key narrower than the query, or a value shorter than the key: no attention.
        let narrow_k = t(&[b, sk, h, dv], Dtype::Bf16);
        let short_v = t(&[b, sk - 1, h, dv], Dtype::Bf16);
        let flash = convention("aten::_flash_attention_forward").unwrap();
        for bad in [[&q, &narrow_k, &v], [&q, &k, &short_v]] {
            let args = [bad[0].clone(), bad[1].clone(), bad[2].clone()];
            assert!(flash.cost(&args, Tf32::matmul(false)).is_err());
        }
    }

    #[test]
    fn bmm_operands_must_agree_in_batch_and_inner_size() {
        let bmm = convention("aten::bmm").unwrap();
        let a = t(&[3, 4, 8], Dtype::F32);
        assert!(bmm
            .cost(&[a.clone(), t(&[3, 8, 2], Dtype::F32)], Tf32::matmul(false))
            .is_ok());
        assert!(
            bmm.cost(&[a.clone(), t(&[2, 8, 2], Dtype::F32)], Tf32::matmul(false))
                .is_err(),
            "another batch"
        );
        assert!(
            bmm.cost(&[a, t(&[3, 7, 2], Dtype::F32)], Tf32::matmul(false))
                .is_err(),
            "another inner size"
        );
    }

    /// A strided forward convolution with a bias, and a 1-D one: FlopCounterMode's
    /// `conv_flop_count` over the output's spatial size, plus one add per output element.
    /// The matmul counts are torch 2.11's FlopCounterMode on these calls (13,824, 432, 432).
    #[test]
    fn strided_and_one_dimensional_convolutions_follow_flop_counter_mode() {
        let conv = |x: &[u64], w: &[u64], stride: Vec<i64>, bias: bool| {
            cost(
                "aten::convolution",
                &[
                    t(x, Dtype::F32),
                    t(w, Dtype::F32),
                    if bias {
                        t(&[w[0]], Dtype::F32)
                    } else {
                        Arg::None
                    },
                    Arg::IntList(stride),
                    Arg::IntList(vec![0]),
                    Arg::IntList(vec![1]),
                    Arg::Bool(false),
                    Arg::IntList(vec![0]),
                    Arg::Int(1),
                ],
            )
        };
        // conv2d(x [2,3,9,9], w [8,3,3,3], b [8], stride 2): output [2,8,4,4].
        let c = conv(&[2, 3, 9, 9], &[8, 3, 3, 3], vec![2, 2], true);
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (13_824, 2 * 8 * 4 * 4)
        );
        // conv1d(x [1,3,8], w [4,3,3]): output [1,4,6].
        let c = conv(&[1, 3, 8], &[4, 3, 3], vec![1], false);
        assert_eq!(
            (c.matmul_flops, c.elementwise_flops),
            (2 * 4 * 3 * 3 * 6, 0)
        );
        // A kernel as large as the input: one output position.
        let c = conv(&[1, 3, 3, 3], &[8, 3, 3, 3], vec![1, 1], false);
        assert_eq!(c.matmul_flops, 2 * 8 * 3 * 9);
    }

    #[test]
    fn more_malformed_convolutions_are_errors_not_panics() {
        let conv = convention("aten::convolution").unwrap();
        let forward = |x: &[u64], w: &[u64], stride: Vec<i64>| {
            vec![
                t(x, Dtype::F32),
                t(w, Dtype::F32),
                Arg::None,
                Arg::IntList(stride),
                Arg::IntList(vec![0, 0]),
                Arg::IntList(vec![1, 1]),
                Arg::Bool(false),
                Arg::IntList(vec![0, 0]),
                Arg::Int(1),
            ]
        };
        for (x, w, stride, why) in [
            (
                &[1, 3, 8, 8][..],
                &[8, 3, 3, 3][..],
                vec![1, 1, 1],
                "3 strides, 2 spatial dims",
            ),
            (&[1, 3, 8, 8], &[8, 3, 3, 3], vec![0, 0], "stride 0"),
            (
                &[1, 3, 2, 2],
                &[8, 3, 3, 3],
                vec![2, 2],
                "a kernel larger than the input",
            ),
            (&[3, 8], &[8, 3], vec![], "no spatial dims"),
        ] {
            assert!(
                conv.cost(&forward(x, w, stride), Tf32::matmul(false))
                    .is_err(),
                "{why}"
            );
        }
        // Three paddings, or three dilations, for two spatial dims.
        for (list, why) in [(4, "3 paddings"), (5, "3 dilations")] {
            let mut args = forward(&[1, 3, 8, 8], &[8, 3, 3, 3], vec![1, 1]);
            args[list] = Arg::IntList(vec![1, 1, 1]);
            assert!(conv.cost(&args, Tf32::matmul(false)).is_err(), "{why}");
        }
        // Transposed with a bias: groups must be positive, the output non-empty.
        let transposed = |x: &[u64], w: &[u64], pad: i64, groups: i64| {
            vec![
                t(x, Dtype::F32),
                t(w, Dtype::F32),
                t(&[w[1]], Dtype::F32),
                Arg::IntList(vec![1, 1]),
                Arg::IntList(vec![pad, pad]),
                Arg::IntList(vec![1, 1]),
                Arg::Bool(true),
                Arg::IntList(vec![0, 0]),
                Arg::Int(groups),
            ]
        };
        let ok = transposed(&[1, 3, 4, 4], &[3, 8, 2, 2], 0, 1);
        let c = conv.cost(&ok, Tf32::matmul(false)).unwrap();
        assert_eq!(c.elementwise_flops, 8 * 5 * 5, "output [1,8,5,5]");
        let groups0 = transposed(&[1, 3, 4, 4], &[3, 8, 2, 2], 0, 0);
        assert!(
            conv.cost(&groups0, Tf32::matmul(false)).is_err(),
            "groups 0"
        );
        // (1 − 1)·1 − 2·1 + 1·(2 − 1) + 0 + 1 = 0: an empty output.
        let empty = transposed(&[1, 3, 1, 1], &[3, 8, 2, 2], 1, 1);
        assert!(
            conv.cost(&empty, Tf32::matmul(false)).is_err(),
            "empty output"
        );
        // convolution_backward: an output mask of 3 flags, and shapes of a convolution.
        let backward = |x: &[u64], mask| conv2d_backward_args(&[1, 8, 6, 6], x, 1, 0, mask);
        let bwd = convention("aten::convolution_backward").unwrap();
        assert!(bwd
            .cost(
                &backward(&[1, 3, 8, 8], vec![true, true, false]),
                Tf32::matmul(false)
            )
            .is_ok());
        assert!(
            bwd.cost(
                &backward(&[1, 3, 8, 8], vec![true, true]),
                Tf32::matmul(false)
            )
            .is_err(),
            "a mask of 2"
        );
        assert!(
            bwd.cost(&backward(&[3], vec![true, true, true]), Tf32::matmul(false))
                .is_err(),
            "a 1-D input"
        );
    }

    #[test]
    fn efficient_attention_bias_is_not_mistaken_for_varlen() {
        let q = t(&[1, 8, 2, 16], Dtype::F32);
        let bias = t(&[1, 2, 8, 8], Dtype::F32);
        let c = cost(
            "aten::_efficient_attention_forward",
            &[q.clone(), q.clone(), q.clone(), bias, Arg::None],
        );
        assert_eq!(c.matmul_flops, 2 * 2 * 8 * 8 * 32);
        let varlen = convention("aten::_efficient_attention_forward")
            .unwrap()
            .cost(
                &[
                    q.clone(),
                    q.clone(),
                    q.clone(),
                    Arg::None,
                    t(&[2], Dtype::I32),
                ],
                Tf32::matmul(false),
            );
        assert!(varlen.is_err());
    }

    #[test]
    fn bitwise_not_on_masks_is_bookkeeping() {
        // MoEGate's `~score_mask.bool()` over [N, E] booleans: no arithmetic on data.
        let mask = t(&[512, 256], Dtype::Bool);
        let c = cost("aten::bitwise_not", &[mask]);
        assert_eq!((c.elementwise_flops, c.matmul_flops), (0, 0));
        assert_eq!(
            convention("aten::bitwise_not_").unwrap().op,
            "aten::bitwise_not"
        );
        let ints = t(&[4, 8], Dtype::I64);
        assert_eq!(cost("aten::bitwise_not", &[ints]).elementwise_flops, 0);
    }

    #[test]
    fn json_echo_states_the_rules_a_reader_needs() {
        // Spot checks against the numbers docs/conventions.md states, written out here.
        let j = conventions_json();
        let row = |op: &str| {
            j["ops"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["op"] == op)
                .unwrap_or_else(|| panic!("{op} is not echoed"))
                .clone()
        };
        assert_eq!(row("aten::silu")["flops_per_element"], 4);
        assert_eq!(row("aten::softmax")["flops_per_element"], 5);
        assert_eq!(row("aten::mm")["rule"], "matmul");
        assert_eq!(row("aten::mm")["formula"], "Mm");
        assert_eq!(row("aten::mm")["flop_counter_mode"], true);
        assert!(row("aten::silu").get("formula").is_none());
        assert_eq!(
            row("aten::_scaled_dot_product_flash_attention_for_cpu")["flop_counter_mode"],
            false
        );
        assert_eq!(row("aten::view")["rule"], "view");
        assert_eq!(row("aten::linear")["rule"], "composite");
        assert!(
            row("aten::_scaled_dot_product_efficient_attention")["fp32_engine"]
                .as_str()
                .unwrap()
                .contains("always")
        );
        assert_eq!(j["fused_attention_elementwise_per_score"]["forward"], 6);
        assert_eq!(j["fused_attention_elementwise_per_score"]["backward"], 8);
    }
}

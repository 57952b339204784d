//! Exact per-call metrics and the cost tree that composite layers are made of.

use std::fmt::Display;

use serde::Serialize;

use crate::allocator::cuda_round_size;
use crate::checked::sum;
use crate::conventions::{
    convention_of_static, converted_input_bytes, is_in_place, written_bytes, ArgRef, OpCost, Rule,
    StorageId, TensorMeta, Tf32,
};
use crate::error::{Error, Result};
use crate::liveness::{Liveness, Peak};

/// The metrics of one layer call, exact integers in base units (FLOPs and bytes).
///
/// Two views of the same FLOPs: by op class (`matmul_flops + elementwise_flops`) and by
/// the engine that executes them (`tensor_core_flops + cuda_core_flops`); the totals of
/// the two views are always equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// GEMM-like FLOPs (mm, addmm, bmm, baddbmm, convolutions, attention cores).
    pub matmul_flops: u64,
    /// Elementwise, reduction, softmax and top-k FLOPs.
    pub elementwise_flops: u64,
    /// FLOPs of GEMMs that run on tensor cores (bf16/fp16, or fp32 with TF32 allowed).
    pub tensor_core_flops: u64,
    /// FLOPs on CUDA cores: fp32 GEMMs without TF32 and all elementwise work.
    pub cuda_core_flops: u64,
    /// Bytes read plus bytes written by the layer's ops, unfused.
    pub io_bytes: u64,
    /// Bytes of the layer's parameters.
    pub weight_bytes: u64,
    /// Bytes of every tensor the layer's ops allocate, without reuse: an upper bound
    /// on the transient activation memory of one call.
    pub activation_bytes: u64,
    /// Bytes held in the KV cache after the call.
    pub kv_cache_bytes: u64,
}

/// The unit a metric counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Floating-point operations (2 per multiply-accumulate).
    Flop,
    /// Bytes.
    Byte,
}

/// One metric of [`Metrics`]: its name, its unit and where it lives. Code that lists,
/// compares or prints metrics iterates [`Metric::ALL`] instead of naming fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    MatmulFlops,
    ElementwiseFlops,
    TensorCoreFlops,
    CudaCoreFlops,
    IoBytes,
    WeightBytes,
    ActivationBytes,
    KvCacheBytes,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 8] = [
        Metric::MatmulFlops,
        Metric::ElementwiseFlops,
        Metric::TensorCoreFlops,
        Metric::CudaCoreFlops,
        Metric::IoBytes,
        Metric::WeightBytes,
        Metric::ActivationBytes,
        Metric::KvCacheBytes,
    ];

    /// The field name, as reports spell it (`matmul_flops`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::MatmulFlops => "matmul_flops",
            Metric::ElementwiseFlops => "elementwise_flops",
            Metric::TensorCoreFlops => "tensor_core_flops",
            Metric::CudaCoreFlops => "cuda_core_flops",
            Metric::IoBytes => "io_bytes",
            Metric::WeightBytes => "weight_bytes",
            Metric::ActivationBytes => "activation_bytes",
            Metric::KvCacheBytes => "kv_cache_bytes",
        }
    }

    /// The metric called `name`, if any.
    pub fn parse(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }

    /// What it counts.
    pub fn unit(self) -> Unit {
        match self {
            Metric::MatmulFlops
            | Metric::ElementwiseFlops
            | Metric::TensorCoreFlops
            | Metric::CudaCoreFlops => Unit::Flop,
            _ => Unit::Byte,
        }
    }

    /// Its value in `m` (the field [`Metric::set`] writes; read without copying `m`,
    /// since every op call of a layer sums its metrics through here).
    pub fn get(self, m: &Metrics) -> u64 {
        match self {
            Metric::MatmulFlops => m.matmul_flops,
            Metric::ElementwiseFlops => m.elementwise_flops,
            Metric::TensorCoreFlops => m.tensor_core_flops,
            Metric::CudaCoreFlops => m.cuda_core_flops,
            Metric::IoBytes => m.io_bytes,
            Metric::WeightBytes => m.weight_bytes,
            Metric::ActivationBytes => m.activation_bytes,
            Metric::KvCacheBytes => m.kv_cache_bytes,
        }
    }

    /// Sets its value in `m`.
    pub fn set(self, m: &mut Metrics, value: u64) {
        *self.field(m) = value;
    }

    fn field(self, m: &mut Metrics) -> &mut u64 {
        match self {
            Metric::MatmulFlops => &mut m.matmul_flops,
            Metric::ElementwiseFlops => &mut m.elementwise_flops,
            Metric::TensorCoreFlops => &mut m.tensor_core_flops,
            Metric::CudaCoreFlops => &mut m.cuda_core_flops,
            Metric::IoBytes => &mut m.io_bytes,
            Metric::WeightBytes => &mut m.weight_bytes,
            Metric::ActivationBytes => &mut m.activation_bytes,
            Metric::KvCacheBytes => &mut m.kv_cache_bytes,
        }
    }
}

impl Metrics {
    /// All FLOPs of the call.
    pub fn total_flops(&self) -> Result<u64> {
        sum("total FLOPs", &[self.matmul_flops, self.elementwise_flops])
    }

    /// Field-wise checked sum.
    pub fn checked_add(&self, other: &Metrics) -> Result<Metrics> {
        let mut out = Metrics::default();
        for metric in Metric::ALL {
            let value = metric
                .get(self)
                .checked_add(metric.get(other))
                .ok_or_else(|| {
                    Error::overflow(format!("{} of a composite layer", metric.name()))
                })?;
            metric.set(&mut out, value);
        }
        Ok(out)
    }
}

/// A node of a layer's cost tree: a layer, a sub-layer or one ATen op call.
///
/// A node's metrics are the sum of its children's plus its own parameters (and KV
/// cache); leaves are op calls costed by the conventions table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// Vendor class name for layers (`DeepseekV2MLP`), role for op calls (`gate_proj`).
    pub name: String,
    /// The ATen op of a leaf (`aten::mm`); `None` for layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<&'static str>,
    pub metrics: Metrics,
    /// `activation_bytes` as the CUDA caching allocator reserves it: each allocated
    /// tensor rounded up to its block ([`crate::allocator::cuda_round_size`]).
    #[serde(skip)]
    pub cuda_activation_bytes: u64,
    /// The call's memory footprint (`peak_activation_bytes`), from the liveness of its
    /// tensors ([`crate::liveness`]); zero (and not serialized) for op leaves.
    #[serde(skip_serializing_if = "Peak::is_empty")]
    pub peak: Peak,
    /// [`Cost::peak`] with each tensor rounded to its CUDA caching-allocator block.
    #[serde(skip)]
    pub cuda_peak: Peak,
    /// What the call returns, tensor by tensor, as `[bytes, CUDA block bytes]` (empty for
    /// op leaves, and for nodes built inside `metrics_only`, which count the tensors in
    /// [`Cost::returns`] without their sizes).
    #[serde(skip)]
    pub returned: Vec<[u64; 2]>,
    /// How many tensors the call returns: `returned.len()`, or inside `metrics_only` (where
    /// no sizes are kept, so that a node allocates nothing for them) the count alone.
    #[serde(skip)]
    returns: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Cost>,
}

impl Cost {
    /// A node called `name` (running `op` when a leaf) with `metrics`, and nothing else
    /// yet: no peak, no returned tensors, no children.
    fn new(
        name: String,
        op: Option<&'static str>,
        metrics: Metrics,
        cuda_activation_bytes: u64,
    ) -> Cost {
        Cost {
            name,
            op,
            metrics,
            cuda_activation_bytes,
            peak: Peak::default(),
            cuda_peak: Peak::default(),
            returned: Vec::new(),
            returns: 0,
            children: Vec::new(),
        }
    }

    /// How many tensors the call returns (what a caller's [`CostBuilder::call`] expects).
    pub fn returns(&self) -> usize {
        self.returns
    }

    /// The peak as the device allocates it: each tensor rounded to its CUDA block on a
    /// GPU ([`Cost::cuda_peak`]), its bytes elsewhere ([`Cost::peak`]).
    pub fn peak_on(&self, cuda: bool) -> &Peak {
        if cuda {
            &self.cuda_peak
        } else {
            &self.peak
        }
    }

    /// The metrics as the device allocates them: on a GPU `activation_bytes` is the CUDA
    /// caching allocator's blocks ([`Cost::cuda_activation_bytes`]), what `verify-decoder`
    /// compares there; elsewhere the tensors' bytes.
    pub fn metrics_on(&self, cuda: bool) -> Metrics {
        let mut metrics = self.metrics;
        if cuda {
            metrics.activation_bytes = self.cuda_activation_bytes;
        }
        metrics
    }

    /// This node and every node below it as the device allocates them
    /// ([`Cost::metrics_on`], [`Cost::peak_on`]): what a report for a GPU shows.
    pub fn on_device(mut self, cuda: bool) -> Cost {
        if cuda {
            self.metrics = self.metrics_on(true);
            self.peak = *self.peak_on(true);
            self.children = self
                .children
                .into_iter()
                .map(|c| c.on_device(true))
                .collect();
        }
        self
    }

    /// The op-call leaves, depth first.
    pub fn ops(&self) -> Vec<&Cost> {
        let mut out = Vec::new();
        fn walk<'a>(c: &'a Cost, out: &mut Vec<&'a Cost>) {
            if c.op.is_some() {
                out.push(c);
            }
            for child in &c.children {
                walk(child, out);
            }
        }
        walk(self, &mut out);
        out
    }

    /// The same call under another name (a second module of the same shape: the post-
    /// attention norm of a decoder layer is its input norm's op list).
    pub fn renamed(&self, name: &str) -> Cost {
        Cost {
            name: name.to_string(),
            ..self.clone()
        }
    }

    /// The child called `name`, if any.
    pub fn child(&self, name: &str) -> Option<&Cost> {
        self.children.iter().find(|c| c.name == name)
    }

    /// `n` calls of this node, each by a module of its own (the routed experts that
    /// receive the same number of rows): every metric of the subtree, its leaves
    /// included, times `n`.
    pub fn repeated(mut self, n: u64) -> Result<Cost> {
        for metric in Metric::ALL {
            let value = metric.get(&self.metrics).checked_mul(n).ok_or_else(|| {
                Error::overflow(format!("{} of {} calls of {}", metric.name(), n, self.name))
            })?;
            metric.set(&mut self.metrics, value);
        }
        self.cuda_activation_bytes =
            self.cuda_activation_bytes.checked_mul(n).ok_or_else(|| {
                Error::overflow(format!("CUDA blocks of {} calls of {}", n, self.name))
            })?;
        self.peak = self.peak.repeated(n, &self.name)?;
        self.cuda_peak = self.cuda_peak.repeated(n, &self.name)?;
        for part in &mut self.returned {
            for size in part.iter_mut() {
                *size = size.checked_mul(n).ok_or_else(|| {
                    Error::overflow(format!("returned bytes of {} calls of {}", n, self.name))
                })?;
            }
        }
        self.children = self
            .children
            .into_iter()
            .map(|c| c.repeated(n))
            .collect::<Result<_>>()?;
        Ok(self)
    }
}

/// What the [`CostBuilder`]s on a thread keep ([`sums_only`], [`metrics_only`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// The per-op tree, the sums and the liveness (peaks): [`crate::layers::Layer::cost`].
    Tree,
    /// Sums and liveness, no tree.
    Sums,
    /// [`Metrics`] only: neither the tree nor the liveness of the tensors.
    Metrics,
}

thread_local! {
    /// What builders on this thread keep.
    static KEEP: std::cell::Cell<Keep> = const { std::cell::Cell::new(Keep::Tree) };
}

/// Runs `f` with the builders on this thread keeping `keep`, restoring what was kept before
/// when it returns (or unwinds).
fn keeping<T>(keep: Keep, f: impl FnOnce() -> T) -> T {
    struct Restore(Keep);
    impl Drop for Restore {
        fn drop(&mut self) {
            KEEP.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(KEEP.with(|k| k.replace(keep)));
    f()
}

/// Runs `f` with every [`CostBuilder`] on this thread keeping only the sums: the nodes it
/// finishes have their metrics and peaks but no children (no per-op tree is allocated).
/// The same op lists run; only the breakdown is not kept.
pub fn sums_only<T>(f: impl FnOnce() -> T) -> T {
    keeping(Keep::Sums, f)
}

/// [`sums_only`] without the liveness bookkeeping either: the nodes' [`Metrics`] are those
/// of the tree, but their peaks are zero and their returned sizes absent (how many tensors
/// a node returns is kept, [`Cost::returns`], so callers check it as they do with the
/// tree). What `Layer::metrics` needs for design-space sweeps; crate-private because its
/// nodes' other fields would read as zeros.
pub(crate) fn metrics_only<T>(f: impl FnOnce() -> T) -> T {
    keeping(Keep::Metrics, f)
}

fn describe(t: &TensorMeta) -> String {
    format!("a {:?} {} tensor", t.shape, t.dtype)
}

/// Builds a [`Cost`] node op by op, in the order the vendor code runs them.
#[derive(Debug)]
pub struct CostBuilder {
    node: Cost,
    allow_tf32: bool,
    /// Keep sums only (inside [`sums_only`] or [`metrics_only`]).
    sums_only: bool,
    /// Which of the node's tensors are allocated, op by op, and which it returns
    /// ([`CostBuilder::returns`]) and keeps ([`CostBuilder::keeps`]); `None` inside
    /// [`metrics_only`].
    liveness: Option<Liveness>,
    /// Inside [`metrics_only`]: how many tensors the node said it returns.
    returns_count: Option<usize>,
}

impl CostBuilder {
    /// A new node called `name`; `allow_tf32` picks the engine of fp32 GEMMs.
    pub fn new(name: impl Into<String>, allow_tf32: bool) -> CostBuilder {
        let keep = KEEP.with(|k| k.get());
        CostBuilder {
            node: Cost::new(name.into(), None, Metrics::default(), 0),
            allow_tf32,
            sums_only: keep != Keep::Tree,
            liveness: (keep != Keep::Metrics).then(Liveness::new),
            returns_count: None,
        }
    }

    /// Records one ATen op call: `inputs` as the dispatcher sees them, `outputs` the
    /// tensors it allocates (for byte metrics). FLOPs come from the conventions table.
    /// Returns the outputs, each held by its allocation (a view's or an in-place op's by
    /// its first tensor argument's), to be released where the vendor code drops them.
    ///
    /// `role` names the call in the per-op tree; it is only formatted when the tree is
    /// kept (not inside [`sums_only`]), so a `format_args!` costs nothing in a sweep.
    pub fn op<const N: usize>(
        &mut self,
        role: impl Display,
        op: &'static str,
        inputs: &[ArgRef<'_>],
        mut outputs: [TensorMeta; N],
    ) -> Result<[TensorMeta; N]> {
        self.record(&role, op, inputs, &mut outputs, &[])?;
        Ok(outputs)
    }

    /// Records an op call that also writes `host` tensors in host memory while it runs
    /// on a GPU (a `.cpu()` copy; the memory-efficient attention kernel's philox seed):
    /// they count in `io_bytes` like `outputs`, but allocate nothing on the device, so
    /// neither `activation_bytes` nor the CUDA blocks include them.
    pub fn op_with_host_outputs(
        &mut self,
        role: impl Display,
        op: &'static str,
        inputs: &[ArgRef<'_>],
        mut outputs: Vec<TensorMeta>,
        host: &[TensorMeta],
    ) -> Result<Vec<TensorMeta>> {
        self.record(&role, op, inputs, &mut outputs, host)?;
        Ok(outputs)
    }

    /// The one body of [`CostBuilder::op`] and [`CostBuilder::op_with_host_outputs`]:
    /// costs the call and sets each output's allocation in place.
    fn record(
        &mut self,
        role: &dyn Display,
        op: &'static str,
        inputs: &[ArgRef<'_>],
        outputs: &mut [TensorMeta],
        host: &[TensorMeta],
    ) -> Result<()> {
        let conv = convention_of_static(op)
            .ok_or_else(|| Error::op_shape(op, "not in the conventions table"))?;
        let OpCost {
            matmul_flops,
            elementwise_flops,
            tensor_core_flops,
            cuda_core_flops,
            ..
        } = conv.cost(inputs, Tf32::matmul(self.allow_tf32))?;
        // What the op allocates: its outputs, unless it is a view or composite (nothing
        // of its own, and it moves nothing) or works in place (it returns its argument).
        // Each output's size is taken once, for the bytes it writes and what it allocates.
        let moves = !matches!(conv.rule, Rule::View | Rule::Composite);
        let allocates = moves && !is_in_place(op);
        let (mut written, mut activation_bytes, mut cuda_activation_bytes) = (0, 0, 0);
        for t in outputs.iter_mut().filter(|_| moves) {
            let bytes = t.bytes()?;
            written = sum("io_bytes", &[written, bytes])?;
            if allocates {
                let block = cuda_round_size(bytes, 0)
                    .ok_or_else(|| Error::overflow(format!("the CUDA block of {op}")))?;
                activation_bytes = sum("activation_bytes", &[activation_bytes, bytes])?;
                cuda_activation_bytes =
                    sum("CUDA activation blocks", &[cuda_activation_bytes, block])?;
                // An empty tensor allocates nothing and holds nothing.
                t.storage = match &mut self.liveness {
                    Some(liveness) if bytes != 0 => Some(liveness.allocate([bytes, block])?),
                    _ => None,
                };
            }
        }
        // A temporary the op holds while it runs (its input converted first): the
        // allocator's peak only.
        if let Some(liveness) = &mut self.liveness {
            if let Some(bytes) = converted_input_bytes(op, inputs, outputs)? {
                let block = cuda_round_size(bytes, 0)
                    .ok_or_else(|| Error::overflow(format!("the CUDA block of {op}")))?;
                liveness.temporary([bytes, block])?;
            }
        }
        // Host outputs are written too, but allocate nothing on the device.
        if moves {
            written = written_bytes(written, host)?;
        }
        let io_bytes = conv.io_bytes_writing(inputs, written)?;
        if !allocates {
            // A view or an in-place op's result is its first tensor argument's memory; a
            // composite's results are its inner ops' (not traced here: no storage).
            let base = match conv.rule {
                Rule::Composite => None,
                _ => inputs
                    .iter()
                    .find_map(|a| match a {
                        ArgRef::Tensor(t) => Some(t.storage()),
                        _ => None,
                    })
                    .flatten(),
            };
            for t in outputs.iter_mut() {
                t.storage = base;
            }
        }
        let metrics = Metrics {
            matmul_flops,
            elementwise_flops,
            tensor_core_flops,
            cuda_core_flops,
            io_bytes,
            activation_bytes,
            ..Metrics::default()
        };
        if self.sums_only {
            return self.add(&metrics, cuda_activation_bytes);
        }
        self.push(Cost::new(
            role.to_string(),
            Some(op),
            metrics,
            cuda_activation_bytes,
        ))
    }

    /// Records an op call that hands back its input unchanged (`contiguous()` of a
    /// tensor already contiguous): dispatched, but it computes, moves and allocates
    /// nothing.
    pub fn returns_input(&mut self, role: impl Display, op: &'static str) -> Result<()> {
        convention_of_static(op)
            .ok_or_else(|| Error::op_shape(op, "not in the conventions table"))?;
        if self.sums_only {
            return Ok(());
        }
        self.push(Cost::new(role.to_string(), Some(op), Metrics::default(), 0))
    }

    /// Adds a sub-layer call whose outputs stay allocated until this node returns.
    pub fn child(&mut self, child: Cost) -> Result<()> {
        self.call_holding(child, |_| {})
    }

    /// Adds a sub-layer call that returns tensors like `outputs` (exactly as many as the
    /// child said it returns); each result is held by its own allocation, so this node can
    /// release it.
    pub fn call<const N: usize>(
        &mut self,
        child: Cost,
        outputs: [&TensorMeta; N],
    ) -> Result<[TensorMeta; N]> {
        if child.returns != N {
            return Err(Error::op_shape(
                &child.name,
                format!(
                    "returns {} tensors, the caller expects {}",
                    child.returns, N
                ),
            ));
        }
        let mut storages = [None; N];
        let mut slots = storages.iter_mut();
        self.call_holding(child, |storage| {
            if let Some(slot) = slots.next() {
                *slot = storage;
            }
        })?;
        Ok(std::array::from_fn(|i| {
            outputs[i].clone().held_by(storages[i])
        }))
    }

    /// Adds a sub-layer call that returns one or more tensors, of which the caller uses
    /// the first, like `first` (the attention core's output, with the attention weights
    /// after it when it runs eagerly); the others stay allocated until this node returns.
    pub fn call_first(&mut self, child: Cost, first: &TensorMeta) -> Result<TensorMeta> {
        if child.returns == 0 {
            return Err(Error::op_shape(
                &child.name,
                "returns 0 tensors, the caller expects at least one",
            ));
        }
        let mut held = None;
        self.call_holding(child, |storage| {
            held.get_or_insert(storage);
        })?;
        Ok(first.clone().held_by(held.flatten()))
    }

    /// The one body of [`CostBuilder::child`], [`CostBuilder::call`] and
    /// [`CostBuilder::call_first`]: adds `child`, handing each tensor it returns, in order,
    /// to `hold` with the allocation of this node that now holds it (`None` inside
    /// [`metrics_only`], where no allocation is traced).
    fn call_holding(&mut self, child: Cost, mut hold: impl FnMut(Option<StorageId>)) -> Result<()> {
        match &mut self.liveness {
            Some(liveness) => {
                liveness.call([child.peak, child.cuda_peak], &child.returned, &mut hold)?
            }
            None => (0..child.returns).for_each(|_| hold(None)),
        }
        self.push(child)
    }

    /// The vendor code drops its last reference to each of `tensors` here (a temporary
    /// consumed, a local reassigned): their allocations are freed. Tensors this node did
    /// not allocate (its inputs, a cast that changed nothing) are skipped; releasing one
    /// twice is an error.
    pub fn release(&mut self, tensors: &[&TensorMeta]) -> Result<()> {
        let Some(liveness) = &mut self.liveness else {
            return Ok(());
        };
        for t in tensors {
            liveness.release(t.storage(), &self.node.name, || describe(t))?;
        }
        Ok(())
    }

    /// Releases `dropped` unless `kept` is held by the same allocation: an op that may
    /// hand its input back (a cast to the same dtype) replaces its input only when it
    /// copied it.
    pub fn release_unless_same(&mut self, dropped: &TensorMeta, kept: &TensorMeta) -> Result<()> {
        if dropped.storage() == kept.storage() {
            return Ok(());
        }
        self.release(&[dropped])
    }

    /// The call returns `outputs`; every other tensor of its own not [`kept`] is freed
    /// when it returns (Python's locals). Without it, all that is live at the end counts
    /// as returned.
    ///
    /// [`kept`]: CostBuilder::keeps
    pub fn returns(&mut self, outputs: &[&TensorMeta]) {
        match &mut self.liveness {
            Some(liveness) => liveness.returns(outputs.iter().map(|t| t.storage())),
            None => self.returns_count = Some(outputs.len()),
        }
    }

    /// The call leaves `tensors` allocated for later calls (the KV cache).
    pub fn keeps(&mut self, tensors: &[&TensorMeta]) {
        if let Some(liveness) = &mut self.liveness {
            liveness.keeps(tensors.iter().map(|t| t.storage()));
        }
    }

    /// Adds parameters of `bytes` owned by this node itself (not by a child).
    pub fn weights(&mut self, bytes: u64) -> Result<()> {
        self.node.metrics.weight_bytes =
            sum("weight_bytes", &[self.node.metrics.weight_bytes, bytes])?;
        Ok(())
    }

    /// Adds KV-cache bytes held by this node itself.
    pub fn kv_cache(&mut self, bytes: u64) -> Result<()> {
        self.node.metrics.kv_cache_bytes =
            sum("kv_cache_bytes", &[self.node.metrics.kv_cache_bytes, bytes])?;
        Ok(())
    }

    fn push(&mut self, child: Cost) -> Result<()> {
        self.add(&child.metrics, child.cuda_activation_bytes)?;
        if !self.sums_only {
            self.node.children.push(child);
        }
        Ok(())
    }

    fn add(&mut self, metrics: &Metrics, cuda_activation_bytes: u64) -> Result<()> {
        self.node.metrics = self.node.metrics.checked_add(metrics)?;
        self.node.cuda_activation_bytes = sum(
            "CUDA activation blocks",
            &[self.node.cuda_activation_bytes, cuda_activation_bytes],
        )?;
        Ok(())
    }

    /// The finished node.
    pub fn finish(mut self) -> Cost {
        match &self.liveness {
            Some(liveness) => {
                let ([peak, cuda_peak], returned) = liveness.finish();
                self.node.peak = peak;
                self.node.cuda_peak = cuda_peak;
                self.node.returns = returned.len();
                self.node.returned = returned;
            }
            // As many as the tree's: what was said, or one for all that is live.
            None => self.node.returns = self.returns_count.unwrap_or(1),
        }
        self.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    fn t(shape: &[u64], dtype: Dtype) -> TensorMeta {
        TensorMeta::new(shape, dtype)
    }

    /// `silu(x)` recorded in `b`: an op that allocates an output of `x`'s size.
    fn silu(b: &mut CostBuilder, x: &TensorMeta) -> TensorMeta {
        let [y] = b
            .op("act", "aten::silu", &[ArgRef::Tensor(x)], [x.clone()])
            .unwrap();
        y
    }

    /// Whether `t`'s allocation in `b` is live.
    fn live(b: &CostBuilder, t: &TensorMeta) -> bool {
        b.liveness.as_ref().unwrap().is_live(t.storage())
    }

    #[test]
    fn flop_metrics_count_flops_and_the_others_bytes() {
        for metric in Metric::ALL {
            // The names are the report's and the JSON's: a FLOP count says so in its name.
            let flops = metric.name().ends_with("_flops");
            assert_eq!(metric.unit() == Unit::Flop, flops, "{}", metric.name());
            assert_eq!(metric.unit() == Unit::Byte, !flops, "{}", metric.name());
        }
    }

    #[test]
    fn total_flops_add_matmul_and_elementwise_only() {
        let m = Metrics {
            matmul_flops: 3,
            elementwise_flops: 4,
            tensor_core_flops: 100,
            cuda_core_flops: 200,
            io_bytes: 1000,
            ..Metrics::default()
        };
        assert_eq!(m.total_flops().unwrap(), 7);
        let huge = Metrics {
            matmul_flops: u64::MAX,
            elementwise_flops: 1,
            ..Metrics::default()
        };
        assert!(
            huge.total_flops().is_err(),
            "overflow is an error, not a wrap"
        );
    }

    #[test]
    fn op_leaves_serialize_without_a_peak_and_layers_with_one() {
        let mut b = CostBuilder::new("layer", false);
        let x = t(&[4, 8], Dtype::F32);
        let y = silu(&mut b, &x);
        b.returns(&[&y]);
        let cost = b.finish();
        assert!(cost.children[0].peak.is_empty());
        assert!(!cost.peak.is_empty());
        let json = serde_json::to_value(&cost).unwrap();
        assert_eq!(json["peak"]["peak_bytes"], 4 * 8 * 4);
        assert!(
            json["children"][0].get("peak").is_none(),
            "an op leaf has no footprint of its own: {}",
            json["children"][0]
        );
    }

    #[test]
    fn builder_sums_children_and_costs_bytes() {
        let mut b = CostBuilder::new("demo", false);
        let x = t(&[4, 8], Dtype::Bf16);
        let w = t(&[8, 16], Dtype::Bf16);
        let y = t(&[4, 16], Dtype::Bf16);
        b.op(
            "proj",
            "aten::mm",
            &[ArgRef::Tensor(&x), ArgRef::Tensor(&w)],
            [y.clone()],
        )
        .unwrap();
        b.op("act", "aten::silu", &[ArgRef::Tensor(&y)], [y.clone()])
            .unwrap();
        b.op("view", "aten::view", &[ArgRef::Tensor(&y)], [y.clone()])
            .unwrap();
        b.weights(256).unwrap();
        let c = b.finish();
        assert_eq!(c.metrics.matmul_flops, 2 * 4 * 8 * 16);
        assert_eq!(c.metrics.elementwise_flops, 4 * 64);
        assert_eq!(c.metrics.tensor_core_flops, 2 * 4 * 8 * 16);
        assert_eq!(c.metrics.cuda_core_flops, 4 * 64);
        // mm reads 64 + 256 bytes and writes 128; silu reads 128 and writes 128; views move nothing.
        assert_eq!(c.metrics.io_bytes, 64 + 256 + 128 + 128 + 128);
        assert_eq!(c.metrics.activation_bytes, 128 + 128);
        assert_eq!(c.metrics.weight_bytes, 256);
        assert_eq!(c.ops().len(), 3);
    }

    /// `n` calls of a node, each keeping its output (the routed experts of one size): the
    /// peaks follow [`Peak::repeated`] in bytes and in CUDA blocks, by hand.
    #[test]
    fn repeated_nodes_repeat_their_peaks_and_returned_sizes() {
        let mut b = CostBuilder::new("expert", false);
        let x = t(&[4, 8], Dtype::F32);
        let y = silu(&mut b, &x);
        b.returns(&[&y]);
        let one = b.finish();
        assert_eq!((one.peak.peak_bytes, one.peak.returned_bytes), (128, 128));
        let three = one.repeated(3).unwrap();
        // Under the third call's 128 bytes, the two earlier outputs: 3 · 128 in all.
        assert_eq!(
            (three.peak.peak_bytes, three.peak.returned_bytes),
            (3 * 128, 3 * 128)
        );
        assert_eq!(
            (three.cuda_peak.peak_bytes, three.cuda_peak.returned_bytes),
            (3 * 512, 3 * 512),
            "each 128-byte tensor is a 512-byte CUDA block"
        );
        assert_eq!(three.metrics.activation_bytes, 3 * 128);
    }

    #[test]
    fn metrics_only_keeps_the_sums_and_how_many_tensors_return() {
        let build = || {
            let mut b = CostBuilder::new("demo", false);
            let x = t(&[4, 8], Dtype::Bf16);
            let w = t(&[8, 16], Dtype::Bf16);
            let [y] = b
                .op(
                    "proj",
                    "aten::mm",
                    &[ArgRef::Tensor(&x), ArgRef::Tensor(&w)],
                    [t(&[4, 16], Dtype::Bf16)],
                )
                .unwrap();
            let [z] = b
                .op("act", "aten::silu", &[ArgRef::Tensor(&y)], [y.clone()])
                .unwrap();
            b.release(&[&y]).unwrap();
            b.returns(&[&z, &x]);
            b.finish()
        };
        let tree = build();
        let lean = metrics_only(build);
        assert_eq!(lean.metrics, tree.metrics);
        assert!(lean.children.is_empty() && tree.children.len() == 2);
        assert_eq!((lean.returns(), tree.returns()), (2, 2));
        assert!(lean.returned.is_empty() && tree.returned.len() == 2);
        assert_eq!(tree.peak.peak_bytes, 2 * 128, "y and z live together");
        assert_eq!(lean.peak, Peak::default(), "no liveness kept");
    }

    /// Which allocation holds each output: an op's own (none for an empty tensor), its
    /// first tensor argument's for a view or an in-place op, none for a composite (its
    /// inner ops allocate).
    #[test]
    fn outputs_are_held_by_the_allocation_they_live_in() {
        let mut b = CostBuilder::new("demo", false);
        let x = t(&[4, 8], Dtype::F32);
        let y = silu(&mut b, &x);
        assert!(y.storage().is_some() && live(&b, &y));
        let [v] = b
            .op(
                "view",
                "aten::view",
                &[ArgRef::Tensor(&y)],
                [t(&[32], Dtype::F32)],
            )
            .unwrap();
        assert_eq!(v.storage(), y.storage(), "a view lives in its base");
        let [z] = b
            .op(
                "in place",
                "aten::mul_",
                &[ArgRef::Tensor(&y), ArgRef::Tensor(&x)],
                [y.clone()],
            )
            .unwrap();
        assert_eq!(
            z.storage(),
            y.storage(),
            "an in-place op returns its argument"
        );
        let [p] = b
            .op(
                "pad",
                "aten::pad",
                &[ArgRef::Tensor(&y)],
                [t(&[4, 10], Dtype::F32)],
            )
            .unwrap();
        assert_eq!(p.storage(), None, "a composite's result is its inner ops'");
        let empty = t(&[0, 8], Dtype::F32);
        let e = silu(&mut b, &empty);
        assert_eq!(e.storage(), None, "an empty tensor holds no allocation");
        b.returns(&[&y]);
        let cost = b.finish();
        assert_eq!(cost.metrics.activation_bytes, 128, "silu's output only");
        assert_eq!(cost.returned, vec![[128, 512]]);
    }

    /// A cast that copied (another dtype) frees its input when the caller drops it; one
    /// that handed its input back (the same dtype) frees nothing, the result being alive.
    #[test]
    fn release_unless_same_frees_only_a_copy() {
        let mut b = CostBuilder::new("demo", false);
        let x = t(&[4, 8], Dtype::F32);
        let y = silu(&mut b, &x);
        let [half] = b
            .op(
                "cast",
                "aten::to",
                &[ArgRef::Tensor(&y)],
                [t(&[4, 8], Dtype::Bf16)],
            )
            .unwrap();
        b.release_unless_same(&y, &half).unwrap();
        assert!(!live(&b, &y), "the fp32 input is freed");
        assert!(live(&b, &half));
        b.release_unless_same(&half, &half.clone()).unwrap();
        assert!(live(&b, &half), "the same tensor is kept");
        assert!(!live(&b, &y), "the input stays freed");
        b.returns(&[&half]);
        let cost = b.finish();
        assert_eq!(cost.peak.peak_bytes, 128 + 64, "both while the cast runs");
        assert_eq!(cost.peak.returned_bytes, 64);
    }

    /// `contiguous()` of a contiguous tensor: a leaf in the tree that costs nothing, and
    /// an op the conventions table must know all the same.
    #[test]
    fn an_op_returning_its_input_is_a_zero_leaf() {
        let mut b = CostBuilder::new("demo", false);
        b.returns_input("contiguous", "aten::contiguous").unwrap();
        assert!(b.returns_input("made up", "aten::made_up").is_err());
        let cost = b.finish();
        assert_eq!(cost.children.len(), 1);
        assert_eq!(cost.children[0].op, Some("aten::contiguous"));
        assert_eq!(cost.metrics, Metrics::default());
    }

    #[test]
    fn releasing_twice_names_the_tensor() {
        let mut b = CostBuilder::new("demo layer", false);
        let x = t(&[4, 8], Dtype::F32);
        let y = silu(&mut b, &x);
        b.release(&[&y]).unwrap();
        let err = b.release(&[&y]).unwrap_err().to_string();
        assert!(
            err == "cannot cost demo layer: a [4, 8] fp32 tensor is released twice",
            "{err}"
        );
    }

    #[test]
    fn unknown_ops_are_errors_not_zeros() {
        let mut b = CostBuilder::new("demo", false);
        assert!(b.op("x", "aten::made_up", &[], []).is_err());
    }

    #[test]
    fn get_reads_the_field_set_writes() {
        // Checked against the serialized field names, not `get` alone: a metric whose
        // `get` and `set` both pointed at another metric's field would pass a round trip.
        for (i, metric) in Metric::ALL.into_iter().enumerate() {
            let value = 1_000 + i as u64;
            let mut m = Metrics::default();
            metric.set(&mut m, value);
            assert_eq!(metric.get(&m), value, "{}", metric.name());
            let json = serde_json::to_value(m).unwrap();
            let fields = json.as_object().unwrap();
            assert_eq!(fields.len(), 8);
            assert_eq!(
                json[metric.name()],
                value,
                "{} sets its own field",
                metric.name()
            );
            for (name, v) in fields {
                if name != metric.name() {
                    assert_eq!(v, 0, "{} writes {name} too", metric.name());
                }
            }
            assert_eq!(Metric::parse(metric.name()), Some(metric));
        }
    }

    #[test]
    fn checked_add_reports_overflow() {
        let big = Metrics {
            matmul_flops: u64::MAX,
            ..Metrics::default()
        };
        assert!(big.checked_add(&big).is_err());
    }
}

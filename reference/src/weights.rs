//! Seeded parameters: where modules live (device; the dtype is the workload's) and how
//! their weights are drawn.
//!
//! Every parameter is drawn in fp32 from a counter-based stream keyed by a hash of the
//! run seed and the parameter's vendor name ([`crate::draws`]) — on the CPU by a loop on
//! every core, on a GPU by elementwise kernels where the parameter will live (the same
//! bits: [`crate::draws::normal_on`]) — then cast to the dtype. So a parameter's values
//! do not depend on creation order, thread count or device, and two runs with the same
//! seed build identical modules.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Mutex;

use modelmeter::Dtype;
use tch::{Device, Kind, Tensor};

use crate::draws::Out;
use crate::error::{Error, Result};

/// Serialises the reseeding of libtorch's global CPU generator.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Where reference modules are built and with which seed. The dtype is the workload's
/// (`Workload::dtype`), never a second setting here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setup {
    pub device: Device,
    pub seed: u64,
}

/// The libtorch kind of a model dtype.
pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    match dtype {
        Dtype::Bf16 => Ok(Kind::BFloat16),
        Dtype::F16 => Ok(Kind::Half),
        Dtype::F32 => Ok(Kind::Float),
        other => Err(Error::Model(modelmeter::Error::invalid(
            "dtype",
            other,
            modelmeter::dtype::MODEL_DTYPE_SPELLINGS,
        ))),
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// FNV-1a of the seed and a name: an independent stream per parameter.
fn stream(seed: u64, name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// Unit-variance values for `name` ([`crate::draws::normal`]), on the CPU in fp32.
pub fn seeded_normal(seed: u64, name: &str, shape: &[i64]) -> Result<Tensor> {
    seeded_affine(seed, name, shape, 1.0, 0.0)
}

/// `shift + scale · seeded_normal(seed, name, shape)` drawn on `device` (fp32).
fn seeded_affine_on(
    device: Device,
    seed: u64,
    name: &str,
    shape: &[i64],
    scale: f32,
    shift: f32,
) -> Result<Tensor> {
    if device == Device::Cpu {
        return seeded_affine(seed, name, shape, scale, shift);
    }
    seeded_affine_kernels(device, seed, name, shape, scale, shift)
}

/// [`seeded_affine_on`]'s path off the CPU: the same values drawn by tensor kernels on
/// `device` (on a GPU a few elementwise kernels instead of a host loop and a copy). Any
/// device takes it; the tests run it on the CPU against [`seeded_affine`].
fn seeded_affine_kernels(
    device: Device,
    seed: u64,
    name: &str,
    shape: &[i64],
    scale: f32,
    shift: f32,
) -> Result<Tensor> {
    let count = element_count(name, shape)? as i64;
    let flat = crate::draws::normal_on(device, stream(seed, name) as u64, count, scale, shift)?;
    Ok(flat.f_view(shape)?)
}

/// The element count of the parameter `name` of `shape` (it fits in an `i64`).
fn element_count(name: &str, shape: &[i64]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| {
            Error::Model(modelmeter::Error::overflow(format!(
                "the element count of {name} {shape:?}"
            )))
        })
}

/// `shift + scale · seeded_normal(seed, name, shape)`, drawn in one pass on the CPU: a
/// [`PendingDraws`] of one parameter, drawn at once.
fn seeded_affine(seed: u64, name: &str, shape: &[i64], scale: f32, shift: f32) -> Result<Tensor> {
    let pending = PendingDraws::default();
    let tensor = pending.defer(seed, name, shape, Kind::Float, scale, shift)?;
    pending.draw_all();
    Ok(tensor)
}

/// Token ids uniform in `0 .. vocab` for `name`, on the CPU (int64).
pub fn seeded_ids(seed: u64, name: &str, shape: &[i64], vocab: i64) -> Result<Tensor> {
    let _lock = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(stream(seed, name));
    Ok(Tensor::f_randint(vocab, shape, (Kind::Int64, Device::Cpu))?)
}

/// What identifies a drawn parameter: the same key gives the same values (its stream is
/// the seed and the name; then the shape, scaling and dtype), so one tensor can serve
/// every module that draws it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DrawKey {
    name: String,
    shape: Vec<i64>,
    /// `scale` and `shift` as bits (f32 has no `Eq`).
    affine: (u32, u32),
    kind: Kind,
    device: Device,
    seed: u64,
}

/// Parameters kept from one module for the next one that draws the same (a standalone
/// `DeepseekV2MoE`'s 64 experts for the MoE decoder layer). Modules never write their
/// weights, so sharing the tensors changes no value and no count; it saves drawing
/// them again. [`WeightCache::drop_unused`] (right after a module is built) and
/// [`WeightCache::finish_module`] (after it ran) keep only what the module uses and then
/// what the next one may draw, so no parameters but the running module's own are alive
/// while it runs, and the memory pre-check's per-layer need stays right.
#[derive(Debug, Default)]
pub struct WeightCache {
    tensors: RefCell<HashMap<DrawKey, Tensor>>,
    /// The keys the module being built drew or reused.
    used: RefCell<HashSet<DrawKey>>,
    reused_bytes: Cell<u64>,
}

impl WeightCache {
    /// An empty cache.
    pub fn new() -> WeightCache {
        WeightCache::default()
    }

    fn get_or_draw(&self, key: DrawKey, draw: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let cached = self.tensors.borrow().get(&key).map(Tensor::shallow_clone);
        let tensor = match cached {
            Some(t) => {
                self.reused_bytes
                    .set(self.reused_bytes.get() + tensor_bytes(&t));
                t
            }
            None => {
                let t = draw()?;
                self.tensors
                    .borrow_mut()
                    .insert(key.clone(), t.shallow_clone());
                t
            }
        };
        self.used.borrow_mut().insert(key);
        Ok(tensor)
    }

    /// Right after a module was built: drops what was kept for it that it did not take,
    /// so that while it runs no parameters but its own are alive.
    pub fn drop_unused(&self) {
        let used = self.used.borrow();
        self.tensors
            .borrow_mut()
            .retain(|key, _| used.contains(key));
    }

    /// After a module ran: keeps the parameters it used whose names `next_may_draw`
    /// accepts, drops the rest.
    pub fn finish_module(&self, next_may_draw: impl Fn(&str) -> bool) {
        let used = std::mem::take(&mut *self.used.borrow_mut());
        self.tensors
            .borrow_mut()
            .retain(|key, _| used.contains(key) && next_may_draw(&key.name));
    }

    /// The names of the parameters the module being built has drawn or reused so far.
    pub fn names_in_use(&self) -> Vec<String> {
        let mut names: Vec<String> = self.used.borrow().iter().map(|k| k.name.clone()).collect();
        names.sort();
        names
    }

    /// Bytes of parameters handed out again instead of drawn, so far.
    pub fn reused_bytes(&self) -> u64 {
        self.reused_bytes.get()
    }

    /// Bytes of the parameters kept now.
    pub fn kept_bytes(&self) -> u64 {
        self.tensors.borrow().values().map(tensor_bytes).sum()
    }
}

/// Draws the parameters of one module, named by their vendor path (`mlp.gate_proj.weight`).
#[derive(Clone, Debug)]
pub(crate) struct Init {
    setup: Setup,
    kind: Kind,
    prefix: String,
    /// Parameters shared with the modules built before and after this one, if any.
    cache: Option<Rc<WeightCache>>,
    /// Where CPU parameters wait to be drawn together ([`build_then_draw`]), if any.
    pending: Option<Rc<PendingDraws>>,
}

impl Init {
    /// Parameters on `setup.device` in the model dtype `dtype`.
    pub(crate) fn new(setup: &Setup, dtype: Dtype) -> Result<Init> {
        Ok(Init {
            setup: *setup,
            kind: kind_of(dtype)?,
            prefix: String::new(),
            cache: None,
            pending: None,
        })
    }

    /// [`Init::new`], handing out the parameters `cache` holds (if any) and keeping what
    /// it draws there.
    pub(crate) fn sharing(
        setup: &Setup,
        dtype: Dtype,
        cache: Option<Rc<WeightCache>>,
    ) -> Result<Init> {
        Ok(Init {
            cache,
            ..Init::new(setup, dtype)?
        })
    }

    /// The initialiser of a sub-module called `name`.
    pub(crate) fn sub(&self, name: &str) -> Init {
        Init {
            setup: self.setup,
            kind: self.kind,
            prefix: format!("{}{name}.", self.prefix),
            cache: self.cache.clone(),
            pending: self.pending.clone(),
        }
    }

    /// `shift + scale · N(0, 1)` values for the parameter `name` of `shape`, drawn on the
    /// module's device and cast to its dtype (or handed out by the cache, which drew the
    /// same).
    fn draw(&self, name: &str, shape: &[i64], scale: f32, shift: f32) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let draw = || -> Result<Tensor> {
            if let Some(pending) = &self.pending {
                if self.setup.device == Device::Cpu {
                    return pending.defer(self.setup.seed, &full, shape, self.kind, scale, shift);
                }
            }
            let t = seeded_affine_on(
                self.setup.device,
                self.setup.seed,
                &full,
                shape,
                scale,
                shift,
            )?;
            Ok(t.f_to_kind(self.kind)?)
        };
        match &self.cache {
            None => draw(),
            Some(cache) => {
                let key = DrawKey {
                    name: full.clone(),
                    shape: shape.to_vec(),
                    affine: (scale.to_bits(), shift.to_bits()),
                    kind: self.kind,
                    device: self.setup.device,
                    seed: self.setup.seed,
                };
                cache.get_or_draw(key, draw)
            }
        }
    }

    /// A linear weight `[out, in]` with standard deviation 1/√in, so that activations
    /// keep unit scale through the layers (and the gate's logits spread the routing).
    pub(crate) fn linear(&self, name: &str, out_features: i64, in_features: i64) -> Result<Tensor> {
        let scale = 1.0 / (in_features as f32).sqrt();
        self.draw(name, &[out_features, in_features], scale, 0.0)
    }

    /// An embedding table `[rows, cols]` of standard-normal values (`nn.Embedding`'s
    /// initialisation), so the first layer sees unit-scale inputs.
    pub(crate) fn embedding(&self, name: &str, rows: i64, cols: i64) -> Result<Tensor> {
        self.draw(name, &[rows, cols], 1.0, 0.0)
    }

    /// A bias `[n]` with standard deviation 0.1.
    pub(crate) fn bias(&self, name: &str, n: i64) -> Result<Tensor> {
        self.draw(name, &[n], 0.1, 0.0)
    }

    /// A norm weight `[n]` near 1 (1 + 0.1·N(0,1)), so the parity check sees it applied.
    pub(crate) fn norm(&self, name: &str, n: i64) -> Result<Tensor> {
        self.draw(name, &[n], 0.1, 1.0)
    }

    pub(crate) fn setup(&self) -> &Setup {
        &self.setup
    }
}

/// CPU parameters allocated while a module is built and drawn together once it is
/// ([`build_then_draw`]): one pass over all their values split evenly over the threads
/// ([`crate::draws::fill_all`]), instead of a threaded fill per parameter, whose start,
/// join and serial allocation between parameters left the build's two CPUs idle 40 % of
/// the time (DeepSeek-OCR's 192 expert weights; docs/performance.md, twenty-first
/// session). A bf16 or fp16 parameter is drawn in its dtype, each value rounded as it is
/// drawn (no fp32 copy and cast). The values are [`seeded_affine`]'s, cast by `to_kind`
/// to the parameter's dtype, bit for bit.
#[derive(Debug, Default)]
pub(crate) struct PendingDraws {
    /// Each parameter (a shallow clone: it stays allocated) with its stream, scale, shift.
    waiting: RefCell<Vec<(Tensor, u64, f32, f32)>>,
}

impl PendingDraws {
    /// An uninitialised CPU tensor of `kind` (fp32, bf16 or fp16) for the parameter
    /// `name`, drawn by [`PendingDraws::draw_all`].
    fn defer(
        &self,
        seed: u64,
        name: &str,
        shape: &[i64],
        kind: Kind,
        scale: f32,
        shift: f32,
    ) -> Result<Tensor> {
        element_count(name, shape)?;
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(Error::Model(modelmeter::Error::invalid(
                "parameter dtype",
                format!("{kind:?}"),
                "fp32, bf16 or fp16",
            )));
        }
        let tensor = Tensor::f_empty(shape, (kind, Device::Cpu))?;
        self.waiting.borrow_mut().push((
            tensor.shallow_clone(),
            stream(seed, name) as u64,
            scale,
            shift,
        ));
        Ok(tensor)
    }

    /// Draws every parameter deferred so far.
    fn draw_all(&self) {
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        let fills = waiting
            .iter()
            .filter(|(tensor, ..)| tensor.numel() > 0)
            .map(|(tensor, stream, scale, shift)| {
                let (ptr, numel) = (tensor.data_ptr(), tensor.numel());
                // SAFETY: each tensor was allocated by `defer` (libtorch, CPU, contiguous,
                // `numel` elements of its kind: fp32, bf16 or fp16, whose layouts `f32`,
                // `half::bf16` and `half::f16` have), a tensor of its own, so no two slices
                // overlap; `waiting` keeps it alive until the fill returns, and nothing
                // reads it before: the module that holds it is handed out only after
                // `draw_all`. Its values are uninitialised: the fill only writes them, each
                // once.
                let out = unsafe {
                    match tensor.kind() {
                        Kind::BFloat16 => Out::Bf16(std::slice::from_raw_parts_mut(
                            ptr as *mut half::bf16,
                            numel,
                        )),
                        Kind::Half => {
                            Out::F16(std::slice::from_raw_parts_mut(ptr as *mut half::f16, numel))
                        }
                        _ => Out::F32(std::slice::from_raw_parts_mut(ptr as *mut f32, numel)),
                    }
                };
                crate::draws::Fill {
                    stream: *stream,
                    out,
                    scale: *scale,
                    shift: *shift,
                }
            })
            .collect();
        crate::draws::fill_all(fills);
    }
}

/// Builds a module with `init`'s settings, its CPU parameters drawn together once `build`
/// returns (see [`PendingDraws`]); on other devices each is drawn as it is created. The
/// module is never seen with a parameter undrawn, and neither is anything else: the
/// parameters deferred before `build` failed or panicked are drawn too, since a
/// [`WeightCache`] may already hold them for the next module.
pub(crate) fn build_then_draw<T>(init: &Init, build: impl FnOnce(&Init) -> Result<T>) -> Result<T> {
    /// Draws what is pending however `build` ends (a panic unwinding included).
    struct DrawOnExit(Rc<PendingDraws>);
    impl Drop for DrawOnExit {
        fn drop(&mut self) {
            self.0.draw_all();
        }
    }
    let pending = DrawOnExit(Rc::new(PendingDraws::default()));
    let init = Init {
        pending: Some(Rc::clone(&pending.0)),
        ..init.clone()
    };
    let module = build(&init);
    drop(pending);
    module
}

/// `F.linear(x, weight, bias)`.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(x.f_linear(weight, bias)?)
}

/// Converts a model size to the `i64` libtorch takes.
pub(crate) fn dim(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::Model(modelmeter::Error::invalid(what, value, "a size below 2^63")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_deferred_before_a_build_fails_are_drawn_all_the_same() {
        // A cache may hand a deferred parameter to the next module: it must hold its
        // values after a build that failed, or panicked, once it had deferred it.
        let setup = Setup {
            device: Device::Cpu,
            seed: 4,
        };
        let init = Init::new(&setup, Dtype::F32).unwrap().sub("mlp");
        let drawn = init.linear("up_proj.weight", 64, 3_000).unwrap();
        for panics in [false, true] {
            let kept = RefCell::new(None);
            let build = || {
                build_then_draw(&init, |init| -> Result<()> {
                    *kept.borrow_mut() = Some(init.linear("up_proj.weight", 64, 3_000)?);
                    if panics {
                        panic!("a failed build");
                    }
                    Err(Error::Model(modelmeter::Error::overflow("a failed build")))
                })
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build));
            assert_eq!(outcome.is_err(), panics);
            let kept = kept.into_inner().expect("the build deferred a parameter");
            assert!(kept.equal(&drawn), "panics: {panics}");
        }
    }

    #[test]
    fn parameters_drawn_together_equal_those_drawn_one_by_one() {
        use crate::mlp::RefDeepseekV2MLP;
        use crate::Parameters;
        // 64 × 3,000 values per weight: each fill is split over threads either way.
        let setup = Setup {
            device: Device::Cpu,
            seed: 3,
        };
        // In bf16 and fp16 one by one is the fp32 draw cast by libtorch (`to_kind`), and
        // together the values rounded as they are drawn (`half`): the same bits.
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let init = Init::new(&setup, dtype).unwrap().sub("mlp");
            let one_by_one = RefDeepseekV2MLP::new(64, 3_000, &init).unwrap();
            let together =
                build_then_draw(&init, |init| RefDeepseekV2MLP::new(64, 3_000, init)).unwrap();
            let (a, b) = (one_by_one.parameters(), together.parameters());
            assert_eq!(a.len(), 3);
            for ((name_a, a), (name_b, b)) in a.iter().zip(&b) {
                assert_eq!(name_a, name_b);
                assert_eq!(a.kind(), b.kind(), "{name_a}");
                assert!(a.equal(b), "{name_a} in {dtype:?}");
            }
        }
    }

    #[test]
    fn a_stream_is_fnv_1a_of_the_name_over_the_seeded_basis_halved() {
        // Published FNV-1a 64-bit test vectors (seed 0 leaves the offset basis as it is),
        // shifted right once so the stream is a non-negative i64.
        for (name, fnv) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            assert_eq!(stream(0, name), (fnv >> 1) as i64, "{name:?}");
        }
        // Every seed gives its parameter its own stream (the seed is mixed in, not
        // masked by the basis's bits).
        let streams: HashSet<i64> = (0..4096)
            .map(|seed| stream(seed, "mlp.up_proj.weight"))
            .collect();
        assert_eq!(streams.len(), 4096);
    }

    #[test]
    fn each_kind_of_parameter_has_its_scale() {
        // The activations keep unit scale through the layers because a linear weight's
        // standard deviation is 1/√in; biases are small, norm weights near 1.
        let setup = Setup {
            device: Device::Cpu,
            seed: 5,
        };
        let init = Init::new(&setup, Dtype::F32).unwrap().sub("m");
        let moments = |t: &Tensor| {
            (
                t.mean(Kind::Double).double_value(&[]),
                t.std(true).double_value(&[]),
            )
        };
        let (mean, std) = moments(&init.linear("w", 256, 1_024).unwrap());
        assert!(mean.abs() < 1e-3, "linear mean {mean}");
        approx::assert_relative_eq!(std, 1.0 / 32.0, max_relative = 0.02);
        let (mean, std) = moments(&init.embedding("e", 256, 1_024).unwrap());
        assert!(mean.abs() < 0.01, "embedding mean {mean}");
        approx::assert_relative_eq!(std, 1.0, max_relative = 0.02);
        let bias = init.bias("b", 100_000).unwrap();
        assert_eq!(bias.size(), [100_000]);
        let (mean, std) = moments(&bias);
        assert!(mean.abs() < 0.01, "bias mean {mean}");
        approx::assert_relative_eq!(std, 0.1, max_relative = 0.02);
        let (mean, std) = moments(&init.norm("n", 100_000).unwrap());
        approx::assert_relative_eq!(mean, 1.0, max_relative = 0.01);
        approx::assert_relative_eq!(std, 0.1, max_relative = 0.02);
    }

    #[test]
    fn a_module_s_cpu_parameters_wait_for_the_build_to_end_and_empty_ones_are_skipped() {
        // While a module is built on the CPU its parameters are only allocated (drawn
        // together afterwards, PendingDraws); a parameter with no elements has no
        // memory to fill and is passed over (its data pointer may be null).
        let setup = Setup {
            device: Device::Cpu,
            seed: 6,
        };
        let init = Init::new(&setup, Dtype::Bf16).unwrap().sub("m");
        let (weight, empty) = build_then_draw(&init, |init| {
            let weight = init.linear("w", 8, 16)?;
            let empty = init.linear("none", 0, 16)?;
            let pending = init.pending.as_ref().expect("the build defers its draws");
            assert_eq!(pending.waiting.borrow().len(), 2);
            Ok((weight, empty))
        })
        .unwrap();
        assert!(weight.equal(&init.linear("w", 8, 16).unwrap()));
        assert_eq!(empty.size(), [0, 16]);
    }

    #[test]
    fn a_finished_module_keeps_only_what_it_used_and_the_next_may_draw() {
        let setup = Setup {
            device: Device::Cpu,
            seed: 2,
        };
        let cache = Rc::new(WeightCache::new());
        let init = Init::sharing(&setup, Dtype::F32, Some(Rc::clone(&cache))).unwrap();
        let _kept = init.linear("kept", 4, 4).unwrap();
        let _dropped = init.linear("dropped", 4, 4).unwrap();
        cache.finish_module(|name| name == "kept");
        assert_eq!(cache.kept_bytes(), 4 * 4 * 4);
        // The next module uses nothing it was kept: nothing stays after it.
        cache.finish_module(|_| true);
        assert_eq!(cache.kept_bytes(), 0);
    }

    #[test]
    fn same_name_same_values_other_name_other_values() {
        let a = seeded_normal(7, "mlp.gate_proj.weight", &[4, 4]).unwrap();
        let b = seeded_normal(7, "mlp.gate_proj.weight", &[4, 4]).unwrap();
        let c = seeded_normal(7, "mlp.up_proj.weight", &[4, 4]).unwrap();
        let d = seeded_normal(8, "mlp.gate_proj.weight", &[4, 4]).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
        assert!(!a.equal(&d));
    }

    #[test]
    fn the_device_path_draws_the_cpu_path_s_values() {
        // The path a GPU takes (seeded_affine_kernels: tensor kernels), here on the CPU:
        // the same tensor as the CPU loop, for each kind of parameter's scale and shift,
        // and the same after the cast to each model dtype (Init::draw's next step).
        let name = "mlp.experts.7.up_proj.weight";
        for (scale, shift) in [(1.0, 0.0), (0.1, 1.0), (1.0 / 896f32.sqrt(), 0.0)] {
            let cpu = seeded_affine(3, name, &[33, 17], scale, shift).unwrap();
            let kernels =
                seeded_affine_kernels(Device::Cpu, 3, name, &[33, 17], scale, shift).unwrap();
            assert_eq!(kernels.size(), [33, 17]);
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                assert!(cpu.to_kind(kind).equal(&kernels.to_kind(kind)), "{kind:?}");
            }
        }
        // Another name or seed draws other values on that path too.
        let other = seeded_affine_kernels(
            Device::Cpu,
            3,
            "mlp.experts.7.gate_proj.weight",
            &[33, 17],
            1.0,
            0.0,
        )
        .unwrap();
        let base = seeded_affine_kernels(Device::Cpu, 3, name, &[33, 17], 1.0, 0.0).unwrap();
        let seed = seeded_affine_kernels(Device::Cpu, 4, name, &[33, 17], 1.0, 0.0).unwrap();
        assert!(!other.equal(&base) && !seed.equal(&base));
    }
}

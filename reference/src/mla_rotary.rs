//! `DeepseekV2RotaryEmbedding` and `DeepseekV2YarnRotaryEmbedding` of the vendor
//! `modeling_deepseek.py` (DeepSeek-V2, V2-Lite, V3): the cos/sin tables of the MLA
//! attention's rotary part (d_r = `qk_rope_head_dim` dims).
//!
//! The vendor builds the tables in `__init__` and then sets `max_seq_len_cached = None`,
//! so its `forward(x, seq_len)` rebuilds them whenever it has none or `seq_len` exceeds
//! the length they were built for:
//! ```python
//! if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
//!     self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
//! return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)
//! ```
//! In a generation `seq_len` (the keys of the call) grows at every step, so every call
//! rebuilds the tables over all its keys: these ops are part of the forward. The tables
//! built in `__init__` are never read (the first call rebuilds them), so they are not
//! built here.
//!
//! Tensors are dropped where the vendor's Python drops them (peak activation memory):
//! temporaries when the op consuming them returns, the locals of `_set_cos_sin_cache`
//! when it returns, while the buffers it registers (`cos_cached`, `sin_cached`, and
//! YaRN's rebuilt `inv_freq`) stay with the module.

use std::sync::Mutex;

use modelmeter::{ModelConfig, YarnScaling};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::weights::dim;

/// The rotary tables of one MLA layer and the length they were last built for.
#[derive(Debug)]
pub struct RefDeepseekV2RotaryEmbedding {
    dim: i64,
    base: f64,
    yarn: Option<YarnScaling>,
    /// Plain rotary only: `inv_freq`, a buffer computed in `__init__`.
    inv_freq: Option<Tensor>,
    /// `(cos_cached, sin_cached, max_seq_len_cached)`.
    cached: Mutex<Option<(Tensor, Tensor, i64)>>,
    /// YaRN only: the `inv_freq` buffer `_set_cos_sin_cache` registers at each rebuild,
    /// held like the tables (it is never read again).
    yarn_inv_freq: Mutex<Option<Tensor>>,
}

/// What a [`RefDeepseekV2RotaryEmbedding`] holds between calls (its tables, the length they
/// were built for, YaRN's buffer): saved before a call that must leave no trace (a
/// warm-up) and put back after it.
#[derive(Debug)]
pub struct RotaryState {
    cached: Option<(Tensor, Tensor, i64)>,
    yarn_inv_freq: Option<Tensor>,
}

impl RefDeepseekV2RotaryEmbedding {
    /// The state a call would change: handles on the tables (no copy).
    pub fn save(&self) -> RotaryState {
        let shallow = |t: &Tensor| t.shallow_clone();
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let yarn = self.yarn_inv_freq.lock().unwrap_or_else(|p| p.into_inner());
        RotaryState {
            cached: cached
                .as_ref()
                .map(|(c, s, n)| (shallow(c), shallow(s), *n)),
            yarn_inv_freq: yarn.as_ref().map(shallow),
        }
    }

    /// Puts back a state [`RefDeepseekV2RotaryEmbedding::save`] took: the next call
    /// rebuilds (or not) exactly as it would have before the calls in between.
    pub fn restore(&self, state: RotaryState) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = state.cached;
        *self.yarn_inv_freq.lock().unwrap_or_else(|p| p.into_inner()) = state.yarn_inv_freq;
    }
}

/// What `_set_cos_sin_cache` builds: the tables and, with YaRN, the `inv_freq` buffer.
struct Tables {
    cos: Tensor,
    sin: Tensor,
    yarn_inv_freq: Option<Tensor>,
}

impl RefDeepseekV2RotaryEmbedding {
    /// The rotary embedding of `config`'s MLA layers (YaRN when `rope_scaling` is set).
    pub(crate) fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let d = dim(config.mla()?.qk_rope_head_dim, "qk_rope_head_dim")?;
        let yarn = config.rope_scaling.clone();
        let inv_freq = match yarn {
            Some(_) => None,
            // 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), in __init__.
            None => Some(
                Tensor::f_pow_scalar(
                    config.rope_theta,
                    &Tensor::f_arange_start_step(0, d, 2, (Kind::Float, device))?
                        .f_div_scalar(d as f64)?,
                )?
                .f_reciprocal()?,
            ),
        };
        Ok(RefDeepseekV2RotaryEmbedding {
            dim: d,
            base: config.rope_theta,
            yarn,
            inv_freq,
            cached: Mutex::new(None),
            yarn_inv_freq: Mutex::new(None),
        })
    }

    /// `forward(x, seq_len)`: cos and sin `[seq_len, d_r]` in `kind`, rebuilt first when
    /// the tables are shorter than `seq_len` (or not built yet).
    pub fn forward(&self, seq_len: i64, kind: Kind, device: Device) -> Result<(Tensor, Tensor)> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match cached.as_ref() {
            None => true,
            Some((_, _, len)) => seq_len > *len,
        };
        if stale {
            let Tables {
                cos,
                sin,
                yarn_inv_freq,
            } = self.tables(seq_len, kind, device)?;
            *cached = Some((cos, sin, seq_len));
            if yarn_inv_freq.is_some() {
                *self.yarn_inv_freq.lock().unwrap_or_else(|p| p.into_inner()) = yarn_inv_freq;
            }
        }
        let (cos, sin, _) = cached.as_ref().expect("set above");
        Ok((
            cos.f_slice(0, 0, seq_len, 1)?.f_to_kind(kind)?,
            sin.f_slice(0, 0, seq_len, 1)?.f_to_kind(kind)?,
        ))
    }

    /// `_set_cos_sin_cache(seq_len, device, dtype)`. Its locals (`t`, `freqs`, `emb`,
    /// and YaRN's `freq_extra`, `freq_inter`, `inv_freq_mask`) go when it returns.
    fn tables(&self, seq_len: i64, kind: Kind, device: Device) -> Result<Tables> {
        let f32 = (Kind::Float, device);
        let (inv_freq, _yarn_locals, mscale) = match (&self.yarn, &self.inv_freq) {
            (Some(yarn), _) => {
                let (inv_freq, locals) = self.yarn_inv_freq(yarn, device)?;
                (inv_freq, Some(locals), yarn_mscale(yarn))
            }
            (None, Some(inv_freq)) => (inv_freq.f_to_device(device)?, None, None),
            (None, None) => unreachable!("plain rotary keeps its inv_freq"),
        };
        let t = Tensor::f_arange(seq_len, f32)?;
        let freqs = t.f_outer(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        // `(emb.cos() * _mscale).to(dtype)`: each intermediate is a temporary, dropped
        // once the op consuming it returns.
        let table = |x: Tensor| -> Result<Tensor> {
            let x = match mscale {
                Some(m) => {
                    let scaled = x.f_mul_scalar(m)?;
                    drop(x);
                    scaled
                }
                None => x,
            };
            Ok(x.f_to_kind(kind)?)
        };
        let cos = table(emb.f_cos()?)?;
        let sin = table(emb.f_sin()?)?;
        Ok(Tables {
            cos,
            sin,
            yarn_inv_freq: self.yarn.as_ref().map(|_| inv_freq),
        })
    }

    /// The YaRN frequencies, as `DeepseekV2YarnRotaryEmbedding._set_cos_sin_cache`
    /// computes them at every rebuild:
    /// ```python
    /// freq_extra = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    /// freq_inter = 1.0 / (self.scaling_factor * self.base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    /// low, high = yarn_find_correction_range(beta_fast, beta_slow, dim, base, original_max_position_embeddings)
    /// inv_freq_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2).to(device=device, dtype=torch.float32)
    /// inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
    /// ```
    /// Python's `1.0 / x` is `x.reciprocal() * 1.0`, and `1.0 - x` is `torch.rsub(x, 1.0)`.
    ///
    /// Returns `inv_freq` and the locals `[freq_extra, freq_inter, inv_freq_mask]`, which
    /// live until `_set_cos_sin_cache` returns. Each temporary is dropped once the op
    /// consuming it returned, as Python drops it (a Rust temporary would live to the end
    /// of its statement).
    fn yarn_inv_freq(&self, yarn: &YarnScaling, device: Device) -> Result<(Tensor, [Tensor; 3])> {
        let f32 = (Kind::Float, device);
        let d = self.dim;
        // `base ** (torch.arange(0, dim, 2) / dim)`.
        let powers = || -> Result<Tensor> {
            let steps = Tensor::f_arange_start_step(0, d, 2, f32)?;
            let exponent = steps.f_div_scalar(d as f64)?;
            drop(steps);
            Ok(Tensor::f_pow_scalar(self.base, &exponent)?)
        };
        // `1.0 / x` (`Tensor.__rtruediv__`): the reciprocal is the method's temporary, x
        // its argument, both dropped when it returns.
        let rdiv = |x: Tensor| -> Result<Tensor> {
            let reciprocal = x.f_reciprocal()?;
            Ok(reciprocal.f_mul_scalar(1.0)?)
        };
        let freq_extra = rdiv(powers()?)?;
        let scaled = {
            let powers = powers()?;
            powers.f_mul_scalar(yarn.factor)?
        };
        let freq_inter = rdiv(scaled)?;
        let (low, high) = correction_range(yarn, d, self.base);
        // yarn_linear_ramp_mask(min, max, dim): max += 0.001 when min == max;
        // `linear_func = (torch.arange(dim) - min) / (max - min)`, returns
        // `torch.clamp(linear_func, 0, 1)`. Its `arange` names no device, so the ramp is
        // made on the host; `.to(device=device, dtype=float32)` copies it to a GPU (on the
        // CPU it hands the ramp back).
        let ramp = {
            let steps = Tensor::f_arange(d / 2, (Kind::Float, Device::Cpu))?;
            let shifted = steps.f_sub_scalar(low)?;
            drop(steps);
            let high = if low == high { high + 0.001 } else { high };
            let linear_func = shifted.f_div_scalar(high - low)?;
            drop(shifted);
            linear_func.f_clamp(0.0, 1.0)?
        };
        let on_device = ramp.f_to_device_(device, Kind::Float, false, false)?;
        drop(ramp);
        let inv_freq_mask = on_device.f_rsub_scalar(1.0)?;
        drop(on_device);
        // `freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask`.
        let inter = {
            let keep = inv_freq_mask.f_rsub_scalar(1.0)?;
            freq_inter.f_mul(&keep)?
        };
        let extra = freq_extra.f_mul(&inv_freq_mask)?;
        let inv_freq = inter.f_add(&extra)?;
        Ok((inv_freq, [freq_extra, freq_inter, inv_freq_mask]))
    }
}

/// `yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)`: the
/// factor the YaRN tables are multiplied by (a Python float; the multiply runs even when
/// it is 1.0).
fn yarn_mscale(yarn: &YarnScaling) -> Option<f64> {
    use modelmeter::mla_config::yarn_get_mscale;
    Some(
        yarn_get_mscale(yarn.factor, yarn.mscale)
            / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim),
    )
}

/// `yarn_find_correction_range(beta_fast, beta_slow, dim, base, original_max)`:
/// `(max(floor(low), 0), min(ceil(high), dim - 1))`.
fn correction_range(yarn: &YarnScaling, dim: i64, base: f64) -> (f64, f64) {
    let max_pos = yarn.original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| {
        (dim as f64 * (max_pos / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
    };
    let low = correction_dim(yarn.beta_fast).floor().max(0.0);
    let high = correction_dim(yarn.beta_slow).ceil().min((dim - 1) as f64);
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_rebuilt_only_when_the_keys_outgrow_them() {
        let config = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let r = RefDeepseekV2RotaryEmbedding::new(&config, Device::Cpu).unwrap();
        let (cos, _) = r.forward(8, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(cos.size(), [8, 64]);
        let built = |r: &RefDeepseekV2RotaryEmbedding| r.cached.lock().unwrap().as_ref().unwrap().2;
        assert_eq!(built(&r), 8);
        let _ = r.forward(5, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(built(&r), 8, "shorter: sliced, not rebuilt");
        let _ = r.forward(9, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(built(&r), 9);
    }

    #[test]
    fn yarn_correction_range_of_v2_lite() {
        // dim 64, base 10000, original 4096: beta_fast 32 → floor(10.2) = 10,
        // beta_slow 1 → ceil(22.9) = 23.
        let config = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let yarn = config.rope_scaling.unwrap();
        assert_eq!(correction_range(&yarn, 64, 10_000.0), (10.0, 23.0));
        assert_eq!(yarn_mscale(&yarn), Some(1.0));
    }
}

//! The ATen calls that recur across the vendor modules, each written once.

use std::fmt::Display;

use crate::checked::product;
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::metrics::CostBuilder;
use crate::shape::{broadcast, Shape};

/// A tensor of `shape` and `dtype`.
pub(crate) fn t(shape: &[u64], dtype: Dtype) -> TensorMeta {
    TensorMeta::new(shape, dtype)
}

/// A tensor argument (borrowed: an op call copies none of its tensors).
pub(crate) fn arg(x: &TensorMeta) -> ArgRef<'_> {
    ArgRef::Tensor(x)
}

/// `x` with its last dimension replaced by `last`.
pub(crate) fn with_last(x: &TensorMeta, last: u64) -> TensorMeta {
    let mut shape = x.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = last;
    }
    TensorMeta::from_shape(shape, x.dtype)
}

/// Bytes of `count` elements of `dtype`.
pub(crate) fn bytes_of(what: &str, count: u64, dtype: Dtype) -> Result<u64> {
    let size = dtype
        .size_bytes()
        .ok_or_else(|| Error::invalid("dtype", dtype, crate::dtype::MODEL_DTYPE_SPELLINGS))?;
    product(what, &[count, size])
}

impl CostBuilder {
    /// `F.linear(x, W[out, in], b)` as libtorch dispatches it for contiguous inputs of
    /// at most 3 dimensions: `mm(x₂ᴅ, Wᵀ)` without bias, `addmm(b, x₂ᴅ, Wᵀ)` with one.
    pub(crate) fn linear(
        &mut self,
        role: impl Display,
        x: &TensorMeta,
        out_features: u64,
        bias: bool,
    ) -> Result<TensorMeta> {
        let (&in_features, rows) = x
            .shape
            .split_last()
            .ok_or_else(|| Error::op_shape("aten::linear", "a 0-d input"))?;
        let rows = product("linear rows", rows)?;
        let x2 = t(&[rows, in_features], x.dtype);
        let weight_t = t(&[in_features, out_features], x.dtype);
        let out2 = t(&[rows, out_features], x.dtype);
        let [out] = if bias {
            let b = t(&[out_features], x.dtype);
            self.op(
                role,
                "aten::addmm",
                &[arg(&b), arg(&x2), arg(&weight_t)],
                [out2],
            )?
        } else {
            self.op(role, "aten::mm", &[arg(&x2), arg(&weight_t)], [out2])?
        };
        // The 2-D result viewed back as `[.., out_features]`.
        Ok(out.viewed_as(&with_last(x, out_features).shape))
    }

    /// `x.to(dtype)`: a copy when the dtype changes, nothing when it does not.
    pub(crate) fn cast(
        &mut self,
        role: impl Display,
        x: &TensorMeta,
        dtype: Dtype,
    ) -> Result<TensorMeta> {
        if x.dtype == dtype {
            return Ok(x.clone());
        }
        let [out] = self.op(role, "aten::to", &[arg(x)], [t(&x.shape, dtype)])?;
        Ok(out)
    }

    /// An elementwise op over `inputs` (tensors broadcast together); the result has the
    /// broadcast shape and `out_dtype`.
    pub(crate) fn elementwise<const N: usize>(
        &mut self,
        role: impl Display,
        op: &'static str,
        inputs: [&TensorMeta; N],
        out_dtype: Dtype,
    ) -> Result<TensorMeta> {
        // The first input's shape, broadcast with each of the others.
        let mut broadcast_shape: Option<Shape> = None;
        for x in inputs.iter().skip(1) {
            let shape = match &broadcast_shape {
                Some(shape) => shape,
                None => &inputs[0].shape,
            };
            broadcast_shape =
                Some(broadcast(shape, &x.shape).ok_or_else(|| {
                    Error::op_shape(op, format!("{:?} does not broadcast", x.shape))
                })?);
        }
        let shape = match (broadcast_shape, inputs.first()) {
            (Some(shape), _) => shape,
            (None, Some(x)) => x.shape.clone(),
            (None, None) => Shape::default(),
        };
        let out = TensorMeta::from_shape(shape, out_dtype);
        let [out] = self.op(role, op, &inputs.map(arg), [out])?;
        Ok(out)
    }

    /// `x * cos + rotate_half(x) * sin` (the vendor `apply_rotary_pos_emb` body) over
    /// `x` (`[B, H, S, d]`) and a `[B, 1, S, d]` table: `rotate_half` negates the second
    /// half and concatenates it before the first. `name` labels the ops (`q`, `k_pe` …).
    pub(crate) fn rotary(
        &mut self,
        name: &str,
        x: &TensorMeta,
        table: &TensorMeta,
    ) -> Result<TensorMeta> {
        let dtype = x.dtype;
        let x_cos =
            self.elementwise(format_args!("{name} * cos"), "aten::mul", [x, table], dtype)?;
        let half = with_last(x, x.shape.last().copied().unwrap_or(0) / 2);
        let neg = self.elementwise(
            format_args!("-{name}2 (rotate_half)"),
            "aten::neg",
            [&half],
            dtype,
        )?;
        let rotated = self.copy(
            format_args!("cat(-{name}2, {name}1)"),
            "aten::cat",
            [&neg, &half],
            t(&x.shape, dtype),
        )?;
        self.release(&[&neg])?;
        let rot_sin = self.elementwise(
            format_args!("rotate_half({name}) * sin"),
            "aten::mul",
            [&rotated, table],
            dtype,
        )?;
        self.release(&[&rotated])?;
        let out = self.elementwise(
            format_args!("{name}_embed = {name} * cos + rotate_half({name}) * sin"),
            "aten::add",
            [&x_cos, &rot_sin],
            dtype,
        )?;
        self.release(&[&x_cos, &rot_sin])?;
        Ok(out)
    }

    /// `matmul`'s contiguous copy of an operand `x` it cannot fold into its `bmm` batch
    /// (`aten::clone`, reading `x` at its full shape), when `copies`: a temporary of the
    /// `matmul`, for the caller to release once the `bmm` ran; `None` when it folds.
    pub(crate) fn matmul_copy(
        &mut self,
        role: impl Display,
        x: &TensorMeta,
        copies: bool,
    ) -> Result<Option<TensorMeta>> {
        if !copies {
            return Ok(None);
        }
        self.copy(role, "aten::clone", [x], t(&x.shape, x.dtype))
            .map(Some)
    }

    /// A data-movement op (`aten::cat`, `aten::index` …) reading `inputs` and writing `out`.
    pub(crate) fn copy<const N: usize>(
        &mut self,
        role: impl Display,
        op: &'static str,
        inputs: [&TensorMeta; N],
        out: TensorMeta,
    ) -> Result<TensorMeta> {
        let [out] = self.op(role, op, &inputs.map(arg), [out])?;
        Ok(out)
    }
}

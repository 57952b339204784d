//! Tensor element types, as users spell them and as libtorch reports them.

use serde::Serialize;
use std::fmt;

use crate::error::Error;

/// Element type of a tensor.
///
/// The model dtypes a workload may choose are [`Dtype::Bf16`], [`Dtype::F16`] and
/// [`Dtype::F32`]; the others appear in measured op records (index tensors, masks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    F16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    /// Unsigned 16/32/64-bit integers (libtorch 2.3+): the CUDA flash attention kernel
    /// hands back its philox seed and offset as `uint64` scalars.
    U16,
    U32,
    U64,
    Bool,
    /// Any of libtorch's 8-bit float formats (e4m3fn, e5m2 …): tensor-core GEMM inputs.
    F8,
    /// A type libtorch has and modelmeter does not model (complex, quantized …).
    Other,
}

/// The spellings [`Dtype::parse_model`] accepts, for error messages.
pub const MODEL_DTYPE_SPELLINGS: &str =
    "bf16 (bfloat16), fp16 (float16, half), fp32 (float32, float)";

impl Dtype {
    /// Parses a model dtype as users and Hugging Face configs spell it.
    pub fn parse_model(field: &str, text: &str) -> Result<Dtype, Error> {
        match text.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" | "torch.bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "f16" | "float16" | "half" | "torch.float16" => Ok(Dtype::F16),
            "fp32" | "f32" | "float32" | "float" | "torch.float32" => Ok(Dtype::F32),
            _ => Err(Error::invalid(field, text, MODEL_DTYPE_SPELLINGS)),
        }
    }

    /// Maps libtorch's `c10::toString(ScalarType)` names ("BFloat16", "Float", "Long" …).
    pub fn from_libtorch_name(name: &str) -> Dtype {
        match name {
            "BFloat16" => Dtype::Bf16,
            "Half" => Dtype::F16,
            "Float" => Dtype::F32,
            "Double" => Dtype::F64,
            "Long" => Dtype::I64,
            "Int" => Dtype::I32,
            "Short" => Dtype::I16,
            "Char" => Dtype::I8,
            "Byte" => Dtype::U8,
            "UInt16" => Dtype::U16,
            "UInt32" => Dtype::U32,
            "UInt64" => Dtype::U64,
            "Bool" => Dtype::Bool,
            name if name.starts_with("Float8_") => Dtype::F8,
            _ => Dtype::Other,
        }
    }

    /// Bytes per element; `None` for [`Dtype::Other`].
    pub fn size_bytes(self) -> Option<u64> {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => Some(8),
            Dtype::F32 | Dtype::I32 | Dtype::U32 => Some(4),
            Dtype::Bf16 | Dtype::F16 | Dtype::I16 | Dtype::U16 => Some(2),
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8 => Some(1),
            Dtype::Other => None,
        }
    }

    /// Floating-point element types; only ops on these count FLOPs (index and mask
    /// arithmetic on integers and booleans is bookkeeping, see the conventions table).
    pub fn is_floating(self) -> bool {
        matches!(
            self,
            Dtype::Bf16 | Dtype::F16 | Dtype::F32 | Dtype::F64 | Dtype::F8
        )
    }

    /// True for the dtypes a model (and so a workload) may run in.
    pub fn is_model_dtype(self) -> bool {
        matches!(self, Dtype::Bf16 | Dtype::F16 | Dtype::F32)
    }

    /// The short name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "fp16",
            Dtype::F32 => "fp32",
            Dtype::F64 => "fp64",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::I16 => "int16",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
            Dtype::U64 => "uint64",
            Dtype::Bool => "bool",
            Dtype::F8 => "fp8",
            Dtype::Other => "other",
        }
    }
}

/// Serialised as its short name (`"bf16"`, `"fp32"` …), as on the command line.
impl Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_spelling() {
        for (text, want) in [
            ("bf16", Dtype::Bf16),
            ("bfloat16", Dtype::Bf16),
            ("BF16", Dtype::Bf16),
            ("fp16", Dtype::F16),
            ("half", Dtype::F16),
            ("float16", Dtype::F16),
            ("fp32", Dtype::F32),
            ("float32", Dtype::F32),
            ("float", Dtype::F32),
        ] {
            assert_eq!(Dtype::parse_model("dtype", text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn unknown_dtype_names_the_value_and_the_choices() {
        let err = Dtype::parse_model("torch_dtype", "int4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("torch_dtype"), "{err}");
        assert!(err.contains("int4"), "{err}");
        assert!(err.contains("bf16"), "{err}");
    }

    #[test]
    fn libtorch_names_round_trip_to_sizes() {
        assert_eq!(Dtype::from_libtorch_name("BFloat16").size_bytes(), Some(2));
        assert_eq!(Dtype::from_libtorch_name("Float").size_bytes(), Some(4));
        assert_eq!(Dtype::from_libtorch_name("Long").size_bytes(), Some(8));
        assert_eq!(Dtype::from_libtorch_name("UInt64").size_bytes(), Some(8));
        assert_eq!(Dtype::from_libtorch_name("UInt32").size_bytes(), Some(4));
        assert_eq!(Dtype::from_libtorch_name("UInt16").size_bytes(), Some(2));
        assert_eq!(Dtype::from_libtorch_name("Float8_e4m3fn"), Dtype::F8);
        assert_eq!(Dtype::from_libtorch_name("ComplexFloat"), Dtype::Other);
        // Every name c10::toString(ScalarType) gives for the dtypes modelled, with
        // c10::elementSize's bytes.
        for (name, dtype, bytes) in [
            ("BFloat16", Dtype::Bf16, 2),
            ("Half", Dtype::F16, 2),
            ("Float", Dtype::F32, 4),
            ("Double", Dtype::F64, 8),
            ("Long", Dtype::I64, 8),
            ("Int", Dtype::I32, 4),
            ("Short", Dtype::I16, 2),
            ("Char", Dtype::I8, 1),
            ("Byte", Dtype::U8, 1),
            ("UInt16", Dtype::U16, 2),
            ("UInt32", Dtype::U32, 4),
            ("UInt64", Dtype::U64, 8),
            ("Bool", Dtype::Bool, 1),
            ("Float8_e5m2", Dtype::F8, 1),
        ] {
            assert_eq!(Dtype::from_libtorch_name(name), dtype, "{name}");
            assert_eq!(dtype.size_bytes(), Some(bytes), "{name}");
        }
        assert!(!Dtype::I64.is_floating());
        assert!(Dtype::F32.is_floating());
    }
}

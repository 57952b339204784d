//! Workloads: batch, phase (prefill or one decode step), dtype and the platform whose
//! kernels run them.

use serde::Serialize;

use crate::checked::{product, sum};
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Which forward pass a layer call belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Phase {
    /// A prompt of `seq_len` tokens: `S_q = S_kv = seq_len`.
    Prefill { seq_len: u64 },
    /// One generated token after `context_len` cached tokens: `S_q = 1`, and the vendor
    /// code attends over `S_kv = context_len + 1` keys (the new token included).
    Decode { context_len: u64 },
}

/// Which libtorch backend runs the layer. It decides which kernels libtorch dispatches to
/// (the fused attention kernel, whether it pads the head dim or falls back to the math
/// path), and with them some FLOPs and engines. Engines are always those of an NVIDIA GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// libtorch on an NVIDIA GPU, sm80 or newer (A100, H100, H200): what the analytic
    /// model estimates by default.
    #[default]
    Cuda,
    /// libtorch on the CPU (what `verify-decoder --device cpu` runs).
    Cpu,
}

impl Platform {
    /// The highest CUDA device index a `--device` may name: libtorch's device index is an
    /// int8 (`c10::DeviceIndex`), so a larger one would wrap to another device.
    pub const MAX_CUDA_INDEX: u8 = 127;

    /// Parses `cuda`, `cuda:N` or `cpu` (the spellings of `--device`).
    pub fn parse(text: &str) -> Result<Platform> {
        Ok(Platform::parse_device(text)?.0)
    }

    /// Parses a `--device`: `cpu`, `cuda` (device 0) or `cuda:N`, N in decimal digits
    /// from 0 to [`Platform::MAX_CUDA_INDEX`]; letter case and blanks around it are
    /// ignored. The platform and the CUDA device index (0 for the CPU): the one spelling
    /// rule of both binaries.
    pub fn parse_device(text: &str) -> Result<(Platform, u8)> {
        let lower = text.trim().to_ascii_lowercase();
        let index = |n: &str| {
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| n.parse::<u8>().ok())
                .flatten()
                .filter(|&i| i <= Platform::MAX_CUDA_INDEX)
        };
        match lower.as_str() {
            "cpu" => Ok((Platform::Cpu, 0)),
            "cuda" => Ok((Platform::Cuda, 0)),
            _ => match lower.strip_prefix("cuda:").and_then(index) {
                Some(i) => Ok((Platform::Cuda, i)),
                None => Err(Error::invalid(
                    "--device",
                    text,
                    &format!(
                        "cpu, cuda or cuda:N (N from 0 to {})",
                        Platform::MAX_CUDA_INDEX
                    ),
                )),
            },
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Platform::Cuda => "cuda",
            Platform::Cpu => "cpu",
        })
    }
}

/// How a Multi-head Latent Attention layer runs (ignored by multi-head attention).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MlaForm {
    /// The vendor `modeling_deepseek.py`: keys and values decompressed by `kv_b_proj`
    /// and cached per head, H·(d_qk + d_v) elements per token (the flash variant pads
    /// the values to d_qk first, and caches them padded).
    #[default]
    Naive,
    /// Weight absorption (DeepSeek's `inference/model.py` `attn_impl = "absorb"`,
    /// serving engines' decode): `kv_b_proj` folded into the query and the output, the
    /// latent c_kv and the rotary key cached, r_kv + d_r elements per token.
    Absorb,
}

impl MlaForm {
    /// True for the default, [`MlaForm::Naive`] (reports leave it out).
    pub fn is_naive(&self) -> bool {
        *self == MlaForm::Naive
    }
}

/// A workload: what one layer call processes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub batch: u64,
    #[serde(flatten)]
    pub phase: Phase,
    /// The model dtype (weights and activations); the gate and rotary tables run in fp32.
    pub dtype: Dtype,
    /// Whether fp32 GEMMs may use TF32 tensor cores (PyTorch's default: false).
    pub allow_tf32: bool,
    /// The backend whose kernels run it (default: CUDA).
    pub platform: Platform,
    /// MoE layers: the rows (token slots) each routed expert that received tokens
    /// processed, as a routing decided them. Routing decides no FLOPs (every metric but
    /// the bytes is linear in the N·k rows); it decides how many experts read their
    /// weights, and on CUDA the allocator's block of each expert's tensors. `None`: the
    /// N·k rows spread as evenly as integers allow over min(E, N·k) experts, every
    /// routing slot a different expert while experts remain (exact for one token: its
    /// top-k experts are distinct). `verify-decoder` sets the rows it measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_rows: Option<Vec<u64>>,
    /// How MLA layers run (default: the vendor's naive form); left out of reports when
    /// it is the default.
    #[serde(skip_serializing_if = "MlaForm::is_naive")]
    pub mla: MlaForm,
}

impl Workload {
    /// A prefill of `seq_len` tokens in bf16 with TF32 off, on CUDA.
    pub fn prefill(batch: u64, seq_len: u64) -> Result<Workload> {
        Workload::new(batch, Phase::Prefill { seq_len }, Dtype::Bf16)
    }

    /// One decode step after `context_len` tokens, in bf16 with TF32 off, on CUDA.
    pub fn decode(batch: u64, context_len: u64) -> Result<Workload> {
        Workload::new(batch, Phase::Decode { context_len }, Dtype::Bf16)
    }

    /// A validated workload.
    pub fn new(batch: u64, phase: Phase, dtype: Dtype) -> Result<Workload> {
        if batch == 0 {
            return Err(Error::invalid("batch", batch, "an integer ≥ 1"));
        }
        match phase {
            Phase::Prefill { seq_len: 0 } => {
                return Err(Error::invalid("seq_len", 0, "an integer ≥ 1"))
            }
            Phase::Decode { context_len: 0 } => {
                return Err(Error::invalid(
                    "context_len",
                    0,
                    "an integer ≥ 1 (the decode step follows a prefill of that many tokens)",
                ))
            }
            _ => {}
        }
        if !dtype.is_model_dtype() {
            return Err(Error::invalid(
                "dtype",
                dtype,
                crate::dtype::MODEL_DTYPE_SPELLINGS,
            ));
        }
        let w = Workload {
            batch,
            phase,
            dtype,
            allow_tf32: false,
            platform: Platform::default(),
            expert_rows: None,
            mla: MlaForm::default(),
        };
        // Every size derived below must fit in 64 bits.
        let q = w.query_len();
        if batch.checked_mul(q).is_none() {
            let what = match phase {
                Phase::Prefill { .. } => "batch × seq_len",
                Phase::Decode { .. } => "batch",
            };
            return Err(Error::invalid(
                what,
                format!("{batch} × {q}"),
                "a product below 2^64 (the tokens of one forward); lower the batch or the sequence length",
            ));
        }
        if let Phase::Decode {
            context_len: u64::MAX,
        } = phase
        {
            return Err(Error::invalid(
                "context_len",
                u64::MAX,
                "below 2^64 − 1 (the step attends over context_len + 1 keys)",
            ));
        }
        Ok(w)
    }

    /// The same workload with TF32 allowed or not for fp32 GEMMs.
    pub fn with_tf32(mut self, allow: bool) -> Workload {
        self.allow_tf32 = allow;
        self
    }

    /// The same workload run by `platform`'s kernels.
    pub fn on(mut self, platform: Platform) -> Workload {
        self.platform = platform;
        self
    }

    /// The same workload with routed experts that received `rows` rows each (see
    /// [`Workload::expert_rows`]; experts without rows left out); validated against the
    /// layer's expert count and N·k rows when the layer is costed.
    pub fn with_expert_rows(mut self, rows: Vec<u64>) -> Workload {
        self.expert_rows = Some(rows);
        self
    }

    /// The same workload with MLA layers run in `form`.
    pub fn with_mla(mut self, form: MlaForm) -> Workload {
        self.mla = form;
        self
    }

    /// The same workload in another model dtype.
    pub fn with_dtype(self, dtype: Dtype) -> Result<Workload> {
        self.settings_for(self.phase, dtype)
    }

    /// Another call with this one's batch, dtype, TF32 switch, platform and MLA form, in
    /// `phase` (measured routing, if any, belongs to this call and is not carried over).
    pub fn in_phase(&self, phase: Phase) -> Result<Workload> {
        self.settings_for(phase, self.dtype)
    }

    /// A workload of `phase` and `dtype` with this one's batch and switches.
    fn settings_for(&self, phase: Phase, dtype: Dtype) -> Result<Workload> {
        Workload::with_settings(
            self.batch,
            phase,
            dtype,
            self.allow_tf32,
            self.platform,
            self.mla,
        )
    }

    /// A workload with every setting given: [`Workload::new`] then each switch, the one
    /// place a workload is made from another's settings (or a generation's: the same five
    /// beside its phase).
    pub fn with_settings(
        batch: u64,
        phase: Phase,
        dtype: Dtype,
        allow_tf32: bool,
        platform: Platform,
        mla: MlaForm,
    ) -> Result<Workload> {
        Workload::new(batch, phase, dtype)
            .map(|w| w.with_tf32(allow_tf32).on(platform).with_mla(mla))
    }

    /// S_q: query positions per sequence in this call.
    pub fn query_len(&self) -> u64 {
        match self.phase {
            Phase::Prefill { seq_len } => seq_len,
            Phase::Decode { .. } => 1,
        }
    }

    /// S_kv: keys each query attends over (cached tokens plus this call's).
    pub fn key_len(&self) -> Result<u64> {
        match self.phase {
            Phase::Prefill { seq_len } => Ok(seq_len),
            Phase::Decode { context_len } => sum("context_len + 1", &[context_len, 1]),
        }
    }

    /// Positions this call and `new_tokens` decode steps after it reach: S_kv plus one per
    /// step (what `max_position_embeddings` bounds); `None` past 2^64.
    pub fn positions_reached(&self, new_tokens: u64) -> Option<u64> {
        self.key_len().ok()?.checked_add(new_tokens)
    }

    /// The prefill that fills this decode step's KV cache (`None` for a prefill): the
    /// same batch, dtype, TF32 switch, platform and MLA form over its C cached tokens (the
    /// step's measured routing, if any, is its own, not the prefill's). Memory estimates of
    /// a decode step are judged by it too, since its S² scores may need more.
    pub fn cache_prefill(&self) -> Option<Result<Workload>> {
        let Phase::Decode { context_len } = self.phase else {
            return None;
        };
        Some(self.in_phase(Phase::Prefill {
            seq_len: context_len,
        }))
    }

    /// Position of the first query token (0 in prefill, `context_len` in decode).
    pub fn first_position(&self) -> u64 {
        match self.phase {
            Phase::Prefill { .. } => 0,
            Phase::Decode { context_len } => context_len,
        }
    }

    /// N = B · S_q: token rows of this call.
    pub fn tokens(&self) -> Result<u64> {
        product(
            "tokens (batch × query length)",
            &[self.batch, self.query_len()],
        )
    }

    /// A one-line description (`B=1 prefill S=512 bf16`).
    pub fn describe(&self) -> String {
        let phase = match self.phase {
            Phase::Prefill { seq_len } => format!("prefill S={seq_len}"),
            Phase::Decode { context_len } => format!("decode C={context_len}"),
        };
        let tf32 = if self.allow_tf32 { " tf32" } else { "" };
        let mla = if self.mla.is_naive() {
            ""
        } else {
            " mla=absorb"
        };
        format!("B={} {phase} {}{tf32}{mla}", self.batch, self.dtype)
    }
}

/// A named workload profile: a prefill followed by greedy decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub batch: u64,
    pub prefill_len: u64,
    pub new_tokens: u64,
}

/// DeepSeek-OCR's standard profile: one page, batch 1, 512 prompt tokens, 512 new tokens.
pub const DSOCR_STANDARD_V1: Profile = Profile {
    name: "dsocr-standard-v1",
    batch: 1,
    prefill_len: 512,
    new_tokens: 512,
};

/// All built-in profiles.
pub const PROFILES: &[Profile] = &[DSOCR_STANDARD_V1];

impl Profile {
    /// A built-in profile by name.
    pub fn by_name(name: &str) -> Result<Profile> {
        PROFILES
            .iter()
            .find(|p| p.name == name)
            .copied()
            .ok_or_else(|| {
                let names: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
                Error::invalid("profile", name, &names.join(", "))
            })
    }

    /// The profile's prefill.
    pub fn prefill(&self, dtype: Dtype) -> Result<Workload> {
        Workload::new(
            self.batch,
            Phase::Prefill {
                seq_len: self.prefill_len,
            },
            dtype,
        )
    }

    /// Decode step `t` (0-based): attends over `prefill_len + t + 1` keys.
    pub fn decode_step(&self, t: u64, dtype: Dtype) -> Result<Workload> {
        let context_len = sum("decode context", &[self.prefill_len, t])?;
        Workload::new(self.batch, Phase::Decode { context_len }, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How reports and errors name a workload: each choice that changes the op list is
    /// shown.
    #[test]
    fn a_description_names_what_changes_the_op_list() {
        let prefill = Workload::prefill(1, 512).unwrap();
        assert_eq!(prefill.describe(), "B=1 prefill S=512 bf16");
        assert_eq!(
            prefill.with_tf32(true).describe(),
            "B=1 prefill S=512 bf16 tf32"
        );
        assert_eq!(
            Workload::decode(2, 7).unwrap().describe(),
            "B=2 decode C=7 bf16"
        );
        assert_eq!(
            Workload::decode(1, 5)
                .unwrap()
                .with_mla(MlaForm::Absorb)
                .describe(),
            "B=1 decode C=5 bf16 mla=absorb"
        );
    }

    #[test]
    fn another_dtype_keeps_tf32_the_platform_and_the_mla_form() {
        let w = Workload::prefill(2, 8)
            .unwrap()
            .with_tf32(true)
            .on(Platform::Cpu)
            .with_mla(MlaForm::Absorb)
            .with_dtype(Dtype::F32)
            .unwrap();
        assert_eq!(
            (w.dtype, w.allow_tf32, w.platform, w.mla),
            (Dtype::F32, true, Platform::Cpu, MlaForm::Absorb)
        );
    }

    #[test]
    fn the_cache_prefill_is_the_decode_step_s_run_over_its_context() {
        let step = Workload::decode(3, 700)
            .unwrap()
            .with_dtype(Dtype::F32)
            .unwrap()
            .with_tf32(true)
            .on(Platform::Cpu)
            .with_mla(MlaForm::Absorb)
            .with_expert_rows(vec![1, 2]);
        // Every field carried but the phase and the step's own routing (a field added
        // later is carried, or this fails).
        assert_eq!(
            step.cache_prefill().unwrap().unwrap(),
            Workload {
                phase: Phase::Prefill { seq_len: 700 },
                expert_rows: None,
                ..step.clone()
            }
        );
        assert!(Workload::prefill(1, 8).unwrap().cache_prefill().is_none());
    }

    #[test]
    fn device_spellings_are_one_rule() {
        for (text, parsed) in [
            ("cpu", (Platform::Cpu, 0)),
            (" CPU ", (Platform::Cpu, 0)),
            ("cuda", (Platform::Cuda, 0)),
            ("Cuda:1", (Platform::Cuda, 1)),
            ("cuda:127", (Platform::Cuda, 127)),
        ] {
            assert_eq!(Platform::parse_device(text).unwrap(), parsed, "{text:?}");
        }
        for text in [
            "", " ", "tpu", "cuda:", "cuda:+5", "cuda:-1", "cuda:128", "cuda:999", "cuda:x",
        ] {
            let e = Platform::parse_device(text).unwrap_err().to_string();
            assert!(
                e.ends_with("is invalid: expected cpu, cuda or cuda:N (N from 0 to 127)"),
                "{text:?}: {e}"
            );
        }
        assert!(Platform::parse_device("")
            .unwrap_err()
            .to_string()
            .starts_with("--device = \"\" is invalid"));
    }

    #[test]
    fn standard_profile_is_batch_1_prefill_512_then_512_tokens() {
        let p = Profile::by_name("dsocr-standard-v1").unwrap();
        assert_eq!((p.batch, p.prefill_len, p.new_tokens), (1, 512, 512));
        let w = p.prefill(Dtype::Bf16).unwrap();
        assert_eq!((w.tokens().unwrap(), w.key_len().unwrap()), (512, 512));
        let d = p.decode_step(0, Dtype::Bf16).unwrap();
        assert_eq!(
            (
                d.tokens().unwrap(),
                d.key_len().unwrap(),
                d.first_position()
            ),
            (1, 513, 512)
        );
        assert!(Profile::by_name("nope")
            .unwrap_err()
            .to_string()
            .contains("dsocr-standard-v1"));
    }

    #[test]
    fn invalid_workloads_name_the_value() {
        assert!(Workload::prefill(0, 5)
            .unwrap_err()
            .to_string()
            .contains("batch = 0"));
        assert!(Workload::prefill(1, 0)
            .unwrap_err()
            .to_string()
            .contains("seq_len = 0"));
        assert!(Workload::decode(1, 0)
            .unwrap_err()
            .to_string()
            .contains("context_len = 0"));
        assert!(Workload::new(1, Phase::Prefill { seq_len: 4 }, Dtype::I64).is_err());
        let e = Workload::prefill(u64::MAX, 2).unwrap_err().to_string();
        assert!(
            e.contains("batch × seq_len = 18446744073709551615 × 2")
                && e.ends_with("lower the batch or the sequence length"),
            "{e}"
        );
        assert!(Workload::decode(1, u64::MAX).is_err());
    }

    #[test]
    fn json_has_the_phase_inline() {
        let w = Workload::decode(2, 7).unwrap();
        let j = serde_json::to_value(w).unwrap();
        assert_eq!(j["phase"], "decode");
        assert_eq!(j["context_len"], 7);
        assert_eq!(j["dtype"], "bf16");
    }
}

//! Runs one reference layer's forward, plain or under the FLOP counter, for
//! `scripts/counter-overhead`, which counts the instructions of the forwards alone under
//! callgrind (`--toggle-collect` on [`forwards`]): a measure of the counter's cost that a
//! shared machine's timing noise cannot blur. Not a timing benchmark.
//!
//! `cargo bench -p modelmeter-reference --bench forward_instructions -- LAYER MODE [N] [S]`
//! with LAYER `moe`, `decoder_moe`, `decoder_dense`, `mlp` or `attention`, MODE `plain`
//! or `counted`, N forwards (default 2); DeepSeek-OCR, B=1, prefill of S tokens (default
//! 512), fp32, CPU.

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, ModelConfig, Workload};
use modelmeter_reference::attention::KvCache;
use modelmeter_reference::harness::{measure, ModuleKind, Prepared};
use modelmeter_reference::Setup;

/// The forwards whose instructions are counted (not inlined, so callgrind can find it).
#[inline(never)]
fn forwards(prepared: &mut Prepared, counted: bool, n: usize) -> usize {
    let mut ops = 0;
    for _ in 0..n {
        prepared.cache = KvCache::new();
        if counted {
            let (_, counts) = measure(|| prepared.forward()).expect("the forward runs");
            ops = counts.events_seen;
        } else {
            let _ = prepared.forward().expect("the forward runs");
        }
    }
    ops
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let kind = match args.first().map(String::as_str) {
        Some("moe") | None => ModuleKind::MoE,
        Some("decoder_moe") => ModuleKind::DecoderLayer(1),
        Some("decoder_dense") => ModuleKind::DecoderLayer(0),
        Some("mlp") => ModuleKind::Mlp,
        Some("attention") => ModuleKind::Attention,
        Some(other) => {
            eprintln!("unknown layer {other}: moe, decoder_moe, decoder_dense, mlp, attention");
            std::process::exit(2);
        }
    };
    let counted = match args.get(1).map(String::as_str) {
        Some("counted") => true,
        Some("plain") | None => false,
        Some(other) => {
            eprintln!("unknown mode {other}: plain or counted");
            std::process::exit(2);
        }
    };
    // A whole number ≥ 1, or exit 2 naming the argument (a typo must not run the default).
    let count = |i: usize, name: &str, default: u64| -> u64 {
        let Some(text) = args.get(i) else {
            return default;
        };
        match text.parse() {
            Ok(v) if v >= 1 => v,
            _ => {
                eprintln!("{name} = {text} is invalid: expected a whole number ≥ 1");
                std::process::exit(2);
            }
        }
    };
    let n = count(2, "N", 2) as usize;
    // A short prompt makes the forwards cheap and the counter's share large: what a
    // change to the counter's per-op cost is best measured on.
    let seq_len = count(3, "S", 512);
    let config = ModelConfig::deepseek_ocr();
    let workload = Workload::prefill(1, seq_len)
        .and_then(|w| w.with_dtype(Dtype::F32))
        .expect("the default workload is valid");
    let setup = Setup {
        device: tch::Device::Cpu,
        seed: 0,
    };
    let mut prepared = Prepared::new(kind, &config, &workload, AttentionImpl::Sdpa, &setup)
        .expect("the reference module builds");
    let _no_grad = tch::no_grad_guard();
    let ops = forwards(&mut prepared, counted, n);
    println!(
        "{} {} x{n}: done (ops seen {ops})",
        kind.label(),
        if counted { "counted" } else { "plain" }
    );
}

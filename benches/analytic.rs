//! Analytic evaluations per second (a benchmark, not a test): one MoE decoder layer's
//! `metrics()` and `cost()` (the per-op breakdown), the whole stack, a 512-token
//! generation. `cargo bench -p modelmeter --bench analytic`; also part of `scripts/bench`.

use std::time::{Duration, Instant};

use modelmeter::layers::{AttentionImpl, DeepseekV2Decoder, Generation, Layer, LayerId};
use modelmeter::{Dtype, ModelConfig, Platform, Workload};

fn per_second(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        f();
        calls += 1;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let config = ModelConfig::deepseek_ocr();
    let w = Workload::prefill(1, 512).expect("valid");
    let budget = Duration::from_millis(700);
    let layer = LayerId::DecoderMoe
        .build(&config, &w, AttentionImpl::Sdpa)
        .expect("builds");
    let metrics = per_second(budget, || {
        std::hint::black_box(layer.metrics().expect("finite"));
    });
    let cost = per_second(budget, || {
        std::hint::black_box(layer.cost().expect("finite"));
    });
    let stack = per_second(budget, || {
        std::hint::black_box(
            DeepseekV2Decoder::new(&config, &w, AttentionImpl::Sdpa)
                .metrics()
                .expect("finite"),
        );
    });
    let generation = Generation {
        config: config.clone(),
        batch: 1,
        prefill_len: 512,
        new_tokens: 512,
        dtype: Dtype::Bf16,
        allow_tf32: false,
        platform: Platform::Cuda,
        attention: AttentionImpl::Sdpa,
        mla: modelmeter::MlaForm::Naive,
    };
    let generations = per_second(budget, || {
        std::hint::black_box(generation.metrics().expect("finite"));
    });
    println!("analytic evaluations per second:");
    println!("  one MoE decoder layer, metrics()  {metrics:>12.0}");
    println!("  one MoE decoder layer, cost()     {cost:>12.0}");
    println!("  the whole stack, metrics()        {stack:>12.0}");
    println!("  a 512-token generation            {generations:>12.0}");
}

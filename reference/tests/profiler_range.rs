//! The profiled run of `verify-decoder --hardware-counters` on CPU: the warm-up forward
//! that precedes each profiler range must leave the counted forward exactly as an
//! ordinary run sees it (same KV cache, same counts, same routing, same output). The
//! range itself (cuProfilerStart/Stop) is CUDA only and checked on a GPU.

use modelmeter::layers::AttentionImpl;
use modelmeter::{ModelConfig, Workload};
use modelmeter_reference::harness::{run_layer, run_layer_in_profiler_range, ModuleKind};
use modelmeter_reference::Setup;
use tch::Device;

fn setup() -> Setup {
    Setup {
        device: Device::Cpu,
        seed: 3,
    }
}

#[test]
fn the_warm_up_leaves_the_counted_forward_unchanged() {
    let ocr = ModelConfig::deepseek_ocr();
    // MLA keeps its rotary tables between calls (the vendor rebuilds them only for a
    // longer sequence): a warm-up must not leave them built for the counted call.
    let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
    let decode = Workload::decode(1, 9).unwrap();
    let prefill = Workload::prefill(1, 4).unwrap();
    for (config, kind, workload) in [
        (&ocr, ModuleKind::Attention, decode.clone()),
        (&ocr, ModuleKind::Attention, prefill.clone()),
        (&ocr, ModuleKind::MoE, prefill.clone()),
        (&lite, ModuleKind::Attention, decode),
        (&lite, ModuleKind::Attention, prefill.clone()),
        (&lite, ModuleKind::DecoderLayer(0), prefill),
    ] {
        let config = config.clone();
        let plain = run_layer(kind, &config, &workload, AttentionImpl::Sdpa, &setup()).unwrap();
        let ranged =
            run_layer_in_profiler_range(kind, &config, &workload, AttentionImpl::Sdpa, &setup())
                .unwrap();
        let what = format!("{kind:?} {}", workload.describe());
        // A warm-up on the cache itself would have appended its keys: more bytes, and a
        // longer attention in the counted call.
        assert_eq!(ranged.kv_cache_bytes, plain.kv_cache_bytes, "{what}");
        assert_eq!(ranged.counts.flops, plain.counts.flops, "{what}");
        assert_eq!(ranged.counts.io_bytes, plain.counts.io_bytes, "{what}");
        assert_eq!(ranged.tokens_per_expert, plain.tokens_per_expert, "{what}");
        assert!(ranged.output.equal(&plain.output), "{what}");
    }
}

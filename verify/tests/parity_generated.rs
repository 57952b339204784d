//! The independent witness on generated shapes: the sweep generator's configurations
//! (multi-head and MLA, every routing method, odd head dims, biases, both MLA forms), their
//! reference modules against Hugging Face transformers' in fp32 (`parity.py`). The exactness
//! sweeps compare the analytic model with the reference modules, both written here; this
//! checks that the reference modules compute what transformers' do on those same shapes.
//! MODELMETER_PARITY_SWEEP_CASES sets how many configurations (six in CI).

use modelmeter::{MlpKind, Platform, Workload};
use modelmeter_reference::harness::ModuleKind;
use modelmeter_reference::parity::{export_case, run_parity};
use modelmeter_verify::sweep;

mod common;
use common::{cases_from_env, TempDir};

#[test]
fn generated_configs_match_transformers() {
    let cases = cases_from_env("MODELMETER_PARITY_SWEEP_CASES", 6);
    let dir = TempDir::new("parity-generated");
    let base = Workload::prefill(1, 1)
        .unwrap()
        .with_dtype(modelmeter::Dtype::F32)
        .unwrap()
        .on(Platform::Cpu);
    let mut dirs = Vec::new();
    let mut described = Vec::new();
    for index in 0..cases {
        // The shapes transformers' modules take (the routing as drawn: the cases no
        // transformers router implements are rejected and counted below).
        let case = sweep::generate(15, index, &base).for_transformers();
        let c = &case.config;
        let moe_layer = c.first_layer_of(MlpKind::Moe).unwrap();
        let dense_layer = c.first_layer_of(MlpKind::Dense).unwrap();
        for kind in [
            ModuleKind::MoEGate,
            ModuleKind::MoE,
            ModuleKind::Attention,
            ModuleKind::DecoderLayer(dense_layer),
            ModuleKind::DecoderLayer(moe_layer),
        ] {
            let path = dir.path(&format!("{index:03}-{kind:?}"));
            export_case(&path, kind, c, &case.workload, case.attention, 11).unwrap();
            described.push(format!(
                "case {index} {kind:?} {:?} {:?} {:?}",
                case.workload.phase, case.workload.mla, case.attention
            ));
            dirs.push(path);
        }
    }
    let results = run_parity(&dirs).unwrap();
    assert_eq!(results.len(), dirs.len());
    // A case the witness cannot express is rejected with the reason and counted apart,
    // never a pass; the only such cases allowed are routings no transformers router
    // implements (checked below). A case it ran must match.
    let mut rejected: std::collections::BTreeMap<String, usize> = Default::default();
    let mut failed = Vec::new();
    for (r, what) in results.iter().zip(&described) {
        match (&r.error, r.ok) {
            (_, true) => {}
            (Some(e), false) if r.rel_err.is_none() => {
                let reason = e.split(';').next().unwrap_or(e);
                let reason = reason.split(" != ").last().unwrap_or(reason).to_string();
                *rejected.entry(reason).or_default() += 1;
            }
            _ => failed.push(format!("{what}: {r:?}")),
        }
    }
    let matched = results.iter().filter(|r| r.ok).count();
    eprintln!(
        "{} generated cases: {matched} match transformers; rejected: {rejected:?}",
        results.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Only routings no checkpoint uses (sigmoid scores without noaux_tc, softmax with it)
    // go unwitnessed: transformers has a router for neither.
    let unused_routing = "no transformers router implements scoring_func";
    assert!(
        rejected.keys().all(|r| r.starts_with(unused_routing)),
        "{rejected:?}"
    );
    assert!(
        matched * 2 > results.len(),
        "most cases must be witnessed: {matched} of {}",
        results.len()
    );
}

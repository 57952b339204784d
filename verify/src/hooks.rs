//! Test-only alterations of a run, carried in the [`Plan`](crate::plan::Plan): a
//! perturbed analytic value, or a layer made to fail as if libtorch had refused it. The
//! binary never sets them and nothing reads them from the environment; tests build a plan
//! through the library (`app::prepare`) and set them there. A report made with any hook
//! active says so (`environment.test_hooks`).

/// The test hooks of a plan; the default is none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Adds `delta` to the analytic value of `metric` (a metric name, or `flops` for the
    /// flops row's analytic total) of `layer` (with `--model`: a part of one call,
    /// `decode[3]/layers.2` or `prefill/lm_head`, or a phase's closed form,
    /// `generation/decode`). A part's delta reaches every row that sums that part: its
    /// call's stack and its group of parts in the phase rows.
    pub perturb: Option<Perturbation>,
    /// Makes this layer fail to run (with `--model`: this call, `prefill` or `decode[2]`).
    pub fail_layer: Option<String>,
    /// Multiplies one GEMM op's FLOPs by a factor in the conventions table, for the
    /// analytic side and the counter alike (`modelmeter::conventions::scratch`): both
    /// still agree; only an independent witness (`--oracle`) can notice.
    pub scaled_matmul: Option<(&'static str, u64)>,
}

/// One perturbed analytic value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Perturbation {
    pub layer: String,
    pub metric: String,
    pub delta: u64,
}

impl TestHooks {
    /// Only a perturbation: `delta` added to the analytic `metric` of `layer`.
    pub fn perturbing(layer: &str, metric: &str, delta: u64) -> TestHooks {
        TestHooks {
            perturb: Some(Perturbation {
                layer: layer.into(),
                metric: metric.into(),
                delta,
            }),
            ..TestHooks::default()
        }
    }

    /// The delta added to `layer`'s `metric`, if any.
    pub fn perturbation(&self, layer: &str, metric: &str) -> Option<u64> {
        self.perturb
            .as_ref()
            .filter(|p| p.layer == layer && p.metric == metric)
            .map(|p| p.delta)
    }

    /// The delta added to the analytic total of `layer`'s flops row (0 without one).
    pub fn flops_delta(&self, layer: &str) -> u64 {
        self.perturbation(layer, crate::check::Check::Flops.name())
            .unwrap_or(0)
    }

    /// An error when this hook makes `layer` fail.
    pub fn injected_error(&self, layer: &str) -> modelmeter_reference::Result<()> {
        match &self.fail_layer {
            Some(l) if l == layer => Err(modelmeter_reference::Error::Observer(format!(
                "a test hook made {layer} fail"
            ))),
            _ => Ok(()),
        }
    }

    /// The active hooks, described for reports.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.perturb {
            out.push(format!("perturb {}:{}:+{}", p.layer, p.metric, p.delta));
        }
        if let Some(l) = &self.fail_layer {
            out.push(format!("fail_layer {l}"));
        }
        if let Some((op, factor)) = self.scaled_matmul {
            out.push(format!("scaled_matmul {op} x{factor}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_hooks_by_default_and_each_hook_hits_only_its_target() {
        let none = TestHooks::default();
        assert_eq!(none.perturbation("MoEGate", "flops"), None);
        assert!(none.injected_error("MoEGate").is_ok());
        assert!(none.describe().is_empty());
        let hooks = TestHooks {
            perturb: Some(Perturbation {
                layer: "MoEGate".into(),
                metric: "matmul_flops".into(),
                delta: 1,
            }),
            fail_layer: Some("DeepseekV2MoE".into()),
            scaled_matmul: None,
        };
        assert_eq!(hooks.perturbation("MoEGate", "matmul_flops"), Some(1));
        assert_eq!(hooks.perturbation("MoEGate", "flops"), None);
        assert_eq!(hooks.flops_delta("MoEGate"), 0);
        let flops = TestHooks::perturbing("MoEGate", "flops", 5);
        assert_eq!(
            (flops.flops_delta("MoEGate"), flops.flops_delta("MLP")),
            (5, 0)
        );
        assert_eq!(hooks.perturbation("DeepseekV2MLP", "matmul_flops"), None);
        assert!(hooks.injected_error("DeepseekV2MoE").is_err());
        assert!(hooks.injected_error("MoEGate").is_ok());
        assert_eq!(hooks.describe().len(), 2);
    }
}

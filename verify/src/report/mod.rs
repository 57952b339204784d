//! Reports of a verification: a table for people, `modelmeter.verify/1` JSON and JUnit
//! XML for machines. Files are written whole or not at all; standard output, devices,
//! FIFOs and symlinks as [`Destination`] says.

mod destination;
mod json;
mod junit;
mod model;
mod table;
mod write;

pub use destination::{check_distinct, Destination};
pub use json::{to_json, SCHEMA, SWEEP_SCHEMA};
pub use junit::to_junit;
pub use model::{model_json, model_junit, model_table, ModelReport, MODEL_SCHEMA};
pub use table::{case_line, to_table};
pub use write::{check_writable, goes_to_stdout, write_atomically, write_report};

use modelmeter::layers::AttentionImpl;
use modelmeter::{ModelConfig, Workload};

use crate::environment::Environment;
use crate::plan::Plan;
use crate::results::{LayerResult, Summary};

/// One configuration and workload that was verified.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case number in a sweep.
    pub index: Option<usize>,
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    pub layers: Vec<LayerResult>,
    pub summary: Summary,
    /// The command that reruns this case with plain options (sweeps).
    pub replay: Option<String>,
}

impl Case {
    /// The case of `plan`'s run with these layer results; the attention kernels that ran
    /// are added to the report's environment.
    pub fn of(
        plan: &Plan,
        layers: Vec<LayerResult>,
        index: Option<usize>,
        replay: Option<String>,
        env: &mut Environment,
    ) -> Case {
        for l in &layers {
            env.saw_kernels(&l.attention_kernels);
        }
        Case {
            index,
            config: plan.config.clone(),
            workload: plan.workload.clone(),
            attention: plan.attention,
            summary: Summary::of(&layers),
            layers,
            replay,
        }
    }
}

/// Everything a report shows.
#[derive(Clone, Debug)]
pub struct Report {
    pub environment: Environment,
    pub tolerance: f64,
    pub cases: Vec<Case>,
    /// `(seed, cases)` of a sweep; `None` for a single run.
    pub sweep: Option<(u64, usize)>,
}

impl Report {
    /// Layer statuses over all cases.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for c in &self.cases {
            s.merge(&c.summary);
        }
        s
    }
}

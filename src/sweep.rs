//! Design-space sweeps: the metrics of the whole decoder stack, or of one layer, at every
//! point of a grid of workloads (`modelmeter sweep`).
//!
//! A point is evaluated as `modelmeter analyze` evaluates its one workload: the same op
//! lists, with the sums and the liveness kept but not the per-op tree
//! ([`crate::metrics::sums_only`]), and on a GPU the caching allocator's blocks
//! ([`Cost::metrics_on`]). So a sweep's row is analyze's row for that workload (a test
//! checks every layer and the stack, on both platforms). Points are independent: they
//! are spread over threads, and the rows come back in the grid's order.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layers::{attention_class_name, AttentionImpl, DeepseekV2Decoder, Layer, LayerId};
use crate::liveness::Peak;
use crate::metrics::{sums_only, Cost, Metrics};
use crate::units;
use crate::workload::{Phase, Platform, Workload};

/// The schema tag of `modelmeter sweep --json`.
pub const SWEEP_SCHEMA: &str = "modelmeter.sweep/1";

/// The most points one sweep evaluates: a million rows (about 150 MB of CSV, built in
/// memory so that nothing is written unless every point succeeds). A larger design space
/// is several sweeps.
pub const MAX_POINTS: u64 = 1_000_000;

/// A workload dimension a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Sequences per call (`--batch`).
    Batch,
    /// Prompt tokens of a prefill (`--seq-len`).
    SeqLen,
    /// Cached tokens before a decode step (`--context-len`).
    ContextLen,
}

impl Axis {
    /// Every axis, in the order a point's columns list them.
    pub const ALL: [Axis; 3] = [Axis::Batch, Axis::SeqLen, Axis::ContextLen];

    /// As the command line spells it (`seq-len`): the option that sets it alone is
    /// `--` and this.
    pub fn option(self) -> &'static str {
        match self {
            Axis::Batch => "batch",
            Axis::SeqLen => "seq-len",
            Axis::ContextLen => "context-len",
        }
    }

    /// As columns and JSON keys spell it (`seq_len`, the workload's field).
    pub fn key(self) -> &'static str {
        match self {
            Axis::Batch => "batch",
            Axis::SeqLen => "seq_len",
            Axis::ContextLen => "context_len",
        }
    }

    /// The axis the command line calls `name` (`seq-len`; `seq_len` too).
    pub fn parse(name: &str) -> Option<Axis> {
        Axis::ALL
            .into_iter()
            .find(|a| a.option() == name || a.key() == name)
    }

    /// Its value in `workload`; `None` for the length the phase has not (a prefill's
    /// context length, a decode step's prompt length).
    pub fn of(self, workload: &Workload) -> Option<u64> {
        match (self, workload.phase) {
            (Axis::Batch, _) => Some(workload.batch),
            (Axis::SeqLen, Phase::Prefill { seq_len }) => Some(seq_len),
            (Axis::ContextLen, Phase::Decode { context_len }) => Some(context_len),
            _ => None,
        }
    }
}

/// The axes that identify a point of `phase`: the batch, and the prompt length of a
/// prefill or the context length of a decode step. Every row lists them, varied or not,
/// so that rows of several sweeps can be put together.
pub fn point_axes(phase: Phase) -> [Axis; 2] {
    axes_of(matches!(phase, Phase::Decode { .. }))
}

/// [`point_axes`] of a decode step (`decode`) or a prefill, before any workload is built
/// (what the command line's `--phase` says).
pub fn axes_of(decode: bool) -> [Axis; 2] {
    if decode {
        [Axis::Batch, Axis::ContextLen]
    } else {
        [Axis::Batch, Axis::SeqLen]
    }
}

/// Every combination of the axes' values, the first axis varying slowest (as nested
/// loops in the order the axes are given); each combination lists `(axis, value)` in that
/// order. An error when there would be more than [`MAX_POINTS`] (before any is built).
pub fn grid(axes: &[(Axis, Vec<u64>)]) -> Result<Vec<Vec<(Axis, u64)>>> {
    let count = axes.iter().try_fold(1u64, |n, (_, values)| {
        n.checked_mul(values.len() as u64)
            .filter(|n| *n <= MAX_POINTS)
    });
    let Some(count) = count else {
        let sizes: Vec<String> = axes
            .iter()
            .map(|(a, v)| format!("{} {}", v.len(), a.option()))
            .collect();
        let total = axes
            .iter()
            .fold(1u128, |n, (_, v)| n.saturating_mul(v.len() as u128));
        return Err(Error::invalid(
            "sweep points",
            format!("{total} ({})", sizes.join(" × ")),
            &format!(
                "at most {MAX_POINTS} points in one sweep: split it into several (narrower --vary ranges)"
            ),
        ));
    };
    let mut points: Vec<Vec<(Axis, u64)>> = Vec::with_capacity(count as usize);
    points.push(Vec::with_capacity(axes.len()));
    for (axis, values) in axes {
        points = points
            .into_iter()
            .flat_map(|point| {
                values.iter().map(move |&v| {
                    let mut p = point.clone();
                    p.push((*axis, v));
                    p
                })
            })
            .collect();
    }
    Ok(points)
}

/// What a sweep evaluates at each point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The whole decoder stack (`DeepseekV2ForCausalLM`: embedding, every layer, the final
    /// norm and the LM head), as analyze's `stack` row.
    Stack,
    /// One layer, as analyze's row of that layer.
    Layer(LayerId),
}

impl Target {
    /// The name rows are reported under (the vendor class, as analyze names it).
    pub fn name(
        self,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> String {
        match self {
            Target::Stack => DeepseekV2Decoder::new(config, workload, attention).name(),
            Target::Layer(id) => id.name_for(config, workload.mla, attention).to_string(),
        }
    }

    /// The cost of one call at `workload`, with sums only (no per-op tree).
    fn cost(
        self,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> Result<Cost> {
        sums_only(|| match self {
            Target::Stack => DeepseekV2Decoder::new(config, workload, attention).cost(),
            Target::Layer(id) => id.build(config, workload, attention)?.cost(),
        })
    }
}

/// The metrics of one point: analyze's row for its workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PointMetrics {
    /// On a GPU `activation_bytes` counts the caching allocator's blocks.
    pub metrics: Metrics,
    /// On a GPU in the caching allocator's blocks.
    pub peak: Peak,
}

/// Evaluates `target` at `workload`.
pub fn evaluate(
    config: &ModelConfig,
    target: Target,
    workload: &Workload,
    attention: AttentionImpl,
) -> Result<PointMetrics> {
    let cost = target.cost(config, workload, attention)?;
    let cuda = workload.platform == Platform::Cuda;
    Ok(PointMetrics {
        metrics: cost.metrics_on(cuda),
        peak: *cost.peak_on(cuda),
    })
}

/// Points claimed by a thread at a time: few enough that the threads finish together,
/// enough that claiming costs nothing beside the evaluations.
const CHUNK: usize = 64;

/// Evaluates `target` at every workload on up to `threads` threads (at least one; no
/// more than there are chunks of points, and fewer where the system starts no more), calling
/// `progress` with the count of points each finished chunk adds. The rows are in the
/// order of `workloads`. On failure, the error of the first point (in that order) that
/// fails, with its index: every point before it is evaluated, whichever thread ran it.
pub fn evaluate_all(
    config: &ModelConfig,
    target: Target,
    workloads: &[Workload],
    attention: AttentionImpl,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> std::result::Result<Vec<PointMetrics>, (usize, Error)> {
    let next = AtomicUsize::new(0);
    // Lowest failing index so far: no chunk past it is started.
    let first_failure = AtomicUsize::new(usize::MAX);
    type Done = (Vec<(usize, Vec<PointMetrics>)>, Option<(usize, Error)>);
    let work = || -> Done {
        let mut done = Vec::new();
        loop {
            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
            if start >= workloads.len() || start >= first_failure.load(Ordering::Relaxed) {
                return (done, None);
            }
            let end = (start + CHUNK).min(workloads.len());
            let mut rows = Vec::with_capacity(end - start);
            for (i, w) in workloads.iter().enumerate().take(end).skip(start) {
                match evaluate(config, target, w, attention) {
                    Ok(row) => rows.push(row),
                    Err(e) => {
                        first_failure.fetch_min(i, Ordering::Relaxed);
                        return (done, Some((i, e)));
                    }
                }
            }
            progress(end - start);
            done.push((start, rows));
        }
    };
    let chunk_count = workloads.len().div_ceil(CHUNK);
    let finished: Vec<Done> = std::thread::scope(|scope| {
        // A thread the system cannot start leaves its points to the others.
        let handles: Vec<_> = (1..threads.clamp(1, chunk_count.max(1)))
            .map_while(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut finished = vec![work()];
        for h in handles {
            // A panic is a bug: it goes on as a panic, not as a row.
            finished.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        finished
    });
    let mut chunks = Vec::new();
    let mut failure: Option<(usize, Error)> = None;
    for (done, failed) in finished {
        chunks.extend(done);
        if let Some((i, e)) = failed {
            if failure.as_ref().map_or(true, |(first, _)| i < *first) {
                failure = Some((i, e));
            }
        }
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    chunks.sort_unstable_by_key(|(start, _)| *start);
    Ok(chunks.into_iter().flat_map(|(_, rows)| rows).collect())
}

/// A finished sweep: every point's workload and metrics, in the grid's order.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub config: ModelConfig,
    /// The name rows are reported under ([`Target::name`]).
    pub target: String,
    pub attention: AttentionImpl,
    /// The axes varied, in the order given (the first varies slowest).
    pub varied: Vec<Axis>,
    pub workloads: Vec<Workload>,
    pub rows: Vec<PointMetrics>,
}

impl SweepReport {
    /// The axes each row lists ([`point_axes`]).
    fn axes(&self) -> [Axis; 2] {
        point_axes(
            self.workloads
                .first()
                .map_or(Phase::Prefill { seq_len: 0 }, |w| w.phase),
        )
    }

    /// The points with their values on [`SweepReport::axes`] (every workload of a sweep
    /// has the same phase, so each has both).
    fn points(&self) -> impl Iterator<Item = ([u64; 2], &PointMetrics)> {
        let axes = self.axes();
        self.workloads
            .iter()
            .zip(&self.rows)
            .map(move |(w, row)| (axes.map(|a| a.of(w).unwrap_or_default()), row))
    }

    /// The `modelmeter.sweep/1` JSON object: the first point's whole workload, then each
    /// point's axes, metrics and peak, and the conventions (as analyze's); every count an
    /// exact integer. Serialize it directly ([`serde_json::to_string`] of this): points
    /// go out one by one, where a tree of JSON values per point would hold gigabytes for
    /// a million of them.
    pub fn json(&self) -> impl Serialize + '_ {
        let first = self.workloads.first();
        SweepJson {
            schema: SWEEP_SCHEMA,
            config: &self.config,
            target: &self.target,
            attention: first
                .and_then(|w| crate::layers::attention_core(&self.config, w.mla, self.attention)),
            varied: &self.varied,
            first_workload: first,
            points: Points(self),
            conventions: crate::conventions::conventions_json(),
        }
    }

    /// [`SweepReport::json`] as a value (for tests and small sweeps).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.json()).unwrap_or(Value::Null)
    }

    /// One line per point, comma-separated, after a header: the point's axes, every
    /// metric of [`crate::metrics::Metric::ALL`] and `peak_activation_bytes`, as exact integers.
    #[cfg(feature = "cli")]
    pub fn to_csv(&self) -> std::result::Result<String, csv::Error> {
        let mut out = csv::Writer::from_writer(Vec::new());
        let header = self
            .axes()
            .map(Axis::key)
            .into_iter()
            .chain(crate::metrics::Metric::ALL.map(crate::metrics::Metric::name))
            .chain(["peak_activation_bytes"]);
        out.write_record(header)?;
        for (values, row) in self.points() {
            let record = values
                .into_iter()
                .chain(crate::metrics::Metric::ALL.map(|m| m.get(&row.metrics)))
                .chain([row.peak.peak_bytes])
                .map(|v| v.to_string());
            out.write_record(record)?;
        }
        let bytes = out
            .into_inner()
            .map_err(|e| csv::Error::from(e.into_error()))?;
        // Digits, commas and ASCII names only.
        String::from_utf8(bytes)
            .map_err(|e| csv::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// A table for people: a title, then one row per point (its axes, then the columns
    /// of `modelmeter analyze`, in its units).
    pub fn to_text(&self) -> String {
        let (first, last) = (self.workloads.first(), self.workloads.last());
        let span = match (first, last) {
            (Some(f), Some(l)) if self.workloads.len() > 1 => {
                format!("{} … {}", f.describe(), l.describe())
            }
            (Some(f), _) => f.describe(),
            _ => String::new(),
        };
        let attention = first.map_or(self.attention.class_name(), |w| {
            attention_class_name(&self.config, w.mla, self.attention)
        });
        let platform = first.map_or(Platform::Cuda, |w| w.platform);
        let n = self.workloads.len();
        let mut out = format!(
            "modelmeter sweep — {} — {} on {platform} — attention {attention}\n{n} point{}: {span}\n\n",
            crate::error::one_line(&self.config.name),
            self.target,
            if n == 1 { "" } else { "s" },
        );
        let axes = self.axes();
        let mut header: Vec<String> = axes.iter().map(|a| a.key().to_string()).collect();
        header.extend(crate::report::header("").into_iter().skip(1));
        let mut rows = vec![header];
        for (values, row) in self.points() {
            let mut cells: Vec<String> = values.iter().map(u64::to_string).collect();
            cells.extend(
                crate::report::row("", &row.metrics, Some(&row.peak))
                    .into_iter()
                    .skip(1),
            );
            rows.push(cells);
        }
        let right = vec![true; rows[0].len()];
        out.push_str(&units::table(&rows, &right));
        out
    }
}

/// The `modelmeter.sweep/1` object ([`SweepReport::json`]).
#[derive(Serialize)]
struct SweepJson<'a> {
    schema: &'static str,
    config: &'a ModelConfig,
    target: &'a str,
    /// The attention core (null in the absorbed MLA form), as analyze writes it.
    attention: Option<AttentionImpl>,
    varied: &'a [Axis],
    first_workload: Option<&'a Workload>,
    points: Points<'a>,
    conventions: Value,
}

/// Every point of a report, serialized one by one.
struct Points<'a>(&'a SweepReport);

impl Serialize for Points<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let axes = self.0.axes();
        let mut seq = serializer.serialize_seq(Some(self.0.rows.len()))?;
        for (values, row) in self.0.points() {
            /// One point: its axes, then `metrics` and `peak`.
            struct Point<'p>([Axis; 2], [u64; 2], &'p PointMetrics);
            impl Serialize for Point<'_> {
                fn serialize<S: serde::Serializer>(
                    &self,
                    serializer: S,
                ) -> std::result::Result<S::Ok, S::Error> {
                    let Point(axes, values, row) = self;
                    let mut map = serializer.serialize_map(Some(4))?;
                    for (axis, value) in axes.iter().zip(values) {
                        map.serialize_entry(axis.key(), value)?;
                    }
                    map.serialize_entry("metrics", &row.metrics)?;
                    map.serialize_entry("peak", &row.peak)?;
                    map.end()
                }
            }
            seq.serialize_element(&Point(axes, values, row))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::layers_of;
    use crate::report::analyze;
    use crate::workload::MlaForm;
    use serde_json::json;

    /// The rows of `target` at `workloads` on `threads` threads, every point succeeding.
    fn rows_of(
        config: &ModelConfig,
        target: Target,
        workloads: &[Workload],
        threads: usize,
    ) -> Vec<PointMetrics> {
        evaluate_all(
            config,
            target,
            workloads,
            AttentionImpl::Sdpa,
            threads,
            &|_| {},
        )
        .unwrap()
    }

    fn axis_values(points: &[Vec<(Axis, u64)>]) -> Vec<Vec<u64>> {
        points
            .iter()
            .map(|p| p.iter().map(|(_, v)| *v).collect())
            .collect()
    }

    #[test]
    fn grid_is_nested_loops_in_the_order_given() {
        let points = grid(&[(Axis::Batch, vec![1, 2]), (Axis::SeqLen, vec![8, 16, 32])]).unwrap();
        assert_eq!(
            axis_values(&points),
            [[1, 8], [1, 16], [1, 32], [2, 8], [2, 16], [2, 32]]
        );
        assert!(points
            .iter()
            .all(|p| p[0].0 == Axis::Batch && p[1].0 == Axis::SeqLen));
        assert_eq!(grid(&[]).unwrap(), vec![Vec::<(Axis, u64)>::new()]);
    }

    #[test]
    fn grids_past_the_limit_are_refused_before_any_point_is_built() {
        let many: Vec<u64> = (1..=1001).collect();
        let e = grid(&[(Axis::Batch, many.clone()), (Axis::SeqLen, many)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1002001 (1001 batch × 1001 seq-len)") && e.contains("at most 1000000"),
            "{e}"
        );
        let exactly: Vec<u64> = (1..=1000).collect();
        assert_eq!(
            grid(&[(Axis::Batch, exactly.clone()), (Axis::SeqLen, exactly)])
                .unwrap()
                .len(),
            1_000_000
        );
    }

    #[test]
    fn axes_round_trip_by_option_and_key() {
        for axis in Axis::ALL {
            assert_eq!(Axis::parse(axis.option()), Some(axis));
            assert_eq!(Axis::parse(axis.key()), Some(axis));
        }
        assert_eq!(Axis::parse("tokens"), None);
    }

    /// Every row of a sweep is analyze's row for its workload: the stack and each layer,
    /// prefill and decode, on a GPU (allocator blocks) and on the CPU, for a multi-head
    /// config and an MLA one in both forms.
    #[test]
    fn each_point_is_analyzes_row_for_its_workload() {
        let ocr = ModelConfig::deepseek_ocr();
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let workloads = [
            Workload::prefill(2, 37).unwrap(),
            Workload::decode(3, 129).unwrap(),
        ];
        let mut compared = 0;
        for (config, form) in [
            (&ocr, MlaForm::Naive),
            (&lite, MlaForm::Naive),
            (&lite, MlaForm::Absorb),
        ] {
            for base in &workloads {
                for platform in [Platform::Cuda, Platform::Cpu] {
                    let w = base.clone().on(platform).with_mla(form);
                    let attention = AttentionImpl::Sdpa;
                    let report = analyze(config, &w, attention, None).unwrap();
                    let stack = evaluate(config, Target::Stack, &w, attention).unwrap();
                    assert_eq!(
                        stack.metrics,
                        report.stack.metrics,
                        "{} {}",
                        config.name,
                        w.describe()
                    );
                    assert_eq!(
                        stack.peak,
                        report.stack.peak,
                        "{} {}",
                        config.name,
                        w.describe()
                    );
                    let ids = LayerId::ALL.into_iter().filter(|id| id.is_in(config));
                    for (id, shown) in ids.zip(&report.layers) {
                        let row = evaluate(config, Target::Layer(id), &w, attention).unwrap();
                        assert_eq!(Target::Layer(id).name(config, &w, attention), shown.name);
                        assert_eq!(
                            row.metrics,
                            shown.metrics,
                            "{} {}",
                            shown.name,
                            w.describe()
                        );
                        assert_eq!(row.peak, shown.peak, "{} {}", shown.name, w.describe());
                        compared += 1;
                    }
                    assert_eq!(
                        report.layers.len(),
                        layers_of(config, &w, attention).unwrap().len()
                    );
                }
            }
        }
        assert!(compared >= 3 * 2 * 2 * 5, "{compared} layer rows compared");
    }

    #[test]
    fn threads_return_the_rows_in_order_and_report_the_first_failure() {
        let config = ModelConfig::deepseek_ocr();
        let workloads: Vec<Workload> = (1..=300)
            .map(|s| Workload::prefill(1, s).unwrap())
            .collect();
        let one = rows_of(&config, Target::Stack, &workloads, 1);
        let finished = AtomicUsize::new(0);
        let four = evaluate_all(
            &config,
            Target::Stack,
            &workloads,
            AttentionImpl::Sdpa,
            4,
            &|n| {
                finished.fetch_add(n, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(one, four);
        assert_eq!(finished.into_inner(), 300);
        // No more threads than chunks of points, however many are asked for.
        let many = rows_of(&config, Target::Stack, &workloads[..3], usize::MAX);
        assert_eq!(many, one[..3]);
        assert_eq!(
            four[99],
            evaluate(&config, Target::Stack, &workloads[99], AttentionImpl::Sdpa).unwrap()
        );
        // Points that overflow from index 150 on: the first of them is the one reported,
        // however the threads raced.
        let mut failing = workloads.clone();
        for w in &mut failing[150..] {
            w.batch = u64::MAX / 2;
        }
        for threads in [1, 3, 8] {
            let (at, e) = evaluate_all(
                &config,
                Target::Stack,
                &failing,
                AttentionImpl::Sdpa,
                threads,
                &|_| {},
            )
            .unwrap_err();
            assert_eq!(at, 150, "{threads} threads");
            assert!(matches!(e, Error::Overflow { .. }), "{e}");
        }
    }

    #[test]
    fn renderings_list_each_point_with_its_axes_in_order() {
        let config = ModelConfig::deepseek_ocr();
        let workloads: Vec<Workload> = [(1, 16), (1, 32), (4, 16)]
            .map(|(b, s)| Workload::prefill(b, s).unwrap())
            .to_vec();
        let rows = rows_of(&config, Target::Layer(LayerId::Mlp), &workloads, 2);
        let report = SweepReport {
            config: config.clone(),
            target: "DeepseekV2MLP".into(),
            attention: AttentionImpl::Sdpa,
            varied: vec![Axis::Batch, Axis::SeqLen],
            workloads: workloads.clone(),
            rows: rows.clone(),
        };
        let j = report.to_json();
        assert_eq!(j["schema"], SWEEP_SCHEMA);
        assert_eq!(j["varied"], json!(["batch", "seq_len"]));
        assert_eq!(j["points"][2]["batch"], 4);
        assert_eq!(j["points"][2]["seq_len"], 16);
        assert_eq!(
            j["points"][1]["metrics"]["matmul_flops"].as_u64(),
            Some(rows[1].metrics.matmul_flops)
        );
        assert_eq!(
            j["points"][0]["peak"]["peak_bytes"].as_u64(),
            Some(rows[0].peak.peak_bytes)
        );
        let text = report.to_text();
        assert!(
            text.contains("3 points: B=1 prefill S=16 bf16 … B=4 prefill S=16 bf16"),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("GFLOP") || l.contains("MFLOP"))
                .count(),
            3,
            "{text}"
        );
    }

    #[cfg(feature = "cli")]
    #[test]
    fn csv_has_exact_integers_under_a_header_of_axes_and_metrics() {
        let config = ModelConfig::deepseek_ocr();
        let workloads = vec![
            Workload::decode(2, 100).unwrap(),
            Workload::decode(2, 200).unwrap(),
        ];
        let rows = rows_of(&config, Target::Stack, &workloads, 1);
        let report = SweepReport {
            config,
            target: "DeepseekV2ForCausalLM".into(),
            attention: AttentionImpl::Sdpa,
            varied: vec![Axis::ContextLen],
            workloads,
            rows: rows.clone(),
        };
        let csv = report.to_csv().unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "batch,context_len,matmul_flops,elementwise_flops,tensor_core_flops,cuda_core_flops,io_bytes,weight_bytes,activation_bytes,kv_cache_bytes,peak_activation_bytes"
        );
        let second: Vec<u64> = lines[2].split(',').map(|v| v.parse().unwrap()).collect();
        assert_eq!(second[..2], [2, 200]);
        assert_eq!(second[2], rows[1].metrics.matmul_flops);
        assert_eq!(second[9], rows[1].metrics.kv_cache_bytes);
        assert_eq!(second[10], rows[1].peak.peak_bytes);
        assert_eq!(lines.len(), 3);
    }
}

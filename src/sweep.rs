//! Design-space sweeps: the metrics of the whole decoder stack, of one layer, or of a whole
//! generation, at every point of a grid of workloads (`modelmeter sweep`).
//!
//! A point is evaluated as `modelmeter analyze` evaluates its one workload: the same op
//! lists, with the sums and the liveness kept but not the per-op tree
//! ([`crate::metrics::sums_only`]), and on a GPU the caching allocator's blocks
//! ([`Cost::metrics_on`]); a generation is analyze's `--new-tokens` total
//! ([`Generation::metrics`]). So a sweep's row is analyze's row for that point (tests check
//! every layer, the stack and generations, on both platforms). Points are independent:
//! they are spread over threads, and the rows come back in the grid's order.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layers::{
    attention_class_name, AttentionImpl, DeepseekV2Decoder, Generation, Layer, LayerId,
};
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

/// A dimension a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Sequences per call (`--batch`).
    Batch,
    /// Prompt tokens of a prefill (`--seq-len`).
    SeqLen,
    /// Cached tokens before a decode step (`--context-len`).
    ContextLen,
    /// Decode steps after the prefill of a whole generation (`--new-tokens`).
    NewTokens,
}

impl Axis {
    /// Every axis, in the order a point's columns list them.
    pub const ALL: [Axis; 4] = [Axis::Batch, Axis::SeqLen, Axis::ContextLen, Axis::NewTokens];

    /// As the command line spells it (`seq-len`): the option that sets it alone is
    /// `--` and this.
    pub fn option(self) -> &'static str {
        match self {
            Axis::Batch => "batch",
            Axis::SeqLen => "seq-len",
            Axis::ContextLen => "context-len",
            Axis::NewTokens => "new-tokens",
        }
    }

    /// As columns and JSON keys spell it (`seq_len`, the workload's field).
    pub fn key(self) -> &'static str {
        match self {
            Axis::Batch => "batch",
            Axis::SeqLen => "seq_len",
            Axis::ContextLen => "context_len",
            Axis::NewTokens => "new_tokens",
        }
    }

    /// The axis the command line calls `name` (`seq-len`; `seq_len` too).
    pub fn parse(name: &str) -> Option<Axis> {
        Axis::ALL
            .into_iter()
            .find(|a| a.option() == name || a.key() == name)
    }

    /// Its value at `point`; `None` for what the point has not (a prefill's context
    /// length, a decode step's prompt length, a single call's new tokens).
    pub fn of(self, point: &Point) -> Option<u64> {
        match (self, point.workload.phase) {
            (Axis::Batch, _) => Some(point.workload.batch),
            (Axis::SeqLen, Phase::Prefill { seq_len }) => Some(seq_len),
            (Axis::ContextLen, Phase::Decode { context_len }) => Some(context_len),
            (Axis::NewTokens, _) => point.new_tokens,
            _ => None,
        }
    }
}

/// The axes that identify a point: the batch, the prompt length of a prefill or the
/// context length of a decode step (`decode`), and for a whole generation the new tokens.
/// Every row lists them, varied or not, so that rows of several sweeps can be put
/// together.
pub fn axes_of(decode: bool, generation: bool) -> Vec<Axis> {
    let length = if decode {
        Axis::ContextLen
    } else {
        Axis::SeqLen
    };
    let mut axes = vec![Axis::Batch, length];
    if generation {
        axes.push(Axis::NewTokens);
    }
    axes
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

/// One point of a sweep: a workload, and for a whole generation the decode steps after
/// its prefill.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub workload: Workload,
    /// `Some` for a whole generation ([`Target::Generation`]): the prefill `workload`, then
    /// this many decode steps.
    pub new_tokens: Option<u64>,
}

impl Point {
    /// A point of one call at `workload`.
    pub fn call(workload: Workload) -> Point {
        Point {
            workload,
            new_tokens: None,
        }
    }

    /// The axes that identify this point ([`axes_of`]).
    pub fn axes(&self) -> Vec<Axis> {
        axes_of(
            matches!(self.workload.phase, Phase::Decode { .. }),
            self.new_tokens.is_some(),
        )
    }

    /// A one-line description (`B=1 prefill S=512 bf16`, `… + 64 new tokens`).
    pub fn describe(&self) -> String {
        match self.new_tokens {
            Some(1) => format!("{} + 1 new token", self.workload.describe()),
            Some(n) => format!("{} + {n} new tokens", self.workload.describe()),
            None => self.workload.describe(),
        }
    }
}

/// What a sweep evaluates at each point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The whole decoder stack (`DeepseekV2ForCausalLM`: embedding, every layer, the final
    /// norm and the LM head), as analyze's `stack` row.
    Stack,
    /// One layer, as analyze's row of that layer.
    Layer(LayerId),
    /// A whole generation, the prefill and the point's new tokens: analyze's
    /// `--new-tokens` total (activations in tensor bytes, no peak).
    Generation,
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
            Target::Generation => format!(
                "{} generation",
                DeepseekV2Decoder::new(config, workload, attention).name()
            ),
        }
    }
}

/// The metrics of one point: analyze's row for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PointMetrics {
    /// On a GPU `activation_bytes` counts the caching allocator's blocks, except for a
    /// generation (tensor bytes, as analyze's `generation`).
    pub metrics: Metrics,
    /// On a GPU in the caching allocator's blocks; `None` for a generation (whose closed
    /// form sums the calls without their liveness).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<Peak>,
}

/// Evaluates `target` at `point`. A generation needs a prefill point with new tokens, a
/// single call a point without: any other pairing is an error, never a guessed row.
pub fn evaluate(
    config: &ModelConfig,
    target: Target,
    point: &Point,
    attention: AttentionImpl,
) -> Result<PointMetrics> {
    let w = &point.workload;
    let call = |f: &dyn Fn() -> Result<Cost>| -> Result<PointMetrics> {
        let cost = sums_only(f)?;
        let cuda = w.platform == Platform::Cuda;
        Ok(PointMetrics {
            metrics: cost.metrics_on(cuda),
            peak: Some(*cost.peak_on(cuda)),
        })
    };
    match (target, point.new_tokens) {
        (Target::Stack, None) => call(&|| DeepseekV2Decoder::new(config, w, attention).cost()),
        (Target::Layer(id), None) => call(&|| id.build(config, w, attention)?.cost()),
        (Target::Generation, Some(n)) => {
            let g = Generation::after_prefill(config, w, n, attention).ok_or_else(|| {
                Error::invalid("phase", "decode", "a prefill: a generation starts with one")
            })?;
            Ok(PointMetrics {
                metrics: g.metrics()?.total,
                peak: None,
            })
        }
        (Target::Generation, None) => Err(Error::invalid(
            "new_tokens",
            "none",
            "the decode steps of the generation",
        )),
        (_, Some(n)) => Err(Error::invalid(
            "new_tokens",
            n,
            "none for a single call (a generation is the whole model's)",
        )),
    }
}

/// Points claimed by a thread at a time: few enough that the threads finish together,
/// enough that claiming costs nothing beside the evaluations.
const CHUNK: usize = 64;

/// Evaluates `target` at every point on up to `threads` threads (at least one; no more
/// than there are chunks of points, and fewer where the system starts no more), calling
/// `progress` with the count of points each finished chunk adds. The rows are in the
/// order of `points`. On failure, the error of the first point (in that order) that
/// fails, with its index: every point before it is evaluated, whichever thread ran it.
pub fn evaluate_all(
    config: &ModelConfig,
    target: Target,
    points: &[Point],
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
            if start >= points.len() || start >= first_failure.load(Ordering::Relaxed) {
                return (done, None);
            }
            let end = (start + CHUNK).min(points.len());
            let mut rows = Vec::with_capacity(end - start);
            for (i, point) in points.iter().enumerate().take(end).skip(start) {
                match evaluate(config, target, point, attention) {
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
    // No more threads than chunks; one the system cannot start leaves its points to the
    // others, and a panic (a bug) goes on as a panic, not as a row.
    let chunk_count = points.len().div_ceil(CHUNK);
    let finished: Vec<Done> =
        crate::threads::on_threads(threads.clamp(1, chunk_count.max(1)) - 1, &work);
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

/// A finished sweep: every point and its metrics, in the grid's order. Its points are of
/// one kind (one phase; all generations or none), as a grid's are: the columns are the
/// first point's.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub config: ModelConfig,
    /// The name rows are reported under ([`Target::name`]).
    pub target: String,
    pub attention: AttentionImpl,
    /// The axes varied, in the order given (the first varies slowest).
    pub varied: Vec<Axis>,
    pub points: Vec<Point>,
    pub rows: Vec<PointMetrics>,
}

impl SweepReport {
    /// The axes each row lists (every point of a sweep has the same phase and kind).
    fn axes(&self) -> Vec<Axis> {
        self.points
            .first()
            .map_or_else(|| axes_of(false, false), Point::axes)
    }

    /// Whether the rows are generations (no peak; activations in tensor bytes).
    fn generations(&self) -> bool {
        self.axes().contains(&Axis::NewTokens)
    }

    /// The points with their values on [`SweepReport::axes`].
    fn entries(&self) -> impl Iterator<Item = (Vec<u64>, &PointMetrics)> {
        let axes = self.axes();
        self.points.iter().zip(&self.rows).map(move |(p, row)| {
            let values = axes.iter().map(|a| a.of(p).unwrap_or_default()).collect();
            (values, row)
        })
    }

    /// The `modelmeter.sweep/1` JSON object: the first point's whole workload, then each
    /// point's axes, metrics and peak, and the conventions (as analyze's); every count an
    /// exact integer. Serialize it directly ([`SweepReport::write_json`]): points go out
    /// one by one, where a tree of JSON values per point would hold gigabytes for a
    /// million of them.
    pub fn json(&self) -> impl Serialize + '_ {
        let first = self.points.first().map(|p| &p.workload);
        SweepJson {
            schema: SWEEP_SCHEMA,
            config: &self.config,
            target: &self.target,
            attention: first
                .and_then(|w| crate::layers::attention_core(&self.config, w.mla, self.attention)),
            varied: &self.varied,
            first_workload: first,
            // As analyze's `generation` says it: its closed form sums tensors.
            activation_bytes_are: self.generations().then_some("tensor_bytes"),
            points: Points(self),
            conventions: crate::conventions::conventions_json(),
        }
    }

    /// [`SweepReport::json`] as a value (for tests and small sweeps).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.json()).unwrap_or(Value::Null)
    }

    /// [`SweepReport::json`] written to `out` on one line, point by point.
    pub fn write_json(&self, mut out: impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut out, &self.json())?;
        out.write_all(b"\n")
    }

    /// One line per point, comma-separated, after a header: the point's axes, every
    /// metric of [`crate::metrics::Metric::ALL`] and (but for generations)
    /// `peak_activation_bytes`, as exact integers.
    #[cfg(feature = "cli")]
    pub fn to_csv(&self) -> std::io::Result<String> {
        let mut bytes = Vec::new();
        self.write_csv(&mut bytes)?;
        // Digits, commas and ASCII names only.
        String::from_utf8(bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// [`SweepReport::to_csv`] written to `out` line by line, not held whole (a million
    /// points are half a gigabyte of CSV).
    #[cfg(feature = "cli")]
    pub fn write_csv(&self, out: impl Write) -> std::io::Result<()> {
        use crate::metrics::Metric;
        // The writer's failures are its output's (a closed pipe, a full disk): said as such.
        let io = |e: csv::Error| match e.into_kind() {
            csv::ErrorKind::Io(e) => e,
            kind => std::io::Error::other(format!("{kind:?}")),
        };
        let mut out = csv::Writer::from_writer(out);
        let peak: &[&str] = if self.generations() {
            &[]
        } else {
            &["peak_activation_bytes"]
        };
        let header = self
            .axes()
            .into_iter()
            .map(Axis::key)
            .chain(Metric::ALL.map(Metric::name))
            .chain(peak.iter().copied());
        out.write_record(header).map_err(io)?;
        for (values, row) in self.entries() {
            let record = values
                .into_iter()
                .chain(Metric::ALL.map(|m| m.get(&row.metrics)))
                .chain(row.peak.map(|p| p.peak_bytes))
                .map(|v| v.to_string());
            out.write_record(record).map_err(io)?;
        }
        out.flush()
    }

    /// A table for people: a title, then one row per point (its axes, then the columns
    /// of `modelmeter analyze`, in its units).
    pub fn to_text(&self) -> String {
        let mut bytes = Vec::new();
        // Writing to memory cannot fail, and every cell is text.
        let _ = self.write_text(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// [`SweepReport::to_text`] written to `out` row by row: the rows are formatted once
    /// to measure the columns and again to write them, so that no more than one row's
    /// text is held at a time (a million points' table is over a gigabyte).
    pub fn write_text(&self, out: impl Write) -> std::io::Result<()> {
        let (first, last) = (self.points.first(), self.points.last());
        let span = match (first, last) {
            (Some(f), Some(l)) if self.points.len() > 1 => {
                format!("{} … {}", f.describe(), l.describe())
            }
            (Some(f), _) => f.describe(),
            _ => String::new(),
        };
        let workload = first.map(|p| &p.workload);
        let attention = workload.map_or(self.attention.class_name(), |w| {
            attention_class_name(&self.config, w.mla, self.attention)
        });
        let platform = workload.map_or(Platform::Cuda, |w| w.platform);
        let n = self.points.len();
        let mut text = format!(
            "modelmeter sweep — {} — {} on {platform} — attention {attention}\n{n} point{}: {span}\n",
            crate::error::one_line(&self.config.name),
            self.target,
            if n == 1 { "" } else { "s" },
        );
        if self.generations() && platform == Platform::Cuda {
            text.push_str("activations: tensor bytes, not rounded to CUDA blocks\n");
        }
        text.push('\n');
        // analyze's columns, less its first (the name); a generation has no peak (nor has
        // it in the CSV and the JSON), so its table has no column for one.
        let generations = self.generations();
        let metric_columns = |mut columns: Vec<String>| {
            if generations {
                columns.remove(crate::report::PEAK_COLUMN);
            }
            columns.into_iter().skip(1)
        };
        let mut header: Vec<String> = self.axes().iter().map(|a| a.key().to_string()).collect();
        header.extend(metric_columns(crate::report::header("")));
        let cells = |(values, row): (Vec<u64>, &PointMetrics)| -> Vec<String> {
            let mut cells: Vec<String> = values.iter().map(u64::to_string).collect();
            cells.extend(metric_columns(crate::report::row(
                "",
                &row.metrics,
                row.peak.as_ref(),
            )));
            cells
        };
        let width =
            units::column_widths(std::iter::once(header.clone()).chain(self.entries().map(cells)));
        let right = vec![true; header.len()];
        units::push_row(&mut text, &header, &width, &right, true);
        let mut out = std::io::BufWriter::new(out);
        out.write_all(text.as_bytes())?;
        for entry in self.entries() {
            text.clear();
            units::push_row(&mut text, &cells(entry), &width, &right, false);
            out.write_all(text.as_bytes())?;
        }
        out.flush()
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
    #[serde(skip_serializing_if = "Option::is_none")]
    activation_bytes_are: Option<&'static str>,
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
        for (values, row) in self.0.entries() {
            /// One point: its axes, then `metrics` and (but for a generation) `peak`.
            struct Entry<'p>(&'p [Axis], Vec<u64>, &'p PointMetrics);
            impl Serialize for Entry<'_> {
                fn serialize<S: serde::Serializer>(
                    &self,
                    serializer: S,
                ) -> std::result::Result<S::Ok, S::Error> {
                    let Entry(axes, values, row) = self;
                    let mut map = serializer.serialize_map(None)?;
                    for (axis, value) in axes.iter().zip(values) {
                        map.serialize_entry(axis.key(), value)?;
                    }
                    map.serialize_entry("metrics", &row.metrics)?;
                    if let Some(peak) = &row.peak {
                        map.serialize_entry("peak", peak)?;
                    }
                    map.end()
                }
            }
            seq.serialize_element(&Entry(&axes, values, row))?;
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

    /// The rows of `target` at `points` on `threads` threads, every point succeeding.
    fn rows_of(
        config: &ModelConfig,
        target: Target,
        points: &[Point],
        threads: usize,
    ) -> Vec<PointMetrics> {
        evaluate_all(
            config,
            target,
            points,
            AttentionImpl::Sdpa,
            threads,
            &|_| {},
        )
        .unwrap()
    }

    /// The report of `target` at `points` with `varied` axes, as `modelmeter sweep` makes
    /// it (on `threads` threads, every point succeeding).
    fn sweep_of(
        config: &ModelConfig,
        target: Target,
        varied: Vec<Axis>,
        points: Vec<Point>,
        threads: usize,
    ) -> SweepReport {
        let rows = rows_of(config, target, &points, threads);
        SweepReport {
            config: config.clone(),
            target: target.name(config, &points[0].workload, AttentionImpl::Sdpa),
            attention: AttentionImpl::Sdpa,
            varied,
            points,
            rows,
        }
    }

    /// A single call's point at each workload.
    fn calls(workloads: impl IntoIterator<Item = Workload>) -> Vec<Point> {
        workloads.into_iter().map(Point::call).collect()
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
                    let point = Point::call(w.clone());
                    let stack = evaluate(config, Target::Stack, &point, attention).unwrap();
                    assert_eq!(
                        stack.metrics,
                        report.stack.metrics,
                        "{} {}",
                        config.name,
                        w.describe()
                    );
                    assert_eq!(
                        stack.peak,
                        Some(report.stack.peak),
                        "{} {}",
                        config.name,
                        w.describe()
                    );
                    let ids = LayerId::ALL.into_iter().filter(|id| id.is_in(config));
                    for (id, shown) in ids.zip(&report.layers) {
                        let row = evaluate(config, Target::Layer(id), &point, attention).unwrap();
                        assert_eq!(Target::Layer(id).name(config, &w, attention), shown.name);
                        assert_eq!(
                            row.metrics,
                            shown.metrics,
                            "{} {}",
                            shown.name,
                            w.describe()
                        );
                        assert_eq!(
                            row.peak,
                            Some(shown.peak),
                            "{} {}",
                            shown.name,
                            w.describe()
                        );
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

    /// A generation's row is analyze's `--new-tokens` total, on both platforms, for a
    /// multi-head config and an MLA one; mismatched targets and points are errors.
    #[test]
    fn a_generation_point_is_analyzes_generation_total() {
        let ocr = ModelConfig::deepseek_ocr();
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        for config in [&ocr, &lite] {
            for platform in [Platform::Cuda, Platform::Cpu] {
                for (seq_len, new_tokens) in [(5, 0), (33, 7)] {
                    let w = Workload::prefill(2, seq_len).unwrap().on(platform);
                    let attention = AttentionImpl::Sdpa;
                    let report = analyze(config, &w, attention, Some(new_tokens)).unwrap();
                    let point = Point {
                        workload: w.clone(),
                        new_tokens: Some(new_tokens),
                    };
                    let row = evaluate(config, Target::Generation, &point, attention).unwrap();
                    let (n, shown) = report.generation.unwrap();
                    assert_eq!(n, new_tokens);
                    assert_eq!(
                        row.metrics,
                        shown.total,
                        "{} {}",
                        config.name,
                        point.describe()
                    );
                    assert_eq!(row.peak, None);
                }
            }
        }
        let prefill = Point::call(Workload::prefill(1, 8).unwrap());
        let generation = Point {
            new_tokens: Some(4),
            ..prefill.clone()
        };
        let decode = Point {
            workload: Workload::decode(1, 8).unwrap(),
            new_tokens: Some(4),
        };
        for (target, point, says) in [
            (Target::Generation, &prefill, "new_tokens = none"),
            (Target::Stack, &generation, "new_tokens = 4"),
            (Target::Generation, &decode, "phase = decode"),
        ] {
            let e = evaluate(&ocr, target, point, AttentionImpl::Sdpa).unwrap_err();
            assert!(e.to_string().contains(says), "{target:?}: {e}");
        }
    }

    #[test]
    fn threads_return_the_rows_in_order_and_report_the_first_failure() {
        let config = ModelConfig::deepseek_ocr();
        let workloads = calls((1..=300).map(|s| Workload::prefill(1, s).unwrap()));
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
        for p in &mut failing[150..] {
            p.workload.batch = u64::MAX / 2;
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
        let points =
            calls([(1, 16), (1, 32), (4, 16)].map(|(b, s)| Workload::prefill(b, s).unwrap()));
        let report = sweep_of(
            &config,
            Target::Layer(LayerId::Mlp),
            vec![Axis::Batch, Axis::SeqLen],
            points,
            2,
        );
        let rows = report.rows.clone();
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
            rows[0].peak.map(|p| p.peak_bytes)
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
        // A layer's points have their peak, after the activations.
        let header = text.lines().find(|l| l.contains("seq_len")).unwrap();
        assert!(header.contains("activations  peak act."), "{text}");
    }

    #[cfg(feature = "cli")]
    #[test]
    fn csv_has_exact_integers_under_a_header_of_axes_and_metrics() {
        let config = ModelConfig::deepseek_ocr();
        let points = calls([100, 200].map(|c| Workload::decode(2, c).unwrap()));
        let report = sweep_of(&config, Target::Stack, vec![Axis::ContextLen], points, 1);
        let rows = report.rows.clone();
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
        assert_eq!(Some(second[10]), rows[1].peak.map(|p| p.peak_bytes));
        assert_eq!(lines.len(), 3);
    }

    /// A generation sweep lists its new tokens and no peak (its closed form has none), and
    /// says its activations are tensor bytes.
    #[cfg(feature = "cli")]
    #[test]
    fn generation_renderings_list_new_tokens_and_no_peak() {
        let config = ModelConfig::deepseek_ocr();
        let points: Vec<Point> = [3, 9]
            .map(|n| Point {
                workload: Workload::prefill(1, 16).unwrap(),
                new_tokens: Some(n),
            })
            .to_vec();
        let report = sweep_of(
            &config,
            Target::Generation,
            vec![Axis::NewTokens],
            points,
            2,
        );
        let rows = report.rows.clone();
        let csv = report.to_csv().unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "batch,seq_len,new_tokens,matmul_flops,elementwise_flops,tensor_core_flops,cuda_core_flops,io_bytes,weight_bytes,activation_bytes,kv_cache_bytes"
        );
        assert!(lines[2].starts_with(&format!("1,16,9,{},", rows[1].metrics.matmul_flops)));
        let j = report.to_json();
        assert_eq!(j["activation_bytes_are"], "tensor_bytes");
        assert_eq!(j["points"][1]["new_tokens"], 9);
        assert!(j["points"][1].get("peak").is_none());
        let text = report.to_text();
        assert!(
            text.contains("activations: tensor bytes, not rounded to CUDA blocks"),
            "{text}"
        );
        assert!(text.contains("2 points: B=1 prefill S=16 bf16 + 3 new tokens … B=1 prefill S=16 bf16 + 9 new tokens"), "{text}");
        // Nor has the table a peak column (one of dashes before).
        let header = text.lines().find(|l| l.contains("new_tokens")).unwrap();
        assert!(
            header.contains("activations") && !header.contains("peak"),
            "{text}"
        );
        let last = text.lines().last().unwrap();
        assert_eq!(last.split_whitespace().count(), 3 + 8 * 2, "{text}");
        assert!(!last.contains(" - "), "{text}");
    }
}

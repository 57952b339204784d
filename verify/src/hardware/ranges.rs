//! Range bookkeeping: which profiler range is which layer.
//!
//! The profiled child (`--hardware-counters-child DIR`) runs each layer's counted forward
//! as one `cuProfilerStart`/`cuProfilerStop` range, in plan order, and writes the list of
//! its layers, with what the counter booked in that same forward or why the layer failed,
//! to `DIR/ranges.json` ([`RangeList`]). Under ncu's range replay modes (`app-range`, the
//! default, and `range`) each range is one result row of the CSV, in the order the ranges
//! ran (ncu's `ID` column). Ranges opened by the profiler API carry no name a layer could
//! be recognised by, so the rows are attributed by position over every range the child
//! opened, a failed layer's included (ncu writes a row for it too): the i-th result row is
//! the i-th range ([`attribute`]), and a failed layer's row is passed over; a layer that
//! failed before opening its range takes no row. The counts must agree, or nothing is
//! attributed (a skipped or split range would shift every layer after it).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ncu_csv::{NcuCsv, NcuCsvError, ParseOptions};
use super::profile::NcuReplay;
use super::HardwareFigures;

/// The file the child writes in its folder.
pub const RANGE_LIST_FILE: &str = "ranges.json";
/// The file ncu writes its CSV to (`--log-file`) in the same folder.
pub const NCU_CSV_FILE: &str = "ncu.csv";
/// Schema tag of [`RangeList`].
pub const RANGE_LIST_SCHEMA: &str = "modelmeter.hardware-ranges/3";
/// Schema tag of the range lists written before the child knew whether a failed layer had
/// opened its range: the same entries without [`RangeEntry::NotOpened`] (a layer that
/// failed before its counted forward returned was [`RangeEntry::Unknown`]). Read as they
/// are.
pub const RANGE_LIST_SCHEMA_V2: &str = "modelmeter.hardware-ranges/2";
/// Schema tag of the range lists written before failed layers kept their place: `ranges`
/// held the layers that ran and were judged, `errors` the others, so where a failed layer's
/// range stood among the others is not recorded. Read where that does not matter.
pub const RANGE_LIST_SCHEMA_V1: &str = "modelmeter.hardware-ranges/1";

/// One layer the profiled child ran, in range order, with what the counter booked in the
/// profiled forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRecord {
    /// The layer's report name (`DeepseekV2MLP`).
    pub layer: String,
    /// Counted tensor-core FLOPs of the profiled forward.
    pub tensor_core_flops: u64,
    /// Counted CUDA-core FLOPs of the profiled forward.
    pub cuda_core_flops: u64,
    /// Counted bytes read and written (unfused) by the profiled forward.
    pub io_bytes: u64,
}

/// One layer of the child's run, in plan order: what became of its profiler range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "range", rename_all = "snake_case")]
pub enum RangeEntry {
    /// The counted forward ran in the range and was judged: the range's figures are this
    /// layer's.
    Counted(RangeRecord),
    /// The layer failed after its range was opened: in the counted forward or closing the
    /// range, or after the forward returned (judging it, or no counted rows). ncu has a
    /// row for it, which is passed over.
    Failed { layer: String, error: String },
    /// The layer failed before its range was opened (the analytic model, building or
    /// preparing the module, the warm-up forward, opening the range): ncu has no row for
    /// it. Listed so that reports can say why it has no figures.
    NotOpened { layer: String, error: String },
    /// The layer failed where the child cannot tell whether its range was opened (a panic
    /// while it was built, prepared or run, which may have come before the range or inside
    /// it; and every layer that failed before its forward returned in a
    /// [`RANGE_LIST_SCHEMA_V2`] list), so whether ncu has a row for it is not known;
    /// [`attribute`] matches rows only where the count settles it.
    Unknown { layer: String, error: String },
}

impl RangeEntry {
    /// The layer's report name.
    pub fn layer(&self) -> &str {
        match self {
            RangeEntry::Counted(record) => &record.layer,
            RangeEntry::Failed { layer, .. }
            | RangeEntry::NotOpened { layer, .. }
            | RangeEntry::Unknown { layer, .. } => layer,
        }
    }

    /// Why the layer has no figures to use; `None` for a counted one.
    pub fn error(&self) -> Option<&str> {
        match self {
            RangeEntry::Counted(_) => None,
            RangeEntry::Failed { error, .. }
            | RangeEntry::NotOpened { error, .. }
            | RangeEntry::Unknown { error, .. } => Some(error),
        }
    }

    /// True for a layer whose range is certainly among the ranges the run opened.
    fn opened(&self) -> bool {
        matches!(self, RangeEntry::Counted(_) | RangeEntry::Failed { .. })
    }
}

/// What `DIR/ranges.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeList {
    /// [`RANGE_LIST_SCHEMA`].
    pub schema: String,
    /// The device the child ran on (`cuda:0`).
    pub device: String,
    /// Every layer the child ran, in the order their ranges ran (plan order), failed ones
    /// included (also those that opened no range).
    pub layers: Vec<RangeEntry>,
    /// What the child ran (`profile::run_identity`: the config's fields, the workload,
    /// the attention, the seed), so that a reader refuses figures of another run. Absent
    /// in lists written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<serde_json::Value>,
}

/// A [`RANGE_LIST_SCHEMA_V1`] list as it was written.
#[derive(Deserialize)]
struct RangeListV1 {
    device: String,
    ranges: Vec<RangeRecord>,
    errors: Vec<(String, String)>,
}

impl RangeList {
    /// A list for `device` with these layers, in range order.
    pub fn new(device: String, layers: Vec<RangeEntry>) -> Self {
        RangeList {
            schema: RANGE_LIST_SCHEMA.to_string(),
            device,
            layers,
            run: None,
        }
    }

    /// This list, saying what the child ran (`profile::run_identity`).
    pub fn of_run(mut self, run: serde_json::Value) -> Self {
        self.run = Some(run);
        self
    }

    /// The layers whose figures are used, in range order.
    pub fn counted(&self) -> impl Iterator<Item = &RangeRecord> {
        self.layers.iter().filter_map(|entry| match entry {
            RangeEntry::Counted(record) => Some(record),
            _ => None,
        })
    }

    /// Writes `dir/ranges.json`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(RANGE_LIST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Reads `dir/ranges.json`.
    pub fn read(dir: &Path) -> Result<RangeList, String> {
        let path = dir.join(RANGE_LIST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read {} (written by verify-decoder --hardware-counters-child): {e}",
                path.display()
            )
        })?;
        let not_a_list =
            |e: serde_json::Error| format!("{} is not a range list: {e}", path.display());
        let value: serde_json::Value = serde_json::from_str(&text).map_err(not_a_list)?;
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(RANGE_LIST_SCHEMA) => serde_json::from_value(value).map_err(not_a_list),
            Some(RANGE_LIST_SCHEMA_V2) => {
                let old: RangeList = serde_json::from_value(value).map_err(not_a_list)?;
                RangeList::from_v2(old).map_err(|why| format!("{}: {why}", path.display()))
            }
            Some(RANGE_LIST_SCHEMA_V1) => {
                let old: RangeListV1 = serde_json::from_value(value).map_err(not_a_list)?;
                RangeList::from_v1(old).map_err(|why| format!("{}: {why}", path.display()))
            }
            other => Err(format!(
                "{} has schema {:?}, expected {RANGE_LIST_SCHEMA:?} (or {RANGE_LIST_SCHEMA_V2:?}, {RANGE_LIST_SCHEMA_V1:?})",
                path.display(),
                other.unwrap_or("(none)")
            )),
        }
    }

    /// A [`RANGE_LIST_SCHEMA_V2`] list in today's form: the same entries. Refused when it
    /// holds a [`RangeEntry::NotOpened`], which that schema did not have.
    fn from_v2(old: RangeList) -> Result<RangeList, String> {
        if let Some(entry) = old
            .layers
            .iter()
            .find(|e| matches!(e, RangeEntry::NotOpened { .. }))
        {
            return Err(format!(
                "{RANGE_LIST_SCHEMA_V2} has no \"not_opened\" layers, yet {} is one",
                entry.layer()
            ));
        }
        Ok(RangeList::new(old.device, old.layers))
    }

    /// A [`RANGE_LIST_SCHEMA_V1`] list in today's form: its failed layers are
    /// [`RangeEntry::Unknown`] (whether they opened a range was not recorded). Refused when
    /// it has both ranges and failed layers, because where the failed layers stood among
    /// the ranges was not recorded either.
    fn from_v1(old: RangeListV1) -> Result<RangeList, String> {
        if !old.ranges.is_empty() && !old.errors.is_empty() {
            return Err(format!(
                "written by an older verify-decoder ({RANGE_LIST_SCHEMA_V1}), which did not record where its failed layers' ranges stood ({}): run the profiled child again",
                old.errors
                    .iter()
                    .map(|(layer, error)| format!("{layer}: {error}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let counted = old.ranges.into_iter().map(RangeEntry::Counted);
        let failed = old
            .errors
            .into_iter()
            .map(|(layer, error)| RangeEntry::Unknown { layer, error });
        Ok(RangeList::new(old.device, counted.chain(failed).collect()))
    }
}

/// What a layer's `gpu__time_duration.sum` measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSpan {
    /// The profiler range's elapsed GPU time (range and app-range replay): gaps between
    /// kernels and the profiler's own work at the range's edges included (2.5–3 ms for an
    /// MLP whose kernels take 68 µs, H200).
    RangeElapsed,
    /// The layer's kernels' own durations, summed (kernel replay).
    Kernels,
}

/// One layer's range: its record, ncu's name for the range, and the figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributedRange {
    /// 0-based position of the range among all the ranges of the run (failed layers'
    /// included; a layer that opened none has no position).
    pub index: usize,
    /// ncu's `ID` of the result row.
    pub ncu_id: String,
    pub record: RangeRecord,
    pub figures: HardwareFigures,
    /// What the figures' time measured.
    pub time: TimeSpan,
}

/// Why ncu's results cannot be attributed to the layers.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AttributionError {
    #[error(transparent)]
    Csv(#[from] NcuCsvError),
    /// The result rows and the ranges differ in number.
    #[error(
        "ncu reported {rows} result row(s) for the {ranges} range(s) the run opened{}, so rows cannot be matched to layers by position{}{}",
        unknown_ranges(.unknown),
        .hint,
        ncu_said(.warnings)
    )]
    CountMismatch {
        rows: usize,
        /// The ranges the run certainly opened (its counted and failed layers).
        ranges: usize,
        /// Failed layers that may or may not have opened a range, with why they failed.
        unknown: Vec<(String, String)>,
        /// What the mismatch suggests, for the replay mode in use.
        hint: String,
        /// ncu's `==WARNING==` lines (a range it refused says why there).
        warnings: Vec<String>,
    },
    /// The counts agree only if no layer of unknown range opened one, and also if one
    /// did while ncu skipped another range: which row is which layer is not settled.
    #[error(
        "ncu reported {rows} result row(s): as many as the ranges the run certainly opened, but {} failed where the run cannot tell whether it opened a range: if it did and ncu skipped another range, every row after would go to the wrong layer, so none is matched (run again without it: --layers)",
        unknown_layers(.unknown)
    )]
    Ambiguous {
        rows: usize,
        /// The failed layers of unknown range, with why they failed.
        unknown: Vec<(String, String)>,
    },
    /// A result row's `ID` is not a number, or the IDs are not in increasing order.
    #[error("line {line}: ncu's ID {id:?} is not a number above the previous row's")]
    BadId { line: usize, id: String },
    /// A result row names a kernel, not `range`: an export of kernel replay (one row per
    /// kernel), whose rows are no layer's range however many there are.
    #[error("line {line}: ncu's row names the kernel {kernel:?}, not a range{}", mismatch_hint(0, 0, true, *.replay))]
    KernelRows {
        line: usize,
        kernel: String,
        replay: Option<NcuReplay>,
    },
}

/// `DeepseekV2MoE (out of memory), …`
fn unknown_layers(unknown: &[(String, String)]) -> String {
    unknown
        .iter()
        .map(|(layer, error)| format!("{layer} ({error})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unknown_ranges(unknown: &[(String, String)]) -> String {
    if unknown.is_empty() {
        String::new()
    } else {
        format!(
            " (and perhaps one more for each of {}, which failed where the run cannot tell whether it opened one)",
            unknown_layers(unknown)
        )
    }
}

/// What `rows` result rows against `ranges` opened ranges suggest, under `replay` (`None`:
/// not known, a folder read with `--hardware-counters-from`); `per_kernel`: the rows name
/// kernels, not `range`.
fn mismatch_hint(
    rows: usize,
    ranges: usize,
    per_kernel: bool,
    replay: Option<NcuReplay>,
) -> String {
    let hint = if per_kernel {
        "the rows name kernels, not ranges: ncu ran in kernel replay, one row per kernel; run it with --replay-mode app-range (or range)"
    } else if rows > ranges {
        "more range rows than the run opened ranges: are ncu.csv and ranges.json from the same run?"
    } else {
        match replay {
            Some(NcuReplay::Range) => "in range replay ncu skips a range it cannot replay in place, e.g. one that allocates device memory or copies to the host; --ncu-replay app-range replays the whole program instead",
            Some(NcuReplay::AppRange) => "ncu skipped a range in app-range replay; its warnings below, if any, say why",
            Some(NcuReplay::Kernel) | None => "ncu skips a range it cannot replay (under --replay-mode range, e.g. one that allocates device memory)",
        }
    };
    format!(" ({hint})")
}

fn ncu_said(warnings: &[String]) -> String {
    if warnings.is_empty() {
        String::new()
    } else {
        format!("; ncu said: {}", warnings.join(" | "))
    }
}

/// Parses ncu's CSV as one result per row, each row its own range keyed by ncu's `ID`.
pub fn parse_range_results(text: &str) -> Result<NcuCsv, NcuCsvError> {
    NcuCsv::parse(text, &ParseOptions::ranges_from("ID"))
}

/// Attributes the result rows of `table` (parsed by [`parse_range_results`]) to the
/// layers of `list`, by position over every range the run opened: row i is range i, a
/// failed layer's row is passed over, and a layer that opened no range
/// ([`RangeEntry::NotOpened`]) takes none. A layer of unknown range
/// ([`RangeEntry::Unknown`]) counts as a range when the rows say every such layer opened
/// one; when they are as many as the other ranges, which row is which is not settled and
/// nothing is attributed. `replay` (`None`: not known) words the hint of a count that
/// does not match.
pub fn attribute(
    table: &NcuCsv,
    list: &RangeList,
    replay: Option<NcuReplay>,
) -> Result<Vec<AttributedRange>, AttributionError> {
    let rows = table.rows();
    // Rows of kernels are never ranges, even when they happen to be as many.
    if let Some((row, kernel)) = rows.iter().find_map(|row| {
        table
            .cell(row, "Kernel Name")
            .filter(|c| c.text() != "range")
            .map(|c| (row, c.text().to_string()))
    }) {
        return Err(AttributionError::KernelRows {
            line: row.line(),
            kernel,
            replay,
        });
    }
    let unknown: Vec<(String, String)> = list
        .layers
        .iter()
        .filter_map(|entry| match entry {
            RangeEntry::Unknown { layer, error } => Some((layer.clone(), error.clone())),
            _ => None,
        })
        .collect();
    let opened = list.layers.iter().filter(|e| e.opened()).count();
    // Every layer of unknown range opened one: the ranges are those of all the layers
    // but the ones that opened none.
    let ranges: Vec<&RangeEntry> = if rows.len() == opened + unknown.len() {
        list.layers
            .iter()
            .filter(|e| !matches!(e, RangeEntry::NotOpened { .. }))
            .collect()
    } else if rows.len() == opened {
        return Err(AttributionError::Ambiguous {
            rows: rows.len(),
            unknown,
        });
    } else {
        let warnings = table
            .notes()
            .iter()
            .filter(|n| n.kind == super::ncu_csv::NoteKind::Warning)
            .map(|n| n.text.clone())
            .collect();
        return Err(AttributionError::CountMismatch {
            rows: rows.len(),
            ranges: opened,
            hint: mismatch_hint(rows.len(), opened, false, replay),
            unknown,
            warnings,
        });
    };
    let mut previous: Option<u64> = None;
    let mut out = Vec::with_capacity(rows.len());
    for (index, (row, entry)) in rows.iter().zip(ranges).enumerate() {
        let id = row.range().unwrap_or("").to_string();
        let number = super::ncu_csv::whole_number(&id);
        match (number, previous) {
            (Some(n), Some(p)) if n > p => {}
            (Some(_), None) => {}
            _ => {
                return Err(AttributionError::BadId {
                    line: row.line(),
                    id,
                })
            }
        }
        previous = number;
        // A failed layer's row: its figures are no layer's.
        let RangeEntry::Counted(record) = entry else {
            continue;
        };
        let figures = HardwareFigures::of_range(table, Some(&id))?;
        out.push(AttributedRange {
            index,
            ncu_id: id,
            record: record.clone(),
            figures,
            time: TimeSpan::RangeElapsed,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range-replay export as ncu prints it: preamble, header, units, one row per range
    /// (two here), numbers with thousands separators, one metric the device lacks.
    const TWO_RANGES: &str = "\
==PROF== Connected to process 4242 (/repo/target/release/verify-decoder)
==PROF== Profiling \"range\": 0%....50%....100% - 9 passes
==PROF== Profiling \"range\": 0%....50%....100% - 9 passes
==PROF== Disconnected from process 4242
\"ID\",\"Process ID\",\"Process Name\",\"Host Name\",\"Kernel Name\",\"Context\",\"Stream\",\"dram__bytes_read.sum\",\"dram__bytes_write.sum\",\"gpu__time_duration.sum\",\"lts__t_bytes.sum\",\"sm__ops_path_tensor_src_bf16_dst_fp32.sum\",\"sm__ops_path_tensor_src_fp16_dst_fp32.sum\",\"sm__ops_path_tensor_src_tf32_dst_fp32.sum\",\"smsp__sass_thread_inst_executed_op_fadd_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fmul_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_dfma_pred_on.sum\"
\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"byte\",\"byte\",\"ns\",\"byte\",\"\",\"\",\"\",\"inst\",\"inst\",\"inst\",\"inst\"
\"0\",\"4242\",\"verify-decoder\",\"127.0.0.1\",\"range\",\"1\",\"\",\"88,595,456\",\"581,376\",\"67,360\",\"301,989,888\",\"27,262,976,000\",\"0\",\"0\",\"4,816,896\",\"35,061,760\",\"4,161,536\",\"n/a\"
\"1\",\"4242\",\"verify-decoder\",\"127.0.0.1\",\"range\",\"1\",\"\",\"6,667,776\",\"12,288\",\"36,992\",\"20,000,000\",\"0\",\"0\",\"0\",\"638,976\",\"42,237,952\",\"527,360\",\"n/a\"
";

    #[test]
    fn an_entry_says_why_it_has_no_figures() {
        let why = |entry: RangeEntry| entry.error().map(str::to_string);
        assert_eq!(why(RangeEntry::Counted(record("L", 1))), None);
        for entry in [
            RangeEntry::Failed {
                layer: "L".into(),
                error: "judged: 2 rows".into(),
            },
            RangeEntry::NotOpened {
                layer: "L".into(),
                error: "judged: 2 rows".into(),
            },
            RangeEntry::Unknown {
                layer: "L".into(),
                error: "judged: 2 rows".into(),
            },
        ] {
            assert_eq!(entry.layer(), "L");
            assert_eq!(why(entry), Some("judged: 2 rows".to_string()));
        }
    }

    fn record(layer: &str, tensor: u64) -> RangeRecord {
        RangeRecord {
            layer: layer.into(),
            tensor_core_flops: tensor,
            cuda_core_flops: 1,
            io_bytes: 1,
        }
    }

    fn list(layers: &[(&str, u64)]) -> RangeList {
        RangeList::new(
            "cuda:0".into(),
            layers
                .iter()
                .map(|(l, t)| RangeEntry::Counted(record(l, *t)))
                .collect(),
        )
    }

    fn attribute(
        table: &NcuCsv,
        list: &RangeList,
    ) -> Result<Vec<AttributedRange>, AttributionError> {
        super::attribute(table, list, Some(NcuReplay::AppRange))
    }

    #[test]
    fn two_ranges_go_to_two_layers_in_order() {
        let table = parse_range_results(TWO_RANGES).expect("parses");
        let list = list(&[("DeepseekV2MLP", 26_927_431_680), ("MoEGate", 0)]);
        let got = attribute(&table, &list).expect("attributed");
        assert_eq!(got.len(), 2);
        let (mlp, gate) = (&got[0], &got[1]);
        assert_eq!((mlp.index, mlp.ncu_id.as_str()), (0, "0"));
        assert_eq!(mlp.record.layer, "DeepseekV2MLP");
        assert_eq!(mlp.figures.rows, 1);
        assert_eq!(mlp.figures.tensor_ops_bf16, Some(27_262_976_000));
        assert_eq!(mlp.figures.tensor_ops(), Some(27_262_976_000));
        assert_eq!(mlp.figures.dram_bytes(), Some(88_595_456 + 581_376));
        assert_eq!(mlp.figures.l2_bytes, Some(301_989_888));
        assert_eq!(mlp.figures.time_ns, Some(67_360));
        // The device lacks the FP64 counter: unavailable, not 0; FP32 alone still counts.
        assert_eq!(mlp.figures.double_flops, None);
        assert_eq!(mlp.figures.simt_flops(), Some(79_101_952));
        assert_eq!(gate.record.layer, "MoEGate");
        assert_eq!(gate.figures.tensor_ops(), Some(0));
        assert_eq!(gate.figures.ffma, Some(42_237_952));
        assert_eq!(gate.figures.cuda_core_flops, Some(85_642_240));
    }

    #[test]
    fn a_missing_or_extra_range_attributes_nothing() {
        let table = parse_range_results(TWO_RANGES).expect("parses");
        let three = list(&[("A", 1), ("B", 1), ("C", 1)]);
        match attribute(&table, &three) {
            Err(AttributionError::CountMismatch {
                rows: 2,
                ranges: 3,
                warnings,
                ..
            }) => {
                assert!(warnings.is_empty())
            }
            other => panic!("{other:?}"),
        }
        let warned = TWO_RANGES.replacen(
            "==PROF== Disconnected",
            "==WARNING== Range 2 was not profiled: unsupported API call\n==PROF== Disconnected",
            1,
        );
        let table = parse_range_results(&warned).expect("parses");
        let message = attribute(&table, &three).unwrap_err().to_string();
        assert!(
            message.contains("2 result row(s) for the 3 range(s)"),
            "{message}"
        );
        assert!(message.contains("unsupported API call"), "{message}");
    }

    #[test]
    fn per_kernel_rows_are_not_taken_for_ranges() {
        // A kernel-replay export of one layer: 6 rows, not 1 range.
        let mlp = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
        let table = parse_range_results(mlp).expect("parses");
        let err = attribute(&table, &list(&[("DeepseekV2MLP", 1)])).unwrap_err();
        assert!(
            matches!(&err, AttributionError::KernelRows { kernel, .. } if kernel != "range"),
            "{err:?}"
        );
        assert!(err.to_string().contains("rows name kernels"), "{err}");
        assert!(err.to_string().contains("--replay-mode app-range"), "{err}");
        // As many kernel rows as ranges: still no layer's range (they once passed).
        let six = list(&[("A", 1), ("B", 1), ("C", 1), ("D", 1), ("E", 1), ("F", 1)]);
        let err = attribute(&table, &six).unwrap_err();
        assert!(
            matches!(err, AttributionError::KernelRows { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn ids_must_increase() {
        let swapped = TWO_RANGES.replacen("\"1\",\"4242\"", "\"0\",\"4242\"", 1);
        let table = parse_range_results(&swapped).expect("parses");
        assert!(matches!(
            attribute(&table, &list(&[("A", 1), ("B", 1)])),
            Err(AttributionError::BadId { .. })
        ));
        // An ID with a malformed thousands separator is not a number (not 1).
        let loose = TWO_RANGES.replacen("\"1\",\"4242\"", "\"0,001\",\"4242\"", 1);
        let table = parse_range_results(&loose).expect("parses");
        assert!(matches!(
            attribute(&table, &list(&[("A", 1), ("B", 1)])),
            Err(AttributionError::BadId { line: 8, .. })
        ));
    }

    /// Three ranges with distinct figures: bf16 tensor ops 100, 200, 300.
    const THREE_RANGES: &str = "\
\"ID\",\"Kernel Name\",\"gpu__time_duration.sum\",\"sm__ops_path_tensor_src_bf16_dst_fp32.sum\"
\"\",\"\",\"ns\",\"\"
\"0\",\"range\",\"10\",\"100\"
\"1\",\"range\",\"20\",\"200\"
\"2\",\"range\",\"30\",\"300\"
";

    fn failed(layer: &str) -> RangeEntry {
        RangeEntry::Failed {
            layer: layer.into(),
            error: "analytic model: routing".into(),
        }
    }

    fn not_opened(layer: &str) -> RangeEntry {
        RangeEntry::NotOpened {
            layer: layer.into(),
            error: "a test hook made it fail".into(),
        }
    }

    fn unknown(layer: &str) -> RangeEntry {
        RangeEntry::Unknown {
            layer: layer.into(),
            error: "out of memory".into(),
        }
    }

    /// Which layer got which row: (layer, row index, its bf16 tensor ops).
    fn rows_by_layer(got: &[AttributedRange]) -> Vec<(&str, usize, Option<u64>)> {
        got.iter()
            .map(|a| (a.record.layer.as_str(), a.index, a.figures.tensor_ops_bf16))
            .collect()
    }

    fn with(entries: Vec<RangeEntry>) -> RangeList {
        RangeList::new("cuda:0".into(), entries)
    }

    #[test]
    fn a_failed_layers_row_is_passed_over_not_given_to_the_next() {
        let table = parse_range_results(THREE_RANGES).expect("parses");
        // The middle layer failed after its range was opened; ncu recorded it.
        let list = with(vec![
            RangeEntry::Counted(record("A", 1)),
            failed("B"),
            RangeEntry::Counted(record("C", 1)),
        ]);
        let got = attribute(&table, &list).expect("attributed");
        assert_eq!(
            rows_by_layer(&got),
            [("A", 0, Some(100)), ("C", 2, Some(300))]
        );
        // ncu skipped a later range as well: the counts disagree, nothing is attributed
        // (matched over the layers that were judged, C would get the failed B's row).
        let two = THREE_RANGES.replacen("\"2\",\"range\",\"30\",\"300\"\n", "", 1);
        let table2 = parse_range_results(&two).expect("parses");
        let err = attribute(&table2, &list).unwrap_err();
        assert!(
            matches!(
                err,
                AttributionError::CountMismatch {
                    rows: 2,
                    ranges: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("app-range"), "{err}");
        assert!(!err.to_string().contains("kernel replay"), "{err}");
        // A layer that failed before its forward returned: with a row for every layer it
        // opened one, and the next layer still gets its own.
        let list = with(vec![
            RangeEntry::Counted(record("A", 1)),
            unknown("B"),
            RangeEntry::Counted(record("C", 1)),
        ]);
        let got = attribute(&table, &list).expect("attributed");
        assert_eq!(got[1].record.layer, "C");
        assert_eq!(got[1].figures.tensor_ops_bf16, Some(300));
        // With a row for each other layer only, it may have opened none, or one while ncu
        // skipped another: not settled, nothing attributed, and the message says so.
        let err = attribute(&table2, &list).unwrap_err();
        assert!(
            matches!(err, AttributionError::Ambiguous { rows: 2, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("B (out of memory)"), "{message}");
        assert!(message.contains("--layers"), "{message}");
        // Fewer still: a mismatch that names the layer of unknown range.
        let one = two.replacen("\"1\",\"range\",\"20\",\"200\"\n", "", 1);
        let table1 = parse_range_results(&one).expect("parses");
        let message = attribute(&table1, &list).unwrap_err().to_string();
        assert!(
            message.contains("perhaps one more for each of B"),
            "{message}"
        );
    }

    #[test]
    fn a_layer_that_opened_no_range_takes_no_row() {
        // The middle layer failed before its range: ncu has rows for the other two only,
        // and the last layer gets the second row, its own.
        let two = THREE_RANGES.replacen("\"2\",\"range\",\"30\",\"300\"\n", "", 1);
        let table = parse_range_results(&two).expect("parses");
        let list = with(vec![
            RangeEntry::Counted(record("A", 1)),
            not_opened("B"),
            RangeEntry::Counted(record("C", 1)),
        ]);
        let got = attribute(&table, &list).expect("attributed");
        let seen: Vec<(&str, usize, &str, Option<u64>)> = got
            .iter()
            .map(|a| {
                let id = a.ncu_id.as_str();
                (
                    a.record.layer.as_str(),
                    a.index,
                    id,
                    a.figures.tensor_ops_bf16,
                )
            })
            .collect();
        assert_eq!(seen, [("A", 0, "0", Some(100)), ("C", 1, "1", Some(200))]);
        // A row for it as well is one too many: not matched, not given to C.
        let table3 = parse_range_results(THREE_RANGES).expect("parses");
        let err = attribute(&table3, &list).unwrap_err();
        assert!(
            matches!(
                err,
                AttributionError::CountMismatch {
                    rows: 3,
                    ranges: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("same run"), "{err}");
        // Beside a layer of unknown range: the rows still settle it, counted over the
        // ranges that may have been opened.
        let list = with(vec![
            not_opened("A"),
            RangeEntry::Counted(record("B", 1)),
            unknown("C"),
            RangeEntry::Counted(record("D", 1)),
        ]);
        let got = attribute(&table3, &list).expect("attributed");
        assert_eq!(
            rows_by_layer(&got),
            [("B", 0, Some(100)), ("D", 2, Some(300))]
        );
        assert!(matches!(
            attribute(&parse_range_results(&two).unwrap(), &list),
            Err(AttributionError::Ambiguous { rows: 2, .. })
        ));
    }

    #[test]
    fn the_mismatch_hint_fits_the_replay_mode() {
        let table = parse_range_results(THREE_RANGES).expect("parses");
        let four = with(
            ["A", "B", "C", "D"]
                .map(|l| RangeEntry::Counted(record(l, 1)))
                .to_vec(),
        );
        let hint = |replay| {
            super::attribute(&table, &four, replay)
                .unwrap_err()
                .to_string()
        };
        assert!(hint(Some(NcuReplay::Range)).contains("replay in place"));
        assert!(hint(Some(NcuReplay::AppRange)).contains("skipped a range in app-range replay"));
        assert!(hint(None).contains("cannot replay"));
        for replay in [Some(NcuReplay::Range), Some(NcuReplay::AppRange), None] {
            assert!(!hint(replay).contains("kernel replay"), "{replay:?}");
        }
        // More range rows than ranges is no sign of kernel replay either.
        let two = with(
            ["A", "B"]
                .map(|l| RangeEntry::Counted(record(l, 1)))
                .to_vec(),
        );
        let message = super::attribute(&table, &two, Some(NcuReplay::AppRange))
            .unwrap_err()
            .to_string();
        assert!(message.contains("same run"), "{message}");
        assert!(!message.contains("kernel replay"), "{message}");
    }

    #[test]
    fn the_range_list_round_trips_and_checks_its_schema() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut l = list(&[("DeepseekV2MLP", 5)]);
        l.layers.push(RangeEntry::Failed {
            layer: "MoEGate".into(),
            error: "analytic model: no".into(),
        });
        l.layers.push(RangeEntry::Unknown {
            layer: "DeepseekV2MoE".into(),
            error: "out of memory".into(),
        });
        l.layers.push(not_opened("DeepseekV2RMSNorm"));
        l.write(&dir).unwrap();
        assert_eq!(RangeList::read(&dir).unwrap(), l);
        let text = std::fs::read_to_string(dir.join(RANGE_LIST_FILE)).unwrap();
        assert!(text.contains("\"range\": \"unknown\""), "{text}");
        assert!(text.contains("\"range\": \"not_opened\""), "{text}");
        // A list without the run's identity (written before it was recorded) reads as
        // one; with it, the identity comes back as written.
        assert!(!text.contains("\"run\""), "{text}");
        let with_run = l.clone().of_run(serde_json::json!({"seed": 7}));
        with_run.write(&dir).unwrap();
        let read = RangeList::read(&dir).unwrap();
        assert_eq!(read.run, Some(serde_json::json!({"seed": 7})));
        assert_eq!(read, with_run);
        assert!(text.contains(RANGE_LIST_SCHEMA), "{text}");
        // A list of the second schema: the same entries, none of them not_opened.
        let v2 = text.replace(RANGE_LIST_SCHEMA, RANGE_LIST_SCHEMA_V2);
        std::fs::write(dir.join(RANGE_LIST_FILE), &v2).unwrap();
        let why = RangeList::read(&dir).unwrap_err();
        assert!(
            why.contains("not_opened") && why.contains("DeepseekV2RMSNorm"),
            "{why}"
        );
        let v2 = v2.replacen("not_opened", "unknown", 1);
        std::fs::write(dir.join(RANGE_LIST_FILE), &v2).unwrap();
        let read = RangeList::read(&dir).unwrap();
        assert_eq!(read.schema, RANGE_LIST_SCHEMA);
        assert_eq!(read.layers[..3], l.layers[..3]);
        assert!(
            matches!(&read.layers[3], RangeEntry::Unknown { layer, .. } if layer == "DeepseekV2RMSNorm")
        );
        // A list of the first schema: read where the failed layers' places do not matter.
        let v1 = |ranges: &str, errors: &str| {
            std::fs::write(
                dir.join(RANGE_LIST_FILE),
                format!("{{\"schema\": \"{RANGE_LIST_SCHEMA_V1}\", \"device\": \"cuda:0\", \"ranges\": [{ranges}], \"errors\": [{errors}]}}"),
            )
            .unwrap();
            RangeList::read(&dir)
        };
        let mlp = r#"{"layer": "DeepseekV2MLP", "tensor_core_flops": 5, "cuda_core_flops": 1, "io_bytes": 1}"#;
        assert_eq!(v1(mlp, ""), Ok(list(&[("DeepseekV2MLP", 5)])));
        let failed = r#"["MoEGate", "out of memory"]"#;
        assert_eq!(
            v1("", failed).unwrap().layers,
            [RangeEntry::Unknown {
                layer: "MoEGate".into(),
                error: "out of memory".into()
            }]
        );
        let both = v1(mlp, failed).unwrap_err();
        assert!(both.contains("did not record where"), "{both}");
        l.schema = "other/1".into();
        l.write(&dir).unwrap();
        assert!(RangeList::read(&dir).unwrap_err().contains("expected"));
        tmp.close().unwrap();
        assert!(RangeList::read(&dir).unwrap_err().contains("cannot read"));
    }
}

//! Range bookkeeping: which profiler range is which layer.
//!
//! The profiled child (`--hardware-counters-child DIR`) runs each layer's counted forward
//! as one `cuProfilerStart`/`cuProfilerStop` range, in plan order, and writes the list of
//! layers it ran, with what the counter booked in that same forward, to `DIR/ranges.json`
//! ([`RangeList`]). Under `ncu --replay-mode range` each range is one result row of the
//! CSV, in the order the ranges ran (ncu's `ID` column). Ranges opened by the profiler API
//! carry no name a layer could be recognised by, so the rows are attributed by position:
//! the i-th result row is the i-th range ([`attribute`]); the counts must agree, or
//! nothing is attributed (a skipped or split range would shift every layer after it).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ncu_csv::{NcuCsv, NcuCsvError, ParseOptions};
use super::HardwareFigures;

/// The file the child writes in its folder.
pub const RANGE_LIST_FILE: &str = "ranges.json";
/// The file ncu writes its CSV to (`--log-file`) in the same folder.
pub const NCU_CSV_FILE: &str = "ncu.csv";
/// Schema tag of [`RangeList`].
pub const RANGE_LIST_SCHEMA: &str = "modelmeter.hardware-ranges/1";

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

/// What `DIR/ranges.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeList {
    /// [`RANGE_LIST_SCHEMA`].
    pub schema: String,
    /// The device the child ran on (`cuda:0`).
    pub device: String,
    /// The ranges, in the order they ran.
    pub ranges: Vec<RangeRecord>,
    /// Layers the child could not run (no range, or a range whose figures are not used),
    /// with the cause.
    pub errors: Vec<(String, String)>,
}

impl RangeList {
    /// A list for `device` with these ranges and errors.
    pub fn new(device: String, ranges: Vec<RangeRecord>, errors: Vec<(String, String)>) -> Self {
        RangeList {
            schema: RANGE_LIST_SCHEMA.to_string(),
            device,
            ranges,
            errors,
        }
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
        let list: RangeList = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a range list: {e}", path.display()))?;
        if list.schema != RANGE_LIST_SCHEMA {
            return Err(format!(
                "{} has schema {:?}, expected {RANGE_LIST_SCHEMA:?}",
                path.display(),
                list.schema
            ));
        }
        Ok(list)
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
    /// 0-based position of the range in the run.
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
        "ncu reported {rows} result row(s) for the {ranges} range(s) the run opened, so rows cannot be matched to layers by position{}{}",
        replay_hint(*.rows, *.ranges),
        ncu_said(.warnings)
    )]
    CountMismatch {
        rows: usize,
        ranges: usize,
        /// ncu's `==WARNING==` lines (a range it refused says why there).
        warnings: Vec<String>,
    },
    /// A result row's `ID` is not a number, or the IDs are not in increasing order.
    #[error("line {line}: ncu's ID {id:?} is not a number above the previous row's")]
    BadId { line: usize, id: String },
}

fn replay_hint(rows: usize, ranges: usize) -> &'static str {
    if rows > ranges {
        " (more rows than ranges: kernel replay gives one row per kernel; run ncu with --replay-mode range)"
    } else {
        " (ncu skips a range it cannot replay, e.g. one that allocates device memory)"
    }
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
/// ranges of `list`, by position: row i is range i.
pub fn attribute(
    table: &NcuCsv,
    list: &RangeList,
) -> Result<Vec<AttributedRange>, AttributionError> {
    let rows = table.rows();
    if rows.len() != list.ranges.len() {
        let warnings = table
            .notes()
            .iter()
            .filter(|n| n.kind == super::ncu_csv::NoteKind::Warning)
            .map(|n| n.text.clone())
            .collect();
        return Err(AttributionError::CountMismatch {
            rows: rows.len(),
            ranges: list.ranges.len(),
            warnings,
        });
    }
    let mut previous: Option<u64> = None;
    let mut out = Vec::with_capacity(rows.len());
    for (index, (row, record)) in rows.iter().zip(&list.ranges).enumerate() {
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
            layers.iter().map(|(l, t)| record(l, *t)).collect(),
            Vec::new(),
        )
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
        assert!(matches!(
            err,
            AttributionError::CountMismatch {
                rows: 6,
                ranges: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("--replay-mode range"), "{err}");
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

    #[test]
    fn the_range_list_round_trips_and_checks_its_schema() {
        let dir = std::env::temp_dir().join(format!("mm-ranges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut l = list(&[("DeepseekV2MLP", 5)]);
        l.errors.push(("MoEGate".into(), "out of memory".into()));
        l.write(&dir).unwrap();
        assert_eq!(RangeList::read(&dir).unwrap(), l);
        l.schema = "other/1".into();
        l.write(&dir).unwrap();
        assert!(RangeList::read(&dir).unwrap_err().contains("expected"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(RangeList::read(&dir).unwrap_err().contains("cannot read"));
    }
}

//! A parser for Nsight Compute's `ncu --csv --page raw` output.
//!
//! What ncu writes, and what this module makes of it:
//!
//! * **Preamble.** ncu's own lines (`==PROF== Connected to process …`, `==WARNING== …`) and
//!   whatever the profiled program printed come first. They are kept as [`Note`]s. A
//!   `==ERROR==` line anywhere makes [`parse`] fail with [`NcuCsvError::NcuReported`]:
//!   figures from a run that ncu says went wrong are not figures.
//! * **Header row.** The first line whose first field is `ID` (ncu quotes every field, so it
//!   starts `"ID",`). Column names must be unique.
//! * **Units row.** Right after the header, one unit per column (`byte`, `inst`, `ns`, …,
//!   empty for identity columns and plain counts). A header without one is an error.
//! * **Result rows.** One per kernel under kernel replay, one per range under range replay.
//!   Numbers carry thousands separators (`27,262,976,000`); cells are typed as [`Value`]s:
//!   exact integers where ncu gives integers, `f64` only where the value is fractional
//!   (`95,925.33`), text for the rest. An empty or `n/a` cell is [`Value::Unavailable`],
//!   never 0.
//!
//! Rows are attributed to ranges by a column the caller names ([`ParseOptions`]); rows with
//! no range (or every row, when no column is named) go to the `None` range. In ncu's
//! range-replay exports (`--replay-mode range` and `app-range`) the `Kernel Name` column
//! reads `range` on every row (ncu 2025.3.1 on an H200, the recorded runs in
//! `verify/tests/fixtures/h200-2026-11-28-hw/`): ranges opened by `cuProfilerStart`/`Stop`
//! carry no name. There, each row is one range and is told apart by its `ID`
//! ([`ParseOptions::ranges_from`]`("ID")`, as [`super::ranges::parse_range_results`] reads
//! them); which range is which layer is then a matter of order ([`super::ranges`]). Sums are per
//! metric per range, in checked arithmetic: an overflow is an error, and a metric that the
//! CSV does not have, or that some row lacks, is [`Total::Unavailable`] with the reason.
//!
//! Every malformed input gives an [`NcuCsvError`] naming the line (1-based, in the text as
//! given); no input makes the parser panic.

use std::collections::HashMap;

/// How to read a CSV: which column, if any, names the range a row belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// The column whose cell names a row's range. `None`: every row goes to the `None`
    /// range (per-kernel exports such as the H200 fixtures). A row whose cell is empty or
    /// `n/a` goes to the `None` range too.
    pub range_column: Option<String>,
}

impl ParseOptions {
    /// No range attribution: all rows are summed together under the `None` range.
    pub fn per_kernel() -> ParseOptions {
        ParseOptions { range_column: None }
    }

    /// Rows are attributed to ranges by the cell in `column`: `ID` for a range-replay
    /// export (one row per range, each with its own ID; `Kernel Name` reads `range` on
    /// every row there, so it tells no range apart), or an NVTX column beside per-kernel
    /// rows.
    pub fn ranges_from(column: impl Into<String>) -> ParseOptions {
        ParseOptions {
            range_column: Some(column.into()),
        }
    }
}

/// Why the CSV could not be read, or a figure could not be computed from it.
///
/// `line` fields are 1-based line numbers in the text given to [`parse`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NcuCsvError {
    /// ncu printed `==ERROR==` lines: the run went wrong, whatever rows it printed.
    #[error("ncu reported {} error(s): {}", .errors.len(), join_lines(.errors))]
    NcuReported {
        /// Each `==ERROR==` line with its line number.
        errors: Vec<(usize, String)>,
    },
    /// No line starts the table (`"ID",…`): ncu profiled nothing or the text is not its CSV.
    #[error(
        "no ncu CSV header (a line starting with \"ID\",) in {lines} line(s){}",
        ncu_said(.warnings)
    )]
    NoHeader {
        /// Lines in the text.
        lines: usize,
        /// ncu's `==WARNING==` lines, which usually say why (e.g. no kernels were profiled).
        warnings: Vec<(usize, String)>,
    },
    /// The header is the last row, or the row after it is a result (its `ID` is not empty).
    #[error(
        "line {line}: the header is not followed by a units row (ncu --page raw prints one \
         between the header and the first result)"
    )]
    MissingUnitsRow {
        /// The header's line.
        line: usize,
    },
    /// A row has more or fewer cells than the header.
    #[error("line {line}: {found} cell(s), but the header has {expected} column(s)")]
    WrongCellCount {
        line: usize,
        expected: usize,
        found: usize,
    },
    /// Two header columns share a name, so a metric would be ambiguous.
    #[error("line {line}: column {name:?} appears more than once in the header")]
    DuplicateColumn { line: usize, name: String },
    /// The CSV reader itself failed (it is lenient, so this is rare).
    #[error("line {line}: unreadable CSV: {message}")]
    Csv { line: usize, message: String },
    /// The options name a range column that the header does not have.
    #[error("the range column {column:?} is not in the CSV header")]
    RangeColumnMissing { column: String },
    /// A total was asked for a range that no row belongs to.
    #[error("no row belongs to the range {}", range_label(.range))]
    UnknownRange { range: Option<String> },
    /// A cell of a metric being summed is not what the sum needs.
    #[error("line {line}, column {column:?}: {text:?} is not {expected}")]
    BadValue {
        line: usize,
        column: String,
        text: String,
        expected: &'static str,
    },
    /// A sum does not fit the integer type (or, for fractional metrics, is not finite).
    #[error("the sum of {column:?} over the range {} overflows", range_label(.range))]
    Overflow {
        column: String,
        range: Option<String>,
    },
    /// A metric's unit is not one this figure can be read in (e.g. `Mbyte` where bytes are
    /// expected: run ncu with `--print-units base`).
    #[error("column {column:?} is in {unit:?}, expected {expected}")]
    UnexpectedUnit {
        column: String,
        unit: String,
        expected: &'static str,
    },
}

fn ncu_said(warnings: &[(usize, String)]) -> String {
    if warnings.is_empty() {
        String::new()
    } else {
        format!("; ncu said: {}", join_lines(warnings))
    }
}

fn join_lines(lines: &[(usize, String)]) -> String {
    lines
        .iter()
        .map(|(line, text)| format!("line {line}: {text}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a range is shown in messages: its name, or `(no range)`.
fn range_label(range: &Option<String>) -> String {
    match range {
        Some(name) => format!("{name:?}"),
        None => "(no range)".to_string(),
    }
}

/// Who wrote a line of the preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// `==PROF==`: ncu's progress (connected, disconnected, profiling a kernel).
    Prof,
    /// `==WARNING==`: ncu's warnings (e.g. unlocked clocks, no kernels profiled).
    Warning,
    /// `==ERROR==`: never in a parsed table (they make [`parse`] fail), listed for
    /// completeness.
    Error,
    /// Another `==TAG==` line from ncu (e.g. `==INFO==`).
    OtherNcu,
    /// A line the profiled program printed.
    Program,
}

/// A line outside the table, kept so that a report can show what ncu said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// 1-based line number.
    pub line: usize,
    pub kind: NoteKind,
    /// The whole line, without its line ending.
    pub text: String,
}

/// A header column and its unit from the units row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The metric or attribute name, e.g. `gpu__time_duration.sum` or `Kernel Name`.
    pub name: String,
    /// The unit as ncu prints it (`byte`, `inst`, `ns`, `%`, …); empty for plain counts and
    /// identity columns.
    pub unit: String,
}

/// A cell's typed value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// Empty or `n/a`: ncu has no value. Never read as 0.
    Unavailable,
    /// A non-negative whole number, thousands separators removed: exact.
    Integer(u64),
    /// A number with a fractional part (`95,925.33`), a negative number, or a whole number
    /// too large for `u64`.
    Real(f64),
    /// Anything else (`(384, 1, 1)`, `PolicySpread`, a kernel's name); the text is in
    /// [`Cell::text`].
    Text,
}

/// One cell: the text as ncu wrote it and its typed value.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    text: String,
    value: Value,
}

impl Cell {
    fn new(text: &str) -> Cell {
        Cell {
            value: classify(text),
            text: text.to_string(),
        }
    }

    /// The cell as written (thousands separators included).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The typed value.
    pub fn value(&self) -> Value {
        self.value
    }
}

/// One result row: a kernel under kernel replay, a range under range replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    line: usize,
    range: Option<String>,
    cells: Vec<Cell>,
}

impl Row {
    /// The row's 1-based line number.
    pub fn line(&self) -> usize {
        self.line
    }

    /// The range the row is attributed to; `None` when it has none.
    pub fn range(&self) -> Option<&str> {
        self.range.as_deref()
    }

    /// The cells, in header order.
    pub fn cells(&self) -> &[Cell] {
        &self.cells
    }
}

/// A range and the rows attributed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    name: Option<String>,
    rows: Vec<usize>,
}

impl Range {
    /// The range's name; `None` for rows with no range.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Indices into [`NcuCsv::rows`], in file order.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }
}

/// Why a total has no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The CSV has no such column: ncu did not collect the metric (not asked for, or the
    /// device lacks it).
    NotCollected,
    /// The column exists, but `rows` of the range's rows have an empty or `n/a` cell.
    MissingCells { rows: usize },
}

/// A metric summed over a range's rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Total {
    /// Every cell was an exact integer: their exact sum.
    Integer(u64),
    /// Some cell was fractional: the `f64` sum.
    Real(f64),
    /// No sum can honestly be given.
    Unavailable(Unavailable),
}

/// A parsed `ncu --csv --page raw` export.
#[derive(Clone, Debug, PartialEq)]
pub struct NcuCsv {
    notes: Vec<Note>,
    header_line: usize,
    columns: Vec<Column>,
    column_index: HashMap<String, usize>,
    rows: Vec<Row>,
    ranges: Vec<Range>,
    range_column: Option<String>,
}

/// Parses ncu's CSV text (see the module documentation for the format).
pub fn parse(text: &str, options: &ParseOptions) -> Result<NcuCsv, NcuCsvError> {
    NcuCsv::parse(text, options)
}

impl NcuCsv {
    /// Parses ncu's CSV text (see the module documentation for the format).
    pub fn parse(text: &str, options: &ParseOptions) -> Result<NcuCsv, NcuCsvError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let lines: Vec<&str> = text.lines().collect();

        // ncu's own lines may stand anywhere; the table starts at the first header line.
        let mut notes = Vec::new();
        let mut errors = Vec::new();
        let mut header_at = None;
        let mut table_lines = Vec::new(); // (1-based line number, text)
        for (index, line) in lines.iter().enumerate() {
            let number = index + 1;
            if let Some(kind) = ncu_tag(line) {
                if kind == NoteKind::Error {
                    errors.push((number, line.to_string()));
                }
                notes.push(Note {
                    line: number,
                    kind,
                    text: line.to_string(),
                });
            } else if line.trim().is_empty() {
                // Blank lines say nothing (and would shift the CSV reader's line count).
            } else if header_at.is_some() {
                table_lines.push((number, *line));
            } else if is_header(line) {
                header_at = Some(number);
                table_lines.push((number, *line));
            } else {
                notes.push(Note {
                    line: number,
                    kind: NoteKind::Program,
                    text: line.to_string(),
                });
            }
        }
        if !errors.is_empty() {
            return Err(NcuCsvError::NcuReported { errors });
        }
        let Some(header_line) = header_at else {
            let warnings = notes
                .iter()
                .filter(|n| n.kind == NoteKind::Warning)
                .map(|n| (n.line, n.text.clone()))
                .collect();
            return Err(NcuCsvError::NoHeader {
                lines: lines.len(),
                warnings,
            });
        };

        let records = read_records(&table_lines)?;
        let mut records = records.into_iter();
        let Some((_, header)) = records.next() else {
            return Err(NcuCsvError::MissingUnitsRow { line: header_line });
        };
        let mut column_index = HashMap::with_capacity(header.len());
        for (i, name) in header.iter().enumerate() {
            if column_index.insert(name.clone(), i).is_some() {
                return Err(NcuCsvError::DuplicateColumn {
                    line: header_line,
                    name: name.clone(),
                });
            }
        }
        let width = header.len();

        let (units_line, units) = match records.next() {
            Some((line, units)) if units.first().is_some_and(|id| id.trim().is_empty()) => {
                (line, units)
            }
            _ => return Err(NcuCsvError::MissingUnitsRow { line: header_line }),
        };
        check_width(units_line, width, units.len())?;
        let columns: Vec<Column> = header
            .into_iter()
            .zip(units)
            .map(|(name, unit)| Column { name, unit })
            .collect();

        let range_at = match &options.range_column {
            None => None,
            Some(column) => match column_index.get(column) {
                Some(&at) => Some(at),
                None => {
                    return Err(NcuCsvError::RangeColumnMissing {
                        column: column.clone(),
                    })
                }
            },
        };

        let mut rows = Vec::new();
        let mut ranges: Vec<Range> = Vec::new();
        let mut range_of_name: HashMap<Option<String>, usize> = HashMap::new();
        for (line, record) in records {
            check_width(line, width, record.len())?;
            let range = range_at
                .and_then(|i| record.get(i))
                .map(|cell| cell.trim())
                .filter(|name| !name.is_empty() && !name.eq_ignore_ascii_case("n/a"))
                .map(str::to_string);
            let slot = *range_of_name.entry(range.clone()).or_insert_with(|| {
                ranges.push(Range {
                    name: range.clone(),
                    rows: Vec::new(),
                });
                ranges.len() - 1
            });
            if let Some(r) = ranges.get_mut(slot) {
                r.rows.push(rows.len());
            }
            rows.push(Row {
                line,
                range,
                cells: record.iter().map(|text| Cell::new(text)).collect(),
            });
        }

        Ok(NcuCsv {
            notes,
            header_line,
            columns,
            column_index,
            rows,
            ranges,
            range_column: options.range_column.clone(),
        })
    }

    /// The lines outside the table: ncu's `==PROF==`/`==WARNING==` lines and the program's
    /// output, in file order.
    pub fn notes(&self) -> &[Note] {
        &self.notes
    }

    /// The header's 1-based line number.
    pub fn header_line(&self) -> usize {
        self.header_line
    }

    /// The columns in header order, with their units.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The column called `name`, if the CSV has it.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.column_index
            .get(name)
            .and_then(|&i| self.columns.get(i))
    }

    /// The result rows in file order.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The cell of `row` in column `name`, if the CSV has that column.
    pub fn cell<'a>(&self, row: &'a Row, name: &str) -> Option<&'a Cell> {
        self.column_index.get(name).and_then(|&i| row.cells.get(i))
    }

    /// The column rows were attributed to ranges by, as given in [`ParseOptions`].
    pub fn range_column(&self) -> Option<&str> {
        self.range_column.as_deref()
    }

    /// The ranges in order of their first row; the `None` range is listed where its first
    /// row is, and only if some row has no range.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// The range called `name` (`None`: the rows with no range).
    pub fn range(&self, name: Option<&str>) -> Result<&Range, NcuCsvError> {
        self.ranges
            .iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| NcuCsvError::UnknownRange {
                range: name.map(str::to_string),
            })
    }

    /// `metric` summed over the rows of range `range`.
    ///
    /// Exact integers add up exactly (checked: overflow is an error); if any cell is
    /// fractional the sum is an `f64`. A metric not in the CSV, or missing from any of the
    /// range's rows, is [`Total::Unavailable`]. A text cell is an error naming its line.
    pub fn total(&self, range: Option<&str>, metric: &str) -> Result<Total, NcuCsvError> {
        let rows = self.range(range)?;
        let Some(&at) = self.column_index.get(metric) else {
            return Ok(Total::Unavailable(Unavailable::NotCollected));
        };
        let overflow = || NcuCsvError::Overflow {
            column: metric.to_string(),
            range: range.map(str::to_string),
        };
        let mut integer: Option<u64> = Some(0);
        let mut real = 0.0_f64;
        let mut missing = 0;
        for row in self.rows_of(rows) {
            let cell = row.cells.get(at);
            match cell.map(Cell::value).unwrap_or(Value::Unavailable) {
                Value::Unavailable => missing += 1,
                Value::Integer(n) => {
                    if let Some(sum) = integer {
                        integer = Some(sum.checked_add(n).ok_or_else(overflow)?);
                    }
                    real += n as f64;
                }
                Value::Real(x) => {
                    integer = None;
                    real += x;
                }
                Value::Text => return Err(bad_value(row, metric, cell, "a number")),
            }
        }
        if missing > 0 {
            return Ok(Total::Unavailable(Unavailable::MissingCells {
                rows: missing,
            }));
        }
        match integer {
            Some(sum) => Ok(Total::Integer(sum)),
            None if real.is_finite() => Ok(Total::Real(real)),
            None => Err(overflow()),
        }
    }

    /// `metric` summed over range `range` as an exact count: `None` when unavailable (see
    /// [`NcuCsv::total`]), an error naming the line when a cell is not a whole number.
    pub fn total_count(
        &self,
        range: Option<&str>,
        metric: &str,
    ) -> Result<Option<u64>, NcuCsvError> {
        match self.total(range, metric)? {
            Total::Integer(sum) => Ok(Some(sum)),
            Total::Unavailable(_) => Ok(None),
            Total::Real(_) => {
                let rows = self.range(range)?;
                // A cell read as real because its whole number is past u64 is an
                // overflow, not a fraction.
                let first_fraction = self.rows_of(rows).find_map(|row| {
                    let cell = self.cell(row, metric)?;
                    let fraction = matches!(cell.value(), Value::Real(_)) && !is_whole(cell.text());
                    fraction.then_some((row, cell))
                });
                Err(match first_fraction {
                    Some((row, cell)) => bad_value(row, metric, Some(cell), "a whole number"),
                    None => NcuCsvError::Overflow {
                        column: metric.to_string(),
                        range: range.map(str::to_string),
                    },
                })
            }
        }
    }

    /// A duration metric (e.g. `gpu__time_duration.sum`) summed over range `range` in whole
    /// nanoseconds, converted with the column's unit from the units row (`ns`, `us`, `ms`,
    /// `s`, or ncu's older `nsecond`, `usecond`, `msecond`, `second`).
    ///
    /// Each cell is converted exactly from its decimal text (`6.56` usecond is 6,560 ns);
    /// digits below a nanosecond, which ncu's timer does not resolve, are rounded half up.
    /// `None` when unavailable; an unknown unit or a cell that is not a non-negative number
    /// is an error.
    pub fn total_nanoseconds(
        &self,
        range: Option<&str>,
        metric: &str,
    ) -> Result<Option<u64>, NcuCsvError> {
        let rows = self.range(range)?;
        let Some(column) = self.column(metric) else {
            return Ok(None);
        };
        let Some(scale) = nanoseconds_per_unit(&column.unit) else {
            return Err(NcuCsvError::UnexpectedUnit {
                column: metric.to_string(),
                unit: column.unit.clone(),
                expected: "a time unit (ns, us, ms, s, nsecond, usecond, msecond, second)",
            });
        };
        let mut sum: u64 = 0;
        let mut missing = false;
        for row in self.rows_of(rows) {
            let cell = self.cell(row, metric);
            match cell.map(Cell::value).unwrap_or(Value::Unavailable) {
                Value::Unavailable => missing = true,
                _ => {
                    let text = cell.map(Cell::text).unwrap_or("");
                    let ns = scaled_decimal(text, scale)
                        .ok_or_else(|| bad_value(row, metric, cell, "a non-negative duration"))?;
                    sum = sum.checked_add(ns).ok_or_else(|| NcuCsvError::Overflow {
                        column: metric.to_string(),
                        range: range.map(str::to_string),
                    })?;
                }
            }
        }
        Ok(if missing { None } else { Some(sum) })
    }

    fn rows_of<'a>(&'a self, range: &'a Range) -> impl Iterator<Item = &'a Row> + 'a {
        range.rows.iter().filter_map(|&i| self.rows.get(i))
    }
}

fn bad_value(row: &Row, column: &str, cell: Option<&Cell>, expected: &'static str) -> NcuCsvError {
    NcuCsvError::BadValue {
        line: row.line,
        column: column.to_string(),
        text: cell.map(Cell::text).unwrap_or("").to_string(),
        expected,
    }
}

fn check_width(line: usize, expected: usize, found: usize) -> Result<(), NcuCsvError> {
    if found == expected {
        Ok(())
    } else {
        Err(NcuCsvError::WrongCellCount {
            line,
            expected,
            found,
        })
    }
}

/// `Some(kind)` for a line ncu wrote itself: `==TAG==…`.
fn ncu_tag(line: &str) -> Option<NoteKind> {
    let rest = line.strip_prefix("==")?;
    let end = rest.find("==")?;
    let tag = rest.get(..end)?;
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(match tag {
        "PROF" => NoteKind::Prof,
        "WARNING" => NoteKind::Warning,
        "ERROR" => NoteKind::Error,
        _ => NoteKind::OtherNcu,
    })
}

/// The header is the first line whose first field is `ID`.
/// Whether `line` is the header of ncu's table (its first column is `ID`, quoted or not).
pub(crate) fn is_header(line: &str) -> bool {
    line.starts_with("\"ID\",") || line == "\"ID\"" || line.starts_with("ID,")
}

/// Reads the table's lines (header onward, ncu's own lines taken out) with the `csv`
/// crate, each record with the line it starts on in the original text.
fn read_records(lines: &[(usize, &str)]) -> Result<Vec<(usize, Vec<String>)>, NcuCsvError> {
    let mut joined = String::new();
    for (_, line) in lines {
        joined.push_str(line);
        joined.push('\n');
    }
    let original_line = |csv_line: u64| -> usize {
        usize::try_from(csv_line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|i| lines.get(i))
            .map(|(number, _)| *number)
            .unwrap_or(0)
    };
    // A quoted field still open at the end: the file was cut short (the csv reader would
    // take the rest as one field). Doubled quotes inside a field keep the count even.
    if joined.matches('"').count() % 2 == 1 {
        return Err(NcuCsvError::Csv {
            line: lines.last().map_or(0, |(number, _)| *number),
            message: "a quoted field is not closed: the file ends inside it (truncated?)".into(),
        });
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(joined.as_bytes());
    let mut records = Vec::new();
    for result in reader.records() {
        match result {
            Ok(record) => {
                let line = original_line(record.position().map_or(0, |p| p.line()));
                records.push((line, record.iter().map(str::to_string).collect()));
            }
            Err(error) => {
                let line = original_line(error.position().map_or(0, |p| p.line()));
                return Err(NcuCsvError::Csv {
                    line,
                    message: error.to_string(),
                });
            }
        }
    }
    Ok(records)
}

/// `text` as an exact whole number the way ncu prints one (thousands separators well
/// formed, see [`Value::Integer`]); `None` for anything else.
pub fn whole_number(text: &str) -> Option<u64> {
    match classify(text) {
        Value::Integer(n) => Some(n),
        _ => None,
    }
}

/// Whether `text` is a non-negative whole number as ncu prints one, of any size.
fn is_whole(text: &str) -> bool {
    Decimal::parse(text.trim()).is_some_and(|d| !d.negative && d.fraction.is_empty())
}

/// Types a cell: see [`Value`].
fn classify(text: &str) -> Value {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("n/a") {
        return Value::Unavailable;
    }
    let Some(number) = Decimal::parse(t) else {
        return Value::Text;
    };
    if !number.negative && number.fraction.is_empty() {
        if let Ok(n) = number.whole.parse::<u64>() {
            return Value::Integer(n);
        }
    }
    match number.plain().parse::<f64>() {
        Ok(x) if x.is_finite() => Value::Real(x),
        _ => Value::Text,
    }
}

/// A decimal number as ncu prints it: optional `-`, digits with optional thousands
/// separators, optional `.` and digits. Grouping must be well formed: a first group of
/// one to three digits that does not start with 0, then groups of exactly three. Anything
/// else is not read as a number: in a decimal-comma locale `0,123` means 0.123, so
/// dropping its comma would misread it by a factor of 1,000, and `00,123` or `0,000,001`
/// are no thousands grouping any locale prints.
struct Decimal {
    negative: bool,
    /// The whole part's digits, separators removed.
    whole: String,
    /// The fractional part's digits (empty when there is none).
    fraction: String,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole_text, fraction) = match unsigned.split_once('.') {
            Some((w, f)) => (w, f),
            None => (unsigned, ""),
        };
        if unsigned.contains('.') && (fraction.is_empty() || !all_digits(fraction)) {
            return None;
        }
        let mut groups = whole_text.split(',');
        let first = groups.next()?;
        if first.is_empty() || !all_digits(first) {
            return None;
        }
        let mut whole = first.to_string();
        let mut grouped = false;
        for group in groups {
            if group.len() != 3 || !all_digits(group) {
                return None;
            }
            grouped = true;
            whole.push_str(group);
        }
        if grouped && (first.len() > 3 || first.starts_with('0')) {
            return None;
        }
        Some(Decimal {
            negative,
            whole,
            fraction: fraction.to_string(),
        })
    }

    /// The number without separators, for `f64` parsing.
    fn plain(&self) -> String {
        let sign = if self.negative { "-" } else { "" };
        if self.fraction.is_empty() {
            format!("{sign}{}", self.whole)
        } else {
            format!("{sign}{}.{}", self.whole, self.fraction)
        }
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Nanoseconds in one `unit` of ncu's time units.
fn nanoseconds_per_unit(unit: &str) -> Option<u32> {
    match unit.trim() {
        "ns" | "nsecond" => Some(0),
        "us" | "usecond" => Some(3),
        "ms" | "msecond" => Some(6),
        "s" | "second" => Some(9),
        _ => None,
    }
}

/// `text` (a non-negative decimal) × 10^`exponent`, rounded half up to a whole number,
/// exactly; `None` for anything else or on overflow.
fn scaled_decimal(text: &str, exponent: u32) -> Option<u64> {
    let number = Decimal::parse(text.trim())?;
    if number.negative {
        return None;
    }
    let exponent = usize::try_from(exponent).ok()?;
    let mut value: u128 = 0;
    for digit in number.whole.bytes() {
        value = value
            .checked_mul(10)?
            .checked_add(u128::from(digit - b'0'))?;
    }
    let mut fraction = number.fraction.bytes();
    for _ in 0..exponent {
        let digit = fraction.next().map_or(0, |d| d - b'0');
        value = value.checked_mul(10)?.checked_add(u128::from(digit))?;
    }
    if fraction.next().is_some_and(|d| d >= b'5') {
        value = value.checked_add(1)?;
    }
    u64::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLP: &str = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
    const GATE_BF16: &str = include_str!("../../../fixtures/ncu-h200/ncu_gate_bfloat16.csv");
    const GATE_FP32: &str = include_str!("../../../fixtures/ncu-h200/ncu_gate_float32.csv");
    const ATTN: &str = include_str!("../../../fixtures/ncu-h200/ncu_attn_bfloat16.csv");
    const FIXTURES: [(&str, &str); 4] = [
        ("mlp", MLP),
        ("gate bf16", GATE_BF16),
        ("gate fp32", GATE_FP32),
        ("attn", ATTN),
    ];

    const BF16: &str = "sm__ops_path_tensor_src_bf16_dst_fp32.sum";
    const TF32: &str = "sm__ops_path_tensor_src_tf32_dst_fp32.sum";
    const FFMA: &str = "sm__sass_thread_inst_executed_op_ffma_pred_on.sum";
    const FADD: &str = "sm__sass_thread_inst_executed_op_fadd_pred_on.sum";
    const FMUL: &str = "sm__sass_thread_inst_executed_op_fmul_pred_on.sum";
    const TIME: &str = "gpu__time_duration.sum";

    fn per_kernel(text: &str) -> NcuCsv {
        parse(text, &ParseOptions::per_kernel()).expect("fixture parses")
    }

    fn count(table: &NcuCsv, metric: &str) -> Option<u64> {
        table.total_count(None, metric).expect("sums")
    }

    #[test]
    fn fixture_sums_match_the_shared_readme() {
        // The figures fixtures/ncu-h200/README.md gives, to the unit.
        let mlp = per_kernel(MLP);
        assert_eq!(count(&mlp, BF16), Some(27_262_976_000));
        assert_eq!(count(&mlp, FFMA), Some(35_061_760));
        for gate in [GATE_BF16, GATE_FP32] {
            let gate = per_kernel(gate);
            assert_eq!(count(&gate, BF16), Some(0));
            assert_eq!(count(&gate, FFMA), Some(42_237_952));
        }
        let attn = per_kernel(ATTN);
        assert_eq!(count(&attn, BF16), Some(7_549_747_200));
        assert_eq!(count(&attn, FFMA), Some(1_361_920));
    }

    #[test]
    fn every_sum_in_the_fixtures_readme_is_what_the_parser_reads() {
        // fixtures/ncu-h200/README.md is the one place these figures are written: each
        // row of its table, every column, against the parsed file it names.
        const README: &str = include_str!("../../../fixtures/ncu-h200/README.md");
        let number = |cell: &str| -> u64 {
            let digits: String = cell.chars().filter(char::is_ascii_digit).collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("a number: {cell:?}"))
        };
        let mut rows = 0;
        for line in README.lines().filter(|l| l.starts_with("| `ncu_")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let file = cells[1].trim_matches('`');
            let text = match file {
                "ncu_mlp_bfloat16.csv" => MLP,
                "ncu_gate_bfloat16.csv" => GATE_BF16,
                "ncu_gate_float32.csv" => GATE_FP32,
                "ncu_attn_bfloat16.csv" => ATTN,
                other => panic!("the README names {other}, which is not a fixture"),
            };
            let t = per_kernel(text);
            let kernels = t.rows().len() as u64;
            assert!(cells[2].contains(&format!("({kernels} kernels)")), "{line}");
            let (ffma, fadd, fmul) = (count(&t, FFMA), count(&t, FADD), count(&t, FMUL));
            let expected = [
                count(&t, BF16),
                ffma,
                fadd,
                fmul,
                Some(2 * ffma.unwrap() + fadd.unwrap() + fmul.unwrap()),
                count(&t, "dram__bytes_read.sum"),
                t.total_nanoseconds(None, TIME).unwrap(),
            ];
            let written: Vec<Option<u64>> = cells[3..10].iter().map(|c| Some(number(c))).collect();
            assert_eq!(written, expected, "{file}");
            rows += 1;
        }
        assert_eq!(rows, 4, "one row per fixture");
    }

    #[test]
    fn fixture_other_sums_and_shape() {
        // Sums computed independently (Python's csv module) from the same files.
        let mlp = per_kernel(MLP);
        assert_eq!(mlp.rows().len(), 6);
        assert_eq!(mlp.columns().len(), 298);
        assert_eq!(mlp.header_line(), 5);
        assert_eq!(count(&mlp, TF32), Some(0));
        assert_eq!(count(&mlp, FADD), Some(4_816_896));
        assert_eq!(count(&mlp, FMUL), Some(4_161_536));
        assert_eq!(count(&mlp, "dram__bytes_read.sum"), Some(88_595_456));
        assert_eq!(count(&mlp, "dram__bytes_write.sum"), Some(581_376));
        assert_eq!(mlp.total_nanoseconds(None, TIME), Ok(Some(67_360)));
        assert_eq!(mlp.column(TIME).map(|c| c.unit.as_str()), Some("ns"));

        let attn = per_kernel(ATTN);
        assert_eq!(attn.rows().len(), 15);
        assert_eq!(attn.total_nanoseconds(None, TIME), Ok(Some(90_784)));
        assert_eq!(count(&attn, "dram__bytes_read.sum"), Some(37_535_488));
        assert_eq!(per_kernel(GATE_BF16).rows().len(), 7);
        assert_eq!(per_kernel(GATE_FP32).rows().len(), 5);
    }

    #[test]
    fn fixture_cells_are_typed() {
        let mlp = per_kernel(MLP);
        let first = &mlp.rows()[0];
        assert_eq!(first.line(), 7);
        let cell = |name: &str| mlp.cell(first, name).expect("column").clone();
        assert_eq!(cell(BF16).value(), Value::Integer(9_101_639_680));
        assert_eq!(cell(BF16).text(), "9,101,639,680");
        assert_eq!(
            cell("sm__ops_path_tensor_src_bf16_dst_fp32.avg").value(),
            Value::Real(68_951_815.76)
        );
        assert_eq!(cell("Block Size").value(), Value::Text);
        assert_eq!(cell("Block Size").text(), "(384, 1, 1)");
        assert_eq!(cell("launch__kernel_name").value(), Value::Unavailable);
        assert_eq!(
            cell("Kernel Name").text(),
            "nvjet_sm90_tst_112x128_64x7_2x1_v_bz_TNN"
        );
        // A fractional column sums as f64.
        assert!(matches!(
            mlp.total(None, "dram__bytes_read.avg"),
            Ok(Total::Real(x)) if (x - 1_845_738.67).abs() < 0.01
        ));
    }

    #[test]
    fn fixture_preamble_is_kept_as_notes() {
        let mlp = per_kernel(MLP);
        let kinds: Vec<NoteKind> = mlp.notes().iter().map(|n| n.kind).collect();
        assert_eq!(
            kinds,
            [
                NoteKind::Warning,
                NoteKind::Prof,
                NoteKind::Program,
                NoteKind::Prof
            ]
        );
        assert_eq!(mlp.notes()[2].text, "done mlp bfloat16");
        assert_eq!(mlp.notes()[2].line, 3);
        // Per-kernel exports: every row is in the one `None` range.
        assert_eq!(mlp.ranges().len(), 1);
        assert_eq!(mlp.ranges()[0].name(), None);
        assert_eq!(mlp.ranges()[0].rows(), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_metric_the_csv_lacks_is_unavailable_not_zero() {
        let mlp = per_kernel(MLP);
        let fp16 = "sm__ops_path_tensor_src_fp16_dst_fp32.sum";
        assert_eq!(
            mlp.total(None, fp16),
            Ok(Total::Unavailable(Unavailable::NotCollected))
        );
        assert_eq!(mlp.total_count(None, fp16), Ok(None));
        assert_eq!(
            mlp.total_nanoseconds(None, "gpu__time_missing.sum"),
            Ok(None)
        );
    }

    /// A small CSV in ncu's layout. `rows` are (ID, range cell, ops, ns) with the cells as
    /// written.
    fn synthetic(rows: &[(&str, &str, &str, &str)]) -> String {
        let mut text = String::from(
            "==PROF== Connected to process 1 (/usr/bin/python3)\n\
             layer output\n\
             ==PROF== Disconnected from process 1\n\
             \"ID\",\"Kernel Name\",\"NVTX Range\",\"ops.sum\",\"gpu__time_duration.sum\"\n\
             \"\",\"\",\"\",\"\",\"usecond\"\n",
        );
        for (id, range, ops, ns) in rows {
            text.push_str(&format!(
                "\"{id}\",\"kernel {id}\",\"{range}\",\"{ops}\",\"{ns}\"\n"
            ));
        }
        text
    }

    #[test]
    fn two_ranges_and_rows_with_no_range() {
        let text = synthetic(&[
            ("0", "", "5", "1.00"),
            ("1", "layer.0", "1,000", "2.50"),
            ("2", "layer.0", "2,000", "0.25"),
            ("3", "layer.1", "30", "1"),
            ("4", "n/a", "7", "0.0005"),
            ("5", "layer.0", "4", "0.001"),
        ]);
        let table = parse(&text, &ParseOptions::ranges_from("NVTX Range")).expect("parses");
        assert_eq!(table.range_column(), Some("NVTX Range"));
        let names: Vec<Option<&str>> = table.ranges().iter().map(Range::name).collect();
        assert_eq!(names, [None, Some("layer.0"), Some("layer.1")]);
        assert_eq!(table.range(None).map(Range::rows), Ok(&[0, 4][..]));
        assert_eq!(
            table.range(Some("layer.0")).map(Range::rows),
            Ok(&[1, 2, 5][..])
        );
        assert_eq!(table.rows()[3].range(), Some("layer.1"));
        assert_eq!(table.rows()[3].line(), 9);

        assert_eq!(
            table.total(Some("layer.0"), "ops.sum"),
            Ok(Total::Integer(3_004))
        );
        assert_eq!(
            table.total(Some("layer.1"), "ops.sum"),
            Ok(Total::Integer(30))
        );
        assert_eq!(table.total(None, "ops.sum"), Ok(Total::Integer(12)));
        // usecond → ns, exactly; 0.0005 us = 0.5 ns rounds up to 1.
        assert_eq!(
            table.total_nanoseconds(Some("layer.0"), "gpu__time_duration.sum"),
            Ok(Some(2_751))
        );
        assert_eq!(
            table.total_nanoseconds(Some("layer.1"), "gpu__time_duration.sum"),
            Ok(Some(1_000))
        );
        assert_eq!(
            table.total_nanoseconds(None, "gpu__time_duration.sum"),
            Ok(Some(1_001))
        );
        assert_eq!(
            table.total(Some("layer.9"), "ops.sum"),
            Err(NcuCsvError::UnknownRange {
                range: Some("layer.9".into())
            })
        );
    }

    /// A range-replay export as ncu 2025.3.1 wrote it on the H200 (app-range replay, bf16
    /// prefill, seven layers; `verify/tests/fixtures/h200-2026-11-28-hw/README.md`).
    const RANGE_MODE: &str =
        include_str!("../../tests/fixtures/h200-2026-11-28-hw/bf16-prefill/ncu.csv");

    #[test]
    fn range_mode_rows_are_told_apart_by_id_not_kernel_name() {
        // Every row's Kernel Name is `range`: grouped by it, the seven layers would be one.
        let table = parse(RANGE_MODE, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(table.rows().len(), 7);
        for row in table.rows() {
            assert_eq!(
                table.cell(row, "Kernel Name").map(Cell::text),
                Some("range")
            );
        }
        let by_name = parse(RANGE_MODE, &ParseOptions::ranges_from("Kernel Name")).unwrap();
        assert_eq!(by_name.ranges().len(), 1);
        // By ID: one range per layer, in the order they ran, with the figures the
        // fixtures' README gives for each.
        let table = parse(RANGE_MODE, &ParseOptions::ranges_from("ID")).expect("parses");
        let names: Vec<Option<&str>> = table.ranges().iter().map(Range::name).collect();
        assert_eq!(
            names,
            ["0", "1", "2", "3", "4", "5", "6"].map(Some).to_vec()
        );
        let expected: [(&str, u64, u64, u64); 7] = [
            // ID, bf16 tensor ops, DRAM read bytes, GPU time in ns
            ("0", 27_262_976_000, 54_150_912, 2_532_768),
            ("1", 0, 1_581_824, 2_898_688),
            ("2", 34_718_351_360, 473_446_400, 142_327_296),
            ("3", 0, 1_471_232, 3_125_152),
            ("4", 34_812_723_200, 69_389_568, 16_816_256),
            ("5", 42_975_887_360, 488_364_032, 105_553_984),
            ("6", 7_549_747_200, 14_716_160, 10_227_392),
        ];
        for (id, bf16, dram_read, ns) in expected {
            let range = Some(id);
            assert_eq!(table.range(range).map(|r| r.rows().len()), Ok(1), "{id}");
            assert_eq!(table.total_count(range, BF16), Ok(Some(bf16)), "{id}");
            assert_eq!(table.total_count(range, TF32), Ok(Some(0)), "{id}");
            assert_eq!(
                table.total_count(range, "dram__bytes_read.sum"),
                Ok(Some(dram_read)),
                "{id}"
            );
            assert_eq!(table.total_nanoseconds(range, TIME), Ok(Some(ns)), "{id}");
        }
        // ncu wrote no fp16 tensor column and no SASS instruction column in this mode.
        assert!(table
            .column("sm__ops_path_tensor_src_fp16_dst_fp32.sum")
            .is_none());
        assert!(!table
            .columns()
            .iter()
            .any(|c| c.name.contains("sass_thread_inst")));
    }

    #[test]
    fn empty_and_na_cells_make_the_sum_unavailable() {
        let text = synthetic(&[
            ("0", "", "5", "1"),
            ("1", "", "", "n/a"),
            ("2", "", "N/A", ""),
        ]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(table.rows()[1].cells()[3].value(), Value::Unavailable);
        assert_eq!(
            table.total(None, "ops.sum"),
            Ok(Total::Unavailable(Unavailable::MissingCells { rows: 2 }))
        );
        assert_eq!(table.total_count(None, "ops.sum"), Ok(None));
        assert_eq!(
            table.total_nanoseconds(None, "gpu__time_duration.sum"),
            Ok(None)
        );
    }

    #[test]
    fn a_file_cut_inside_a_quoted_field_is_refused() {
        let text = synthetic(&[("0", "", "5", "1"), ("1", "", "7", "1")]);
        let cut = text.trim_end().trim_end_matches('"');
        let e = parse(cut, &ParseOptions::per_kernel()).unwrap_err();
        assert!(
            matches!(&e, NcuCsvError::Csv { message, .. } if message.contains("truncated")),
            "{e:?}"
        );
        // Quotes doubled inside a field are not an open one.
        let doubled = text.replacen(",\"\",", ",\"a \"\"b\"\"\",", 1);
        assert!(
            parse(&doubled, &ParseOptions::per_kernel()).is_ok(),
            "{doubled}"
        );
    }

    #[test]
    fn sums_are_checked() {
        let max = "18,446,744,073,709,551,615";
        let text = synthetic(&[("0", "", max, "1"), ("1", "", "1", "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(table.rows()[0].cells()[3].value(), Value::Integer(u64::MAX));
        assert_eq!(
            table.total(None, "ops.sum"),
            Err(NcuCsvError::Overflow {
                column: "ops.sum".into(),
                range: None
            })
        );
        // One count past 64 bits is an overflow, not "not a whole number".
        let past = "18,446,744,073,709,551,616";
        let text = synthetic(&[("0", "", past, "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(
            table.total_count(None, "ops.sum"),
            Err(NcuCsvError::Overflow {
                column: "ops.sum".into(),
                range: None
            })
        );
        // A fraction is still named as one.
        let text = synthetic(&[("0", "", "5.5", "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert!(matches!(
            table.total_count(None, "ops.sum"),
            Err(NcuCsvError::BadValue { .. })
        ));
        // Text where a number belongs names the line.
        let text = synthetic(&[("0", "", "5", "1"), ("1", "", "lots", "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(
            table.total(None, "ops.sum"),
            Err(NcuCsvError::BadValue {
                line: 7,
                column: "ops.sum".into(),
                text: "lots".into(),
                expected: "a number"
            })
        );
        // A count must be whole.
        let text = synthetic(&[("0", "", "5", "1"), ("1", "", "2.5", "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(table.total(None, "ops.sum"), Ok(Total::Real(7.5)));
        assert!(matches!(
            table.total_count(None, "ops.sum"),
            Err(NcuCsvError::BadValue { line: 7, .. })
        ));
        // A negative duration is not a duration.
        let text = synthetic(&[("0", "", "5", "-1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert!(matches!(
            table.total_nanoseconds(None, "gpu__time_duration.sum"),
            Err(NcuCsvError::BadValue { line: 6, .. })
        ));
    }

    #[test]
    fn sums_and_cells_past_f64_and_the_range_in_messages() {
        // Two fractional cells whose sum is past f64's range: an overflow, not infinity.
        let huge = format!("{}.5", "9".repeat(308));
        let text = synthetic(&[("0", "", &huge, "1"), ("1", "", &huge, "1")]);
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        assert_eq!(
            table.total(None, "ops.sum"),
            Err(NcuCsvError::Overflow {
                column: "ops.sum".into(),
                range: None
            })
        );
        // One cell already past f64's range is not a number at all.
        for past in [format!("{}.5", "9".repeat(400)), "9".repeat(400)] {
            assert_eq!(classify(&past), Value::Text, "{past}");
        }
        // Messages name the range, or say there is none.
        let overflow = |range: Option<&str>| NcuCsvError::Overflow {
            column: "ops.sum".into(),
            range: range.map(String::from),
        };
        assert_eq!(
            overflow(Some("layer.0")).to_string(),
            "the sum of \"ops.sum\" over the range \"layer.0\" overflows"
        );
        assert_eq!(
            overflow(None).to_string(),
            "the sum of \"ops.sum\" over the range (no range) overflows"
        );
        let unknown = NcuCsvError::UnknownRange {
            range: Some("layer.9".into()),
        };
        assert_eq!(
            unknown.to_string(),
            "no row belongs to the range \"layer.9\""
        );
    }

    #[test]
    fn only_upper_case_tags_are_ncus_lines() {
        assert_eq!(ncu_tag("==PROF== Connected"), Some(NoteKind::Prof));
        assert_eq!(ncu_tag("==INFO== x"), Some(NoteKind::OtherNcu));
        // A program may print lines that look almost like ncu's: they are its own.
        for program in ["==prof== x", "==Prof== x", "==== x", "==PROF x", "PROF== x"] {
            assert_eq!(ncu_tag(program), None, "{program}");
        }
        let text = format!("==error== not ncu's\n{}", synthetic(&[("0", "", "5", "1")]));
        let table =
            parse(&text, &ParseOptions::per_kernel()).expect("a program's line is no error");
        assert_eq!(table.notes()[0].kind, NoteKind::Program);
    }

    #[test]
    fn durations_convert_with_the_units_row() {
        for (unit, cell, ns) in [
            ("ns", "6,560", 6_560),
            ("nsecond", "6,560", 6_560),
            ("us", "6.56", 6_560),
            ("usecond", "1,234.5", 1_234_500),
            ("ms", "1.5", 1_500_000),
            ("msecond", "0.000001", 1),
            ("s", "2", 2_000_000_000),
            ("second", "0.0000000014", 1),
            ("ns", "6.5", 7),
            ("ns", "6.49", 6),
        ] {
            let text = format!("\"ID\",\"t\"\n\"\",\"{unit}\"\n\"0\",\"{cell}\"\n");
            let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
            assert_eq!(
                table.total_nanoseconds(None, "t"),
                Ok(Some(ns)),
                "{cell} {unit}"
            );
        }
        let text = "\"ID\",\"t\"\n\"\",\"cycle\"\n\"0\",\"5\"\n";
        let table = parse(text, &ParseOptions::per_kernel()).expect("parses");
        assert!(matches!(
            table.total_nanoseconds(None, "t"),
            Err(NcuCsvError::UnexpectedUnit { .. })
        ));
    }

    #[test]
    fn numbers_are_typed_strictly() {
        for (text, value) in [
            ("0", Value::Integer(0)),
            ("1,280", Value::Integer(1_280)),
            ("27,262,976,000", Value::Integer(27_262_976_000)),
            ("12,710,012.12", Value::Real(12_710_012.12)),
            ("0.59", Value::Real(0.59)),
            ("-3", Value::Real(-3.0)),
            (
                "18446744073709551616",
                Value::Real(18_446_744_073_709_551_616.0),
            ),
            ("", Value::Unavailable),
            ("  ", Value::Unavailable),
            ("n/a", Value::Unavailable),
            ("1,2", Value::Text),
            ("1234,567", Value::Text),
            // Grouping that no locale prints for a whole number: a leading 0 in the first
            // group (`0,123` is 0.123 in a decimal-comma locale), or a group of other size.
            ("0,123", Value::Text),
            ("00,123", Value::Text),
            ("0,000,001", Value::Text),
            ("012,345", Value::Text),
            ("-0,123", Value::Text),
            ("0,123.5", Value::Text),
            ("1,23", Value::Text),
            ("1,2345", Value::Text),
            ("1,234,56", Value::Text),
            ("999,999", Value::Integer(999_999)),
            ("100,000", Value::Integer(100_000)),
            ("1,000,001", Value::Integer(1_000_001)),
            (",123", Value::Text),
            ("1.", Value::Text),
            (".5", Value::Text),
            ("1.2.3", Value::Text),
            ("1,234.5,6", Value::Text),
            ("9.0.1", Value::Text),
            ("127.0.0.1", Value::Text),
            ("(2, 64, 1)", Value::Text),
            ("inf", Value::Text),
            ("NaN", Value::Text),
            ("1e5", Value::Text),
        ] {
            assert_eq!(classify(text), value, "{text:?}");
        }
        // Such a cell in a summed metric is an error naming its line, never a number.
        for bad in ["0,123", "00,123", "0,000,001"] {
            let text = synthetic(&[("0", "", "5", "1"), ("1", "", bad, "1")]);
            let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
            let error = table.total(None, "ops.sum").unwrap_err();
            assert_eq!(
                error,
                NcuCsvError::BadValue {
                    line: 7,
                    column: "ops.sum".into(),
                    text: bad.into(),
                    expected: "a number"
                }
            );
            assert!(error.to_string().starts_with("line 7, "), "{error}");
            // Nor a duration.
            let text = synthetic(&[("0", "", "5", bad)]);
            let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
            assert!(matches!(
                table.total_nanoseconds(None, "gpu__time_duration.sum"),
                Err(NcuCsvError::BadValue { line: 6, .. })
            ));
        }
    }

    #[test]
    fn ncu_errors_surface_as_errors() {
        let text = MLP.replacen(
            "==PROF== Disconnected",
            "==ERROR== LaunchFailed\n==PROF== Disconnected",
            1,
        );
        let error = parse(&text, &ParseOptions::per_kernel()).unwrap_err();
        assert_eq!(
            error,
            NcuCsvError::NcuReported {
                errors: vec![(4, "==ERROR== LaunchFailed".into())]
            }
        );
        assert!(error.to_string().contains("line 4: ==ERROR== LaunchFailed"));
        // Also after the table, and even with no table at all.
        let text = format!("{MLP}==ERROR== An error was reported by the driver\n");
        assert!(matches!(
            parse(&text, &ParseOptions::per_kernel()),
            Err(NcuCsvError::NcuReported { errors }) if errors[0].0 == 13
        ));
        let text = "==ERROR== Failed to connect\n";
        assert!(matches!(
            parse(text, &ParseOptions::per_kernel()),
            Err(NcuCsvError::NcuReported { .. })
        ));
    }

    #[test]
    fn ncu_lines_inside_the_table_are_notes() {
        let text = MLP.replacen(
            "\"1\",\"565\"",
            "==WARNING== Something mid-table\n\"1\",\"565\"",
            1,
        );
        let table = per_kernel(&text);
        assert_eq!(table.rows().len(), 6);
        assert_eq!(table.rows()[1].line(), 9);
        assert_eq!(table.notes().last().map(|n| n.line), Some(8));
        assert_eq!(count(&table, BF16), Some(27_262_976_000));
    }

    #[test]
    fn malformed_inputs_are_errors_naming_the_line() {
        let options = ParseOptions::per_kernel();
        assert_eq!(
            parse("", &options),
            Err(NcuCsvError::NoHeader {
                lines: 0,
                warnings: vec![]
            })
        );
        let error = parse("==WARNING== No kernels were profiled.\n", &options).unwrap_err();
        assert!(
            error.to_string().contains("No kernels were profiled"),
            "{error}"
        );

        // Header with no units row: at the end, or followed by a result.
        let header = "\"ID\",\"Kernel Name\",\"ops.sum\"\n";
        assert_eq!(
            parse(&format!("note\n{header}"), &options),
            Err(NcuCsvError::MissingUnitsRow { line: 2 })
        );
        assert_eq!(
            parse(&format!("{header}\"0\",\"k\",\"5\"\n"), &options),
            Err(NcuCsvError::MissingUnitsRow { line: 1 })
        );
        // A units row or a result of the wrong width.
        assert_eq!(
            parse(&format!("{header}\"\",\"\"\n"), &options),
            Err(NcuCsvError::WrongCellCount {
                line: 2,
                expected: 3,
                found: 2
            })
        );
        let text = format!("{header}\"\",\"\",\"\"\n\"0\",\"k\",\"5\"\n\"1\",\"k\",\"5\",\"6\"\n");
        let error = parse(&text, &options).unwrap_err();
        assert_eq!(
            error,
            NcuCsvError::WrongCellCount {
                line: 4,
                expected: 3,
                found: 4
            }
        );
        assert_eq!(
            error.to_string(),
            "line 4: 4 cell(s), but the header has 3 column(s)"
        );
        // Program output after the table is not a row.
        let text = format!("{MLP}trailing output\n");
        assert!(matches!(
            parse(&text, &options),
            Err(NcuCsvError::WrongCellCount {
                line: 13,
                found: 1,
                ..
            })
        ));
        // Duplicate columns; a range column the header lacks.
        assert_eq!(
            parse("\"ID\",\"a\",\"a\"\n\"\",\"\",\"\"\n", &options),
            Err(NcuCsvError::DuplicateColumn {
                line: 1,
                name: "a".into()
            })
        );
        assert_eq!(
            parse(MLP, &ParseOptions::ranges_from("NVTX Range")),
            Err(NcuCsvError::RangeColumnMissing {
                column: "NVTX Range".into()
            })
        );
    }

    #[test]
    fn a_header_and_units_with_no_results_has_no_ranges() {
        let table =
            parse("\"ID\",\"x\"\n\"\",\"\"\n", &ParseOptions::per_kernel()).expect("parses");
        assert!(table.rows().is_empty());
        assert!(table.ranges().is_empty());
        assert_eq!(
            table.total(None, "x"),
            Err(NcuCsvError::UnknownRange { range: None })
        );
    }

    #[test]
    fn blank_lines_are_skipped() {
        let text = format!(
            "\n{}\n\n",
            MLP.replacen("\"0\",\"565\"", "\n\"0\",\"565\"", 1)
        );
        let table = per_kernel(&text);
        assert_eq!(table.notes().len(), 4);
        assert_eq!(table.rows().len(), 6);
        assert_eq!(table.rows()[0].line(), 9);
        assert_eq!(count(&table, BF16), Some(27_262_976_000));
    }

    #[test]
    fn crlf_line_endings_and_a_bom_are_accepted() {
        let text = format!("\u{feff}{}", MLP.replace('\n', "\r\n"));
        let table = per_kernel(&text);
        assert_eq!(count(&table, BF16), Some(27_262_976_000));
        assert_eq!(table.notes()[0].kind, NoteKind::Warning);
    }

    /// Whatever is done with it, a prefix of a real export never makes the parser panic.
    #[test]
    fn truncated_fixtures_never_panic() {
        for (name, text) in FIXTURES {
            let mut cuts: Vec<usize> = (0..text.len()).step_by(97).collect();
            // Around every line end too, where the structure changes.
            for (i, _) in text.match_indices('\n') {
                cuts.extend([i.saturating_sub(1), i, i + 1, i + 2]);
            }
            for cut in cuts {
                let Some(prefix) = text.get(..cut) else {
                    continue;
                };
                for options in [ParseOptions::per_kernel(), ParseOptions::ranges_from("ID")] {
                    if let Ok(table) = parse(prefix, &options) {
                        for range in table.ranges() {
                            for metric in [BF16, FFMA, TIME, "Kernel Name"] {
                                let _ = table.total(range.name(), metric);
                                let _ = table.total_count(range.name(), metric);
                                let _ = table.total_nanoseconds(range.name(), metric);
                            }
                        }
                    }
                }
            }
            // The whole file parses.
            assert!(parse(text, &ParseOptions::per_kernel()).is_ok(), "{name}");
        }
    }

    /// Deterministic byte mutations of a small export: errors, never panics.
    #[test]
    fn mutated_inputs_never_panic() {
        let base = synthetic(&[("0", "a", "1,000", "1.5"), ("1", "b", "2", "2")]);
        let bytes = base.as_bytes();
        let replacements = [b'"', b',', b'\n', b'\r', b'=', b'.', b'-', b' ', b'9'];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut mutated = bytes.to_vec();
            let n = (state % 4 + 1) as usize;
            for k in 0..n {
                let at = ((state >> (8 * k)) as usize) % mutated.len();
                mutated[at] = replacements[((state >> (3 * k + 32)) as usize) % replacements.len()];
            }
            let text = String::from_utf8_lossy(&mutated);
            for options in [
                ParseOptions::per_kernel(),
                ParseOptions::ranges_from("NVTX Range"),
            ] {
                if let Ok(table) = parse(&text, &options) {
                    for range in table.ranges() {
                        let _ = table.total(range.name(), "ops.sum");
                        let _ = table.total_nanoseconds(range.name(), "gpu__time_duration.sum");
                    }
                }
            }
        }
    }
}

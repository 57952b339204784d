//! JUnit XML: one test case per layer and metric, for CI systems that render it.
//! Known gaps and rows shown for information only (unavailable hardware figures among
//! them) are skipped test cases; layers that could not run, and checks that could not be
//! made, are errors; a passed case keeps its row's note as `<system-out>` ("not exact: …"
//! for a row within the tolerance but unequal); in a sweep, a failing case's failed and
//! errored rows end with its replay command. The `--model` report's JUnit is written
//! with the same [`Suite`].

use super::Report;
use crate::compare::{MetricRow, Status};

pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// What a metric row is as a JUnit test case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Passed,
    Skipped,
    Failed,
    Errored,
}

/// The outcome of a check with `status` and the body of its `<testcase>`: `message` says
/// what was compared (for failures and errors), `note` why (a passed case keeps its note
/// as `<system-out>`: "not exact: …" for a row within the tolerance but unequal).
/// `unavailable`: an `Info` row whose figure the device could not give.
fn case_body(status: Status, unavailable: bool, message: &str, note: &str) -> (Outcome, String) {
    let note = escape(note);
    match status {
        Status::Pass if note.is_empty() => (Outcome::Passed, String::new()),
        Status::Pass => (Outcome::Passed, format!("<system-out>{note}</system-out>")),
        // Shown for information (a figure no model claims, or one the device could not
        // measure): not a check, so not a passed test either.
        Status::Info => {
            let what = if unavailable {
                "unavailable"
            } else {
                "information only"
            };
            (
                Outcome::Skipped,
                format!("<skipped message=\"{what}: {note}\"/>"),
            )
        }
        Status::KnownGap => (
            Outcome::Skipped,
            format!("<skipped message=\"known gap: {note}\"/>"),
        ),
        Status::Fail => (
            Outcome::Failed,
            format!("<failure message=\"{}\">{note}</failure>", escape(message)),
        ),
        // The check itself could not be made (the oracle had no answer for the layer, a
        // layer or call could not run).
        Status::Error => (
            Outcome::Errored,
            format!("<error message=\"{}\">{note}</error>", escape(message)),
        ),
    }
}

/// A JUnit suite being written: its test cases and their counts. One place for what a
/// status becomes in JUnit, for the layer report and the `--model` report.
#[derive(Debug, Default)]
pub(super) struct Suite {
    cases: String,
    tests: usize,
    failures: usize,
    errors: usize,
    skipped: usize,
}

impl Suite {
    /// A test case `name` of `class` for a check with `status` (see [`case_body`]).
    pub(super) fn case(
        &mut self,
        class: &str,
        name: &str,
        status: Status,
        unavailable: bool,
        message: &str,
        note: &str,
    ) {
        let (outcome, body) = case_body(status, unavailable, message, note);
        self.tests += 1;
        match outcome {
            Outcome::Passed => {}
            Outcome::Skipped => self.skipped += 1,
            Outcome::Failed => self.failures += 1,
            Outcome::Errored => self.errors += 1,
        }
        self.cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\">{body}</testcase>\n",
            escape(class),
            escape(name)
        ));
    }

    /// The test case of metric row `m`.
    pub(super) fn row(&mut self, class: &str, m: &MetricRow, tolerance: f64) {
        self.row_replayed(class, m, tolerance, None);
    }

    /// The test case of metric row `m` of a sweep case that `replay` reruns: a failed or
    /// errored row's body ends with the command (`replay: …`), as the table's case line
    /// does, so a CI page that shows only the JUnit still says how to reproduce it.
    fn row_replayed(&mut self, class: &str, m: &MetricRow, tolerance: f64, replay: Option<&str>) {
        let note = m.note.as_deref().unwrap_or("");
        self.case(
            class,
            m.metric.name(),
            m.status,
            m.unavailable,
            &m.junit_detail(tolerance),
            &with_replay(note, m.status, replay),
        );
    }

    /// The XML document: `testsuites` named `verify-decoder` holding one `testsuite`
    /// named `name`.
    pub(super) fn document(&self, name: &str) -> String {
        let Suite {
            cases,
            tests,
            failures,
            errors,
            skipped,
        } = self;
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites name=\"verify-decoder\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n  \
             <testsuite name=\"{name}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n\
             {cases}  </testsuite>\n</testsuites>\n"
        )
    }
}

/// `note` of a row with `status`, followed by `replay: <command>` when the row failed or
/// errored and its case has a replay command (sweeps).
fn with_replay(note: &str, status: Status, replay: Option<&str>) -> String {
    match replay {
        Some(cmd) if matches!(status, Status::Fail | Status::Error) => {
            if note.is_empty() {
                format!("replay: {cmd}")
            } else {
                format!("{note}\nreplay: {cmd}")
            }
        }
        _ => note.to_owned(),
    }
}

/// The report as a JUnit XML document.
pub fn to_junit(report: &Report) -> String {
    let mut suite = Suite::default();
    for case in &report.cases {
        let prefix = case
            .index
            .map(|i| format!("case-{}/", i + 1))
            .unwrap_or_default();
        for layer in &case.layers {
            let class = format!("{prefix}{}", layer.name);
            let replay = case.replay.as_deref();
            if let Some(cause) = &layer.error {
                let note = with_replay("", Status::Error, replay);
                for metric in crate::check::reported() {
                    suite.case(&class, metric.name(), Status::Error, false, cause, &note);
                }
                continue;
            }
            for m in &layer.metrics {
                suite.row_replayed(&class, m, report.tolerance, replay);
            }
        }
    }
    suite.document("verify-decoder")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite's counts are what CI gates on: one of each outcome, counted once each.
    #[test]
    fn the_suite_counts_each_outcome() {
        let mut suite = Suite::default();
        for (status, unavailable) in [
            (Status::Pass, false),
            (Status::Info, false),
            (Status::KnownGap, false),
            (Status::Fail, false),
            (Status::Error, false),
            (Status::Info, true),
        ] {
            suite.case("L", "m", status, unavailable, "message", "note");
        }
        let doc = suite.document("verify-decoder");
        assert!(
            doc.contains(r#"tests="6" failures="1" errors="1" skipped="3""#),
            "{doc}"
        );
    }

    #[test]
    fn only_checked_rows_pass_and_errors_are_errors() {
        use crate::check::Check;
        let row = |status, unavailable| MetricRow {
            metric: Check::HwDramBytes,
            analytic: 1,
            measured: 1,
            rel_diff: Some(0.0),
            status,
            note: Some("why".into()),
            unavailable,
        };
        let outcome = |status, unavailable| {
            let m = row(status, unavailable);
            case_body(m.status, m.unavailable, &m.junit_detail(0.1), "why")
        };
        assert_eq!(
            outcome(Status::Pass, false),
            (Outcome::Passed, "<system-out>why</system-out>".into())
        );
        assert_eq!(
            case_body(Status::Pass, false, "", ""),
            (Outcome::Passed, String::new())
        );
        assert_eq!(
            outcome(Status::Info, true),
            (
                Outcome::Skipped,
                "<skipped message=\"unavailable: why\"/>".into()
            )
        );
        assert_eq!(
            outcome(Status::Info, false),
            (
                Outcome::Skipped,
                "<skipped message=\"information only: why\"/>".into()
            )
        );
        assert_eq!(outcome(Status::KnownGap, false).0, Outcome::Skipped);
        let (failed, body) = outcome(Status::Fail, false);
        assert!(
            failed == Outcome::Failed && body.starts_with("<failure"),
            "{body}"
        );
        let (errored, body) = outcome(Status::Error, false);
        assert!(
            errored == Outcome::Errored && body.starts_with("<error"),
            "{body}"
        );
    }

    /// Only a failed or errored row of a case with a replay carries the command.
    #[test]
    fn failing_rows_end_with_their_replay() {
        let cmd = Some("verify-decoder --config c.json");
        assert_eq!(
            with_replay("off by 1", Status::Fail, cmd),
            "off by 1\nreplay: verify-decoder --config c.json"
        );
        assert_eq!(
            with_replay("", Status::Error, cmd),
            "replay: verify-decoder --config c.json"
        );
        for status in [Status::Pass, Status::Info, Status::KnownGap] {
            assert_eq!(with_replay("why", status, cmd), "why");
        }
        assert_eq!(with_replay("why", Status::Fail, None), "why");
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot; ");
    }
}

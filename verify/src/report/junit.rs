//! JUnit XML: one test case per layer and metric, for CI systems that render it.
//! Known gaps and rows shown for information only (unavailable hardware figures among
//! them) are skipped test cases; layers that could not run, and checks that could not be
//! made, are errors.

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

/// The outcome of row `m` and the body of its `<testcase>`.
fn case_body(m: &MetricRow, tolerance: f64) -> (Outcome, String) {
    let note = escape(m.note.as_deref().unwrap_or(""));
    match m.status {
        Status::Pass => (Outcome::Passed, String::new()),
        // Shown for information (a figure no model claims, or one the device could not
        // measure): not a check, so not a passed test either.
        Status::Info => {
            let what = if m.unavailable {
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
            format!(
                "<failure message=\"{}\">{note}</failure>",
                escape(&m.junit_detail(tolerance))
            ),
        ),
        // The check itself could not be made (the oracle had no answer for the layer).
        Status::Error => (
            Outcome::Errored,
            format!(
                "<error message=\"{}\">{note}</error>",
                escape(&m.junit_detail(tolerance))
            ),
        ),
    }
}

/// The report as a JUnit XML document.
pub fn to_junit(report: &Report) -> String {
    let mut cases = String::new();
    let (mut tests, mut failures, mut errors, mut skipped) = (0, 0, 0, 0);
    for case in &report.cases {
        let prefix = case
            .index
            .map(|i| format!("case-{}/", i + 1))
            .unwrap_or_default();
        for layer in &case.layers {
            let class = escape(&format!("{prefix}{}", layer.name));
            if let Some(cause) = &layer.error {
                for metric in crate::check::reported() {
                    tests += 1;
                    errors += 1;
                    cases.push_str(&format!(
                        "    <testcase classname=\"{class}\" name=\"{metric}\"><error message=\"{}\"/></testcase>\n",
                        escape(cause)
                    ));
                }
                continue;
            }
            for m in &layer.metrics {
                tests += 1;
                let (outcome, body) = case_body(m, report.tolerance);
                match outcome {
                    Outcome::Passed => {}
                    Outcome::Skipped => skipped += 1,
                    Outcome::Failed => failures += 1,
                    Outcome::Errored => errors += 1,
                }
                cases.push_str(&format!(
                    "    <testcase classname=\"{class}\" name=\"{}\">{body}</testcase>\n",
                    m.metric
                ));
            }
        }
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"verify-decoder\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n  \
         <testsuite name=\"verify-decoder\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n\
         {cases}  </testsuite>\n</testsuites>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let outcome = |status, unavailable| case_body(&row(status, unavailable), 0.1);
        assert_eq!(
            outcome(Status::Pass, false),
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

    #[test]
    fn escapes_xml() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot; ");
    }
}

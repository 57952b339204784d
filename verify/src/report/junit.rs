//! JUnit XML: one test case per layer and metric, for CI systems that render it.
//! Known gaps are skipped test cases; layers that could not run are errors.

use super::Report;
use crate::compare::Status;

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
                let detail = m.junit_detail(report.tolerance);
                let body = match m.status {
                    Status::Info | Status::Pass => String::new(),
                    Status::KnownGap => {
                        skipped += 1;
                        format!(
                            "<skipped message=\"known gap: {}\"/>",
                            escape(m.note.as_deref().unwrap_or(""))
                        )
                    }
                    Status::Fail | Status::Error => {
                        failures += 1;
                        format!(
                            "<failure message=\"{}\">{}</failure>",
                            escape(&detail),
                            escape(m.note.as_deref().unwrap_or(""))
                        )
                    }
                };
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
    fn escapes_xml() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot; ");
    }
}

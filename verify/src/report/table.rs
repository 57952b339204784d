//! The human table: one row per layer and metric, readable units, one summary line.

use modelmeter::layers::attention_class_name;
use modelmeter::units;

use super::{Case, Report};
use crate::compare::Status;
use crate::results::LayerResult;

/// Rows of one layer: its metrics, or its error.
fn layer_rows(layer: &LayerResult, rows: &mut Vec<Vec<String>>, notes: &mut Vec<String>) {
    if let Some(cause) = &layer.error {
        rows.push(vec![
            layer.name.clone(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            Status::Error.as_str().into(),
        ]);
        notes.push(super::error_note(&layer.name, cause));
        return;
    }
    for (i, m) in layer.metrics.iter().enumerate() {
        let name = if i == 0 {
            layer.name.clone()
        } else {
            String::new()
        };
        rows.push(vec![
            name,
            m.metric.name().into(),
            m.metric.show(m.analytic),
            m.measured_text(),
            m.rel_text(),
            m.status.as_str().into(),
        ]);
        if let Some(note) = &m.note {
            let subject = format!("{} {}", layer.name, m.metric);
            notes.push(match m.status {
                Status::Error => super::error_note(&subject, note),
                _ => format!("{subject}: {note}"),
            });
        }
    }
}

/// The table of a single case (header, rows, notes, summary line).
fn case_table(case: &Case, out: &mut String) {
    let mut rows = vec![[
        "layer", "metric", "analytic", "measured", "rel diff", "status",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    let mut notes = Vec::new();
    for layer in &case.layers {
        layer_rows(layer, &mut rows, &mut notes);
    }
    out.push_str(&units::table(
        &rows,
        &[false, false, true, true, true, false],
    ));
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&format!("  {n}\n"));
        }
    }
}

/// The one-line summary of a sweep case.
pub fn case_line(case: &Case, total: usize) -> String {
    // The worst layer's status, as the case's summary counts it (a case with a known gap
    // says so, not `pass`).
    let status = case
        .layers
        .iter()
        .map(|l| l.status)
        .max()
        .unwrap_or(Status::Pass)
        .as_str();
    let c = &case.config;
    let moe = c
        .moe
        .as_ref()
        .map(|m| {
            // The routing by its config spelling (`noaux_tc/sigmoid`), when not greedy.
            let routing = match m.routing.is_greedy_softmax() {
                true => String::new(),
                false => format!(
                    " {}/{}",
                    m.routing.topk_method.name(),
                    m.routing.scoring_func.name()
                ),
            };
            format!(
                " E={} k={} m={} shared={}{routing}",
                m.n_routed_experts,
                m.num_experts_per_tok,
                m.moe_intermediate_size,
                m.n_shared_experts
            )
        })
        .unwrap_or_default();
    // Multi-head: heads/KV heads and head dim; MLA: its ranks and per-head dims instead.
    let attention = match &c.mla {
        None => format!(
            "H={}/{} d={}",
            c.num_attention_heads, c.num_key_value_heads, c.head_dim
        ),
        Some(m) => format!(
            "H={} mla r_q={} r_kv={} d_n/d_r/d_v={}/{}/{}",
            c.num_attention_heads,
            m.q_lora_rank.map_or("-".to_string(), |r| r.to_string()),
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
    };
    format!(
        "[{:>w$}/{total}] {:<9} h={} {attention} i={}{moe} bias={} | {} {}",
        case.index.map_or(0, |i| i + 1),
        status,
        c.hidden_size,
        c.intermediate_size,
        c.attention_bias,
        case.workload.describe(),
        attention_class_name(&case.config, case.workload.mla, case.attention),
        w = total.to_string().len(),
    )
}

/// The whole human report.
pub fn to_table(report: &Report) -> String {
    let env = &report.environment;
    let mut out = String::new();
    out.push_str(&format!(
        "device: {} ({}), libtorch {}, tolerance {}, seed {}\n",
        env.device,
        env.device_name,
        env.libtorch_version,
        units::percent(report.tolerance),
        env.seed
    ));
    match report.sweep {
        None => {
            if let Some(case) = report.cases.first() {
                out.push_str(&format!(
                    "config: {}, workload: {}, attention: {}\n\n",
                    modelmeter::cli::one_line(&case.config.name),
                    case.workload.describe(),
                    attention_class_name(&case.config, case.workload.mla, case.attention)
                ));
                case_table(case, &mut out);
            }
            out.push('\n');
            out.push_str(&report.summary().line("layer", "layers"));
        }
        Some((seed, n)) => {
            let failing: Vec<&Case> = report.cases.iter().filter(|c| !c.summary.ok()).collect();
            for case in &failing {
                out.push_str(&format!("\n{}\n", case_line(case, n)));
                if let Some(replay) = &case.replay {
                    out.push_str(&format!("replay: {replay}\n"));
                }
                case_table(case, &mut out);
            }
            let ok = report.cases.len() - failing.len();
            out.push_str(&format!(
                "\nsweep seed {seed}: {ok} of {} configurations pass; {}",
                report.cases.len(),
                report.summary().line("layer", "layers")
            ));
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Summary;
    use modelmeter::layers::AttentionImpl;
    use modelmeter::{ModelConfig, Workload};

    /// A DeepSeek-OCR prefill case (B = 1, S = 8) with these layers.
    fn case_of(layers: Vec<LayerResult>, index: Option<usize>, replay: Option<String>) -> Case {
        Case {
            index,
            config: ModelConfig::deepseek_ocr(),
            workload: Workload::prefill(1, 8).unwrap(),
            attention: AttentionImpl::Sdpa,
            summary: Summary::of(&layers),
            layers,
            replay,
        }
    }

    #[test]
    fn a_layer_is_named_on_its_first_row_and_an_errored_row_note_is_an_error() {
        use crate::check::Check;
        use crate::compare::{compare, MetricRow};
        let mut layer = LayerResult::new("MoEGate".into(), Status::Error);
        let mut first = compare(Check::Exact(modelmeter::Metric::MatmulFlops), 10, 10, 0.05);
        first.note = Some("counted by hand".into());
        layer.metrics = vec![
            first,
            MetricRow {
                metric: Check::Flops,
                analytic: 5,
                measured: 0,
                rel_diff: None,
                status: Status::Error,
                note: Some("the counter stopped".into()),
                unavailable: false,
            },
        ];
        let mut failed = LayerResult::new("DeepseekV2MLP".into(), Status::Error);
        failed.error = Some("out of memory".into());
        let case = case_of(vec![layer, failed], None, None);
        let mut out = String::new();
        case_table(&case, &mut out);
        let lines: Vec<&str> = out.lines().collect();
        // The header, its dashes, then each row: the layer's name on its first only.
        assert!(
            lines[2].starts_with("MoEGate  ") && lines[2].contains("matmul_flops"),
            "{out}"
        );
        assert!(
            lines[3].starts_with("  ") && lines[3].contains("flops"),
            "{out}"
        );
        assert!(lines[4].starts_with("DeepseekV2MLP  "), "{out}");
        let notes: Vec<&str> = out
            .lines()
            .skip_while(|l| *l != "notes:")
            .skip(1)
            .map(str::trim)
            .collect();
        assert_eq!(
            notes,
            [
                "MoEGate matmul_flops: counted by hand",
                "MoEGate flops: error: the counter stopped",
                "DeepseekV2MLP: error: out of memory",
            ],
            "{out}"
        );
        // `--quiet` keeps the causes of both errors, not the other note.
        let quiet = crate::report::quiet_text(&format!("{out}\n1 layer: 1 error\n"));
        assert_eq!(
            quiet,
            "MoEGate flops: error: the counter stopped\nDeepseekV2MLP: error: out of memory\n\
             1 layer: 1 error\n"
        );
    }

    #[test]
    fn a_sweep_counts_its_passing_cases_and_shows_the_failing_one() {
        use crate::device::{DeviceInfo, DeviceSpec};
        use crate::environment::Environment;
        let case = |index: usize, status: Status| {
            let layers = vec![LayerResult::new("MoEGate".into(), status)];
            case_of(
                layers,
                Some(index),
                Some(format!("verify-decoder --case {index}")),
            )
        };
        let info = DeviceInfo {
            name: "test".into(),
            memory_bytes: Ok(1 << 30),
            memory_bound: None,
        };
        let report = Report {
            environment: Environment::collect(
                DeviceSpec::Cpu,
                &info,
                &Workload::prefill(1, 8).unwrap(),
                None,
                7,
            ),
            tolerance: 0.1,
            cases: vec![
                case(0, Status::Pass),
                case(1, Status::Fail),
                case(2, Status::Pass),
            ],
            sweep: Some((7, 3)),
        };
        let table = to_table(&report);
        let last = table.lines().last().unwrap();
        assert!(
            last.starts_with("sweep seed 7: 2 of 3 configurations pass; 3 layers: 2 pass"),
            "{table}"
        );
        assert!(table.contains("\n[2/3] fail "), "{table}");
        assert!(
            table.contains("replay: verify-decoder --case 1\n"),
            "{table}"
        );
        assert!(
            !table.contains("--case 0") && !table.contains("--case 2"),
            "{table}"
        );
    }

    #[test]
    fn a_sweep_case_line_names_its_worst_status() {
        let case = |statuses: &[Status]| {
            let layers: Vec<LayerResult> = statuses
                .iter()
                .map(|s| LayerResult::new("L".into(), *s))
                .collect();
            case_of(layers, Some(0), None)
        };
        let status_of = |statuses: &[Status]| {
            let line = case_line(&case(statuses), 3);
            line.split_whitespace().nth(1).unwrap().to_string()
        };
        assert_eq!(status_of(&[Status::Pass, Status::Pass]), "pass");
        // The case's summary counts the known gap: so does its line.
        assert_eq!(status_of(&[Status::Pass, Status::KnownGap]), "known_gap");
        assert_eq!(status_of(&[Status::KnownGap, Status::Fail]), "fail");
        assert_eq!(status_of(&[Status::Error, Status::Fail]), "error");
    }
}

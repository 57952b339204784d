//! `verify-decoder` against hostile inputs (issue 9): special report paths, an output
//! that cannot be written, oversized and ill-typed configs, one path for two roles,
//! reproducible reports, messages and the `flops` row's known gap. Every run checks
//! that nothing panicked.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{command, no_panic, read_json, text, verify, TempDir};

/// A quick run: one small layer at a short sequence.
const QUICK: [&str; 6] = ["--device", "cpu", "--seq-len", "8", "--layers", "MoEGate"];

fn quick(extra: &[&str]) -> Output {
    let mut args = QUICK.to_vec();
    args.extend(extra);
    verify(&args)
}

/// A refusal naming `needle` (common::assert_refused).
fn assert_refused(o: &Output, needle: &str) {
    common::assert_refused(o, &[needle]);
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn an_argument_that_is_not_utf8_is_a_one_line_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verify-decoder"));
    cmd.arg("--layers").arg(OsStr::from_bytes(b"MoE\xffGate"));
    let o = no_panic(cmd.output().expect("verify-decoder runs"));
    common::assert_refused(&o, &["the value of --layers", "not UTF-8"]);
}

// Item 1: reports go where the path says, and special files are never replaced.

#[test]
fn character_devices_made_with_mknod_are_written_not_replaced() {
    let dir = TempDir::new("mknod");
    // As root, devices in a folder the run could also rename over (the strong case);
    // otherwise the system's own /dev/null and /dev/full (mknod needs root), which still
    // check that a device is written, not replaced, and that its write error is reported.
    let (null, full) = if is_root() {
        let (null, full) = (dir.str("null"), dir.str("full"));
        for (path, minor) in [(&null, "3"), (&full, "7")] {
            let made = Command::new("mknod").args([path, "c", "1", minor]).status();
            assert!(made.unwrap().success(), "mknod {path}");
        }
        (null, full)
    } else {
        ("/dev/null".to_string(), "/dev/full".to_string())
    };
    let o = quick(&["--json", &null, "--junit", &null]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let kind = std::fs::metadata(&null).unwrap().file_type();
    assert!(kind.is_char_device(), "the device is still a device");
    // A write error on a device is a one-line error after the run, not a panic.
    let o = quick(&["--json", &full]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("cannot write --json") && err.contains("No space left"),
        "{err}"
    );
    assert!(std::fs::metadata(&full)
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn a_fifo_is_written_directly() {
    let dir = TempDir::new("fifo");
    let fifo = dir.str("report.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            std::fs::File::open(&fifo)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        })
    };
    let o = quick(&["--json", &fifo]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let j: Value = serde_json::from_str(&reader.join().unwrap()).unwrap();
    assert_eq!(j["schema"], "modelmeter.verify/1");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn a_symlink_is_followed_and_kept() {
    let dir = TempDir::new("symlink");
    let target = dir.path("target.json");
    std::fs::write(&target, "old").unwrap();
    let link = dir.path("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = dir.path("dangling.xml");
    std::os::unix::fs::symlink("made.xml", &dangling).unwrap();
    let o = quick(&[
        "--json",
        link.to_str().unwrap(),
        "--junit",
        dangling.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read_json(&target)["schema"], "modelmeter.verify/1");
    assert!(std::fs::read_to_string(dir.path("made.xml"))
        .unwrap()
        .contains("<testsuites"));
}

#[test]
fn dash_and_dev_stdout_write_the_report_to_standard_output() {
    for (option, path) in [
        ("--json", "-"),
        ("--json", "/dev/stdout"),
        ("--junit", "/dev/stdout"),
    ] {
        let o = quick(&[option, path]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let out = text(&o.stdout);
        if option == "--json" {
            let j: Value = serde_json::from_str(&out).expect("standard output is the report alone");
            assert_eq!(j["schema"], "modelmeter.verify/1");
        } else {
            assert!(
                out.starts_with("<?xml") && out.trim_end().ends_with("</testsuites>"),
                "{out}"
            );
        }
        assert!(
            text(&o.stderr).contains("1 layer: 1 pass"),
            "the table goes to standard error: {}",
            text(&o.stderr)
        );
    }
}

// Item 2: standard output that cannot be written.

#[test]
fn a_full_standard_output_is_one_line_after_the_reports_are_written() {
    let dir = TempDir::new("full");
    let (json, junit) = (dir.str("r.json"), dir.str("r.xml"));
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = no_panic(
        command(&[&QUICK[..], &["--json", &json, "--junit", &junit]].concat())
            .stdout(full)
            .output()
            .unwrap(),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("verify-decoder: error: cannot write the table to standard output")
            && last.contains("No space left"),
        "{err}"
    );
    assert_eq!(read_json(Path::new(&json))["summary"]["pass"], 1);
    assert!(std::fs::read_to_string(&junit)
        .unwrap()
        .contains("<testsuites"));
}

#[test]
fn a_closed_pipe_ends_quietly_and_the_reports_are_written() {
    let dir = TempDir::new("pipe");
    let (json, junit) = (dir.str("r.json"), dir.str("r.xml"));
    let mut child = command(&[&QUICK[..], &["--json", &json, "--junit", &junit]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let o = no_panic(child.wait_with_output().unwrap());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("error"), "{}", text(&o.stderr));
    assert_eq!(read_json(Path::new(&json))["summary"]["pass"], 1);
    assert!(std::fs::read_to_string(&junit)
        .unwrap()
        .contains("<testsuites"));
    // Standard error closed too (`2>&1 | true`): still no panic.
    let mut child = command(&QUICK)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

// Item 4: a bad report path is refused before anything runs.

#[test]
fn a_folder_like_report_path_is_refused_before_anything_runs() {
    let dir = TempDir::new("folder");
    for path in [
        format!("{}/out.json/", dir.root().display()),
        "out.json/".to_string(),
    ] {
        let o = quick(&["--json", &path]);
        assert_refused(&o, "names a folder");
        assert!(!text(&o.stderr).contains("[1/"), "no layer ran");
    }
    let o = quick(&["--junit", dir.root().to_str().unwrap()]);
    assert_refused(&o, "is a directory");
    assert_eq!(
        std::fs::read_dir(dir.root()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// A report file its owner made read-only is refused (exit 2, nothing replaced), as
/// `> FILE` would refuse it, although renaming over it needs only the folder. Root may
/// write anything, so as root the run goes through `setpriv` as nobody (in a folder
/// anyone can write, so that only the file's own protection is at stake).
#[test]
fn a_read_only_report_file_is_refused_not_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("read-only");
    std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let report = dir.path("ro.json");
    std::fs::write(&report, "old").unwrap();
    std::fs::set_permissions(&report, std::fs::Permissions::from_mode(0o444)).unwrap();
    let report = report.to_str().unwrap();
    let mut args = QUICK.to_vec();
    args.extend(["--quiet", "--json", report]);
    let mut cmd = if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_verify-decoder"))
            .args(&args);
        cmd
    } else {
        command(&args)
    };
    let o = match cmd.output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: running as root and setpriv is not installed ({e})");
            return;
        }
        // Nobody may not reach the binary or libtorch (a checkout under a private home
        // folder): the loader's or setpriv's exit 126/127, never verify-decoder's own.
        Ok(o) if is_root() && matches!(o.status.code(), Some(126 | 127)) => {
            eprintln!(
                "skipped: nobody cannot run the binary here: {}",
                text(&o.stderr)
            );
            return;
        }
        o => no_panic(o.expect("verify-decoder runs")),
    };
    assert_refused(&o, "is read-only");
    assert!(text(&o.stderr).contains("chmod u+w"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(report).unwrap(), "old");
    assert_eq!(
        std::fs::read_dir(dir.root()).unwrap().count(),
        1,
        "nothing else written"
    );
}

// Item 5: the pre-check accepts every name the write accepts.

#[test]
fn a_250_byte_report_name_is_written() {
    let dir = TempDir::new("long");
    let name = format!("{}.json", "r".repeat(245));
    assert_eq!(name.len(), 250);
    let o = quick(&["--json", &dir.str(&name)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(read_json(&dir.path(&name))["schema"], "modelmeter.verify/1");
    assert_eq!(
        std::fs::read_dir(dir.root()).unwrap().count(),
        1,
        "no probe left"
    );
    let o = quick(&["--json", &dir.str(&"r".repeat(256))]);
    assert_refused(&o, "--json");
}

// Item 6: one path for two roles.

#[test]
fn one_path_for_two_roles_is_refused() {
    let dir = TempDir::new("roles");
    let same = dir.str("same");
    let o = quick(&["--json", &same, "--junit", &same]);
    assert_refused(&o, "same destination");
    let o = quick(&["--json", "-", "--junit", "/dev/stdout"]);
    assert_refused(&o, "same destination");
    let config = dir.path("cfg.json");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/deepseek-ocr/config.json"
    );
    std::fs::copy(fixture, &config).unwrap();
    let before = std::fs::read(&config).unwrap();
    let link = dir.path("link.json");
    std::os::unix::fs::symlink(&config, &link).unwrap();
    for report in [&config, &link] {
        let o = verify(&[
            "--device",
            "cpu",
            "--config",
            config.to_str().unwrap(),
            "--json",
            report.to_str().unwrap(),
        ]);
        assert_refused(&o, "is the --config file");
    }
    assert_eq!(
        std::fs::read(&config).unwrap(),
        before,
        "the config is untouched"
    );
}

/// The file a built-in config is compiled from is refused as a report path, with the
/// default config and with the built-in named: a report there would replace a tracked
/// file of the source tree and, at the next build, the built-in itself.
#[test]
fn the_file_of_the_built_in_config_is_not_a_report_path() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/deepseek-ocr/config.json"
    );
    let before = std::fs::read(fixture).unwrap();
    let runs = [
        quick(&["--json", fixture]),
        quick(&["--config", "deepseek-ocr-v1-base", "--junit", fixture]),
    ];
    // Put the file back before asserting, should a run have replaced it.
    let after = std::fs::read(fixture).unwrap();
    if after != before {
        std::fs::write(fixture, &before).unwrap();
    }
    for o in &runs {
        assert_refused(
            o,
            "the file built-in config deepseek-ocr-v1-base is compiled from",
        );
    }
    assert!(after == before, "the built-in's file was replaced");
}

/// A report over the file standard output (or error) goes to is refused before anything
/// runs: the report's rename and the run's printing would replace each other
/// (`--json - --junit r.xml > r.xml` kept only the XML; `--json r.json >> r.json` lost the
/// table).
#[test]
fn a_report_over_the_file_a_stream_goes_to_is_refused() {
    let dir = TempDir::new("streams");
    let out = dir.path("out.txt");
    for (stream, option) in [("standard output", "--junit"), ("standard error", "--json")] {
        std::fs::write(&out, "kept\n").unwrap();
        let mut cmd = command(&QUICK);
        cmd.args([option, out.to_str().unwrap()]);
        let file = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        if stream == "standard output" {
            cmd.stdout(file).stderr(Stdio::piped());
        } else {
            cmd.stderr(file).stdout(Stdio::piped());
        }
        let o = no_panic(cmd.output().unwrap());
        assert_eq!(o.status.code(), Some(2), "{stream}");
        let written = std::fs::read_to_string(&out).unwrap();
        let message = if stream == "standard output" {
            text(&o.stderr)
        } else {
            written.clone()
        };
        assert!(
            message.contains(&format!("is the file {stream} goes to")),
            "{stream}: {message}"
        );
        assert!(
            written.starts_with("kept\n"),
            "{stream}: the file was replaced: {written}"
        );
    }
}

// Items 3, 7 and 9 (config): bounded reads, wrong JSON types, nested configs, odd paths.

#[test]
fn configs_that_are_endless_ill_typed_or_oddly_named_are_refused() {
    let dir = TempDir::new("config");
    let fixture = include_str!("../../fixtures/deepseek-ocr/config.json");
    let typed = dir.path("typed.json");
    let ill_typed = fixture.replacen("\"torch_dtype\": \"bfloat16\"", "\"torch_dtype\": 16", 1);
    std::fs::write(&typed, ill_typed).unwrap();
    let nested = dir.path("nested.json");
    std::fs::write(&nested, "{\"language_config\": 5}").unwrap();
    let newline = dir.path("a\nb.json");
    std::fs::write(&newline, "{ nope").unwrap();
    let cases: [(&str, &str); 5] = [
        ("/dev/zero", "larger than 16 MiB"),
        ("/dev/urandom", "larger than 16 MiB"),
        // The field, its value, the file it is in and what is valid ({path}: the file).
        (
            typed.to_str().unwrap(),
            "torch_dtype = 16 (config {path}) is invalid: expected a string",
        ),
        (
            nested.to_str().unwrap(),
            "language_config = 5 (config {path}) is invalid: expected an object",
        ),
        (newline.to_str().unwrap(), "a\\nb.json"),
    ];
    for (config, needle) in cases {
        let o = verify(&["--device", "cpu", "--config", config]);
        assert_refused(&o, &needle.replace("{path}", config));
        assert!(!text(&o.stderr).contains("[1/"), "{config}: no layer ran");
    }
}

/// A config whose file name holds control characters (an escape sequence, a line break)
/// runs, and the table's header names it escaped on one line, as errors do: the raw
/// name would drive the terminal or split the line.
#[test]
fn a_config_named_with_control_characters_is_shown_escaped_in_the_table() {
    let dir = TempDir::new("odd-name");
    let config = dir.str("e\x1b[31mvil\nname.json");
    std::fs::write(&config, SMALL).unwrap();
    let o = verify(&[
        "--device",
        "cpu",
        "--config",
        &config,
        "--seq-len",
        "4",
        "--layers",
        "DeepseekV2RMSNorm",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    let header = table
        .lines()
        .find(|l| l.starts_with("config: "))
        .unwrap_or_else(|| panic!("no config line in {table}"));
    assert!(
        header.contains("e\\u{1b}[31mvil\\nname.json, workload: "),
        "{header}"
    );
    assert!(!table.contains('\x1b'), "{table}");
}

// Item 8: the same seed and inputs give byte-identical reports.

#[test]
fn the_same_seed_writes_byte_identical_json_and_junit() {
    let dir = TempDir::new("same-seed");
    let run = |tag: &str| {
        let (json, junit) = (
            dir.str(&format!("{tag}.json")),
            dir.str(&format!("{tag}.xml")),
        );
        let o = verify(&[
            "--device",
            "cpu",
            "--seq-len",
            "32",
            "--json",
            &json,
            "--junit",
            &junit,
            "-q",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        (std::fs::read(json).unwrap(), std::fs::read(junit).unwrap())
    };
    let (a, b) = (run("a"), run("b"));
    assert!(
        a.0 == b.0,
        "JSON differs between two runs with the same seed"
    );
    assert!(
        a.1 == b.1,
        "JUnit differs between two runs with the same seed"
    );
    let j: Value = serde_json::from_slice(&a.0).unwrap();
    assert!(j["environment"].get("device_memory_bytes").is_none());
    assert!(j.get("host").is_none(), "no volatile host facts by default");
    // Volatile facts only on request, in their own object.
    let json = dir.str("host.json");
    let o = quick(&["--json", &json, "--report-host-details"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let j = read_json(Path::new(&json));
    assert!(
        j["host"]["device_memory_bytes"].as_u64().unwrap() > 0,
        "{}",
        j["host"]
    );
    assert!(j["environment"].get("device_memory_bytes").is_none());
}

// Item 10: the flops row's known gap is the exact blind work, at any size.

/// A small valid config whose MoEGate flops row is more than 5 % off: all of it the
/// elementwise work (softmax, top-k, renormalisation) that FlopCounterMode cannot see.
const SMALL: &str = r#"{"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
  "n_routed_experts": 64, "num_experts_per_tok": 16, "norm_topk_prob": true,
  "n_shared_experts": 1, "num_attention_heads": 4, "num_hidden_layers": 2,
  "first_k_dense_replace": 1, "vocab_size": 100}"#;

fn flops_row(layer: &Value) -> &Value {
    &layer["metrics"][0]
}

#[test]
fn a_flops_row_off_by_exactly_the_blind_work_is_a_known_gap_at_small_sizes() {
    let dir = TempDir::new("small");
    let config = dir.str("small.json");
    std::fs::write(&config, SMALL).unwrap();
    let json = dir.str("r.json");
    let run = || {
        let cmd = command(&[
            "--device",
            "cpu",
            "--config",
            &config,
            "--seq-len",
            "16",
            "--json",
            &json,
            "-q",
        ]);
        let mut cmd = cmd;
        let o = no_panic(cmd.output().unwrap());
        (o, read_json(Path::new(&json)))
    };
    let (o, j) = run();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    for layer in j["layers"].as_array().unwrap() {
        let flops = flops_row(layer);
        let metrics = layer["metrics"].as_array().unwrap();
        assert!(
            metrics[1..].iter().all(|m| m["status"] == "pass"),
            "{layer}"
        );
        let (analytic, measured) = (
            flops["analytic"].as_u64().unwrap(),
            flops["measured"].as_u64().unwrap(),
        );
        if flops["status"] == "known_gap" {
            let note = flops["note"].as_str().unwrap();
            assert!(
                note.contains("exactly the analytic elementwise FLOPs"),
                "{note}"
            );
            assert!(
                note.contains(&format!("the difference, {} FLOP", analytic - measured)),
                "{note}"
            );
        }
    }
    let gate = &j["layers"][1];
    assert_eq!(gate["name"], "MoEGate");
    assert_eq!(flops_row(gate)["status"], "known_gap");
    assert!(flops_row(gate)["rel_diff"].as_f64().unwrap() > 0.05);
    let gate_elementwise = gate["metrics"][2]["analytic"].as_u64().unwrap();
    assert_eq!(
        flops_row(gate)["analytic"].as_u64().unwrap()
            - flops_row(gate)["measured"].as_u64().unwrap(),
        gate_elementwise
    );
    assert_eq!(
        flops_row(&j["layers"][3])["status"],
        "known_gap",
        "RMSNorm: the 100 % case"
    );
    assert!(j["known_gaps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["layer"] == "*"));
    // A difference of any other size fails: verify/tests/hooks.rs perturbs it by one FLOP.
}

// Item 9: messages that name what is wrong.

#[test]
fn overflows_name_the_option_or_field_and_empty_layer_lists_are_errors() {
    let dir = TempDir::new("messages");
    let huge = dir.path("huge.json");
    std::fs::write(
        &huge,
        r#"{"hidden_size": 1000000000000000, "num_attention_heads": 4, "head_dim": 2,
            "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 5}"#,
    )
    .unwrap();
    let cases: [(&[&str], &str); 8] = [
        (
            &["--seq-len", "10000000000"],
            "--seq-len = 10000000000 is too large: ",
        ),
        // `--model` names the option too (it blamed vocab_size, or named nothing, while
        // its probe re-costed the plan's own prompt whatever it lowered).
        (
            &["--model", "--batch", "100000000", "--seq-len", "1000"],
            "--batch = 100000000 is too large: ",
        ),
        (
            &[
                "--model",
                "--batch",
                "100000000",
                "--seq-len",
                "1000",
                "--new-tokens",
                "0",
            ],
            "--batch = 100000000 is too large: ",
        ),
        (
            &["--model", "--num-layers", "1", "--seq-len", "100000000000"],
            "--seq-len = 100000000000 is too large: ",
        ),
        (
            &["--batch", "100000000000"],
            "--batch = 100000000000 is too large: ",
        ),
        (
            &["--config", huge.to_str().unwrap()],
            "hidden_size = 1000000000000000 (config ",
        ),
        (&["--layers", ""], "--layers = \"\" has an empty layer name"),
        (&["--layers", "MoEGate,,"], "has an empty layer name"),
    ];
    for (args, needle) in cases {
        let o = verify(&[&["--device", "cpu"], args].concat());
        assert_refused(&o, needle);
    }
}

#[test]
fn a_decode_step_with_a_huge_context_is_refused_for_memory_not_as_an_overflow() {
    // `modelmeter analyze` costs this decode step (tests/analyze_hostile.rs); verify-decoder
    // agrees the counts fit, and refuses only because it cannot fit in memory.
    let o = verify(&[
        "--device",
        "cpu",
        "--phase",
        "decode",
        "--context-len",
        "100000000",
    ]);
    assert_refused(&o, "(B=1 decode C=100000000 fp32) needs at least");
    let err = text(&o.stderr);
    assert!(
        !err.contains("overflow") && !err.contains("prefill S="),
        "{err}"
    );
    assert!(
        err.trim_end().ends_with("lower --batch or --context-len"),
        "{err}"
    );
}

/// A run that fits the machine's memory but not this process's data limit (`ulimit -d`,
/// which counts the memory the process writes, not the libraries it maps or the address
/// space glibc reserves, so a machine's cores and CUDA libraries do not move it) is
/// refused up front, the limit named, nothing written; before, the pre-check read only
/// MemAvailable and the run failed in its forward (exit 1, a libtorch allocation error).
/// Within the limit a small run passes.
#[test]
fn a_run_above_the_data_limit_is_refused_naming_it() {
    const LIMIT_KIB: u64 = 3_000_000;
    let dir = TempDir::new("ulimit");
    let json = dir.str("r.json");
    let under_limit = |seq_len: &str| {
        // The shell sets the soft limit, then becomes the binary.
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -S -d {LIMIT_KIB} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_verify-decoder"))
            // Thread stacks count: two threads whatever the machine's cores.
            .env("OMP_NUM_THREADS", "2")
            .args(["--device", "cpu", "-q", "--layers", "DeepseekV2MLP"])
            .args([
                "--seq-len",
                seq_len,
                "--json",
                &json,
                "--report-host-details",
            ])
            .output()
            .expect("sh runs");
        no_panic(o)
    };
    // The MLP at 60,000 tokens needs about 5 GiB. The refusal names the limit when it is
    // the tightest bound: when this machine (or its cgroup) has a gigabyte more than it.
    let room = modelmeter_verify::device::DeviceSpec::Cpu
        .describe()
        .memory_bytes
        .unwrap_or(0);
    let mut needles = vec!["needs about"];
    if room > LIMIT_KIB * 1024 + (1 << 30) {
        needles.extend([
            "free under this process's data-segment limit (ulimit -d) of 3072000000 bytes",
            "; or raise that limit",
        ]);
    }
    common::assert_refused(&under_limit("60000"), &needles);
    assert!(!Path::new(&json).exists());
    let o = under_limit("64");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // The host details say which bound the free memory they give is under.
    let host = &read_json(Path::new(&json))["host"];
    assert!(host["device_memory_bytes"].as_u64().unwrap() < LIMIT_KIB * 1024);
    if needles.len() > 1 {
        let bound = host["device_memory_bound"].as_str().unwrap();
        assert!(bound.contains("data-segment limit (ulimit -d)"), "{bound}");
    }
}

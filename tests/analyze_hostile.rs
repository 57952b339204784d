//! `modelmeter analyze` against hostile inputs (issue 9), and `sweep` where the two share
//! a path (standard output): an output that cannot be written, oversized and ill-typed
//! configs, and messages that name what is wrong.
//! Every run checks that nothing panicked.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelmeter"));
    cmd.arg("analyze").args(args);
    cmd
}

fn analyze(args: &[&str]) -> Output {
    no_panic(command(args).output().expect("the binary runs"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// No panic, no backtrace, no exit 101, whatever the input.
fn no_panic(o: Output) -> Output {
    let err = text(&o.stderr);
    assert!(
        !err.contains("panicked")
            && !err.contains("stack backtrace")
            && o.status.code() != Some(101),
        "{:?}: {err}",
        o.status
    );
    o
}

/// A refusal: exit 2, one line on standard error that contains every needle, nothing on
/// standard output.
fn assert_refused(o: &Output, needles: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    assert!(o.stdout.is_empty(), "nothing printed");
}

/// A fresh folder (the `tempfile` crate's), removed when dropped.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("mm-analyze-{tag}-"))
                .tempdir()
                .unwrap(),
        )
    }

    /// The folder itself.
    fn root(&self) -> &Path {
        self.0.path()
    }

    /// Writes `body` to `name` and returns its path as text.
    fn file(&self, name: &str, body: &str) -> String {
        let path = self.root().join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_string()
    }
}

/// The DeepSeek-OCR config with `extra` JSON text (`"key": value` pairs) appended.
fn fixture_with(extra: &str) -> String {
    let fixture = include_str!("../fixtures/deepseek-ocr/config.json");
    let body = fixture.trim_end().strip_suffix('}').expect("an object");
    format!("{body}, {extra}}}")
}

// Item 2: standard output that cannot be written.

/// `modelmeter sweep` with `args` (it shares analyze's output path).
fn sweep_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelmeter"));
    cmd.args(["sweep", "--vary", "seq-len=1:3"]).args(args);
    cmd
}

#[test]
fn a_full_standard_output_is_a_one_line_error() {
    let runs: [(bool, &[&str]); 5] = [
        (false, &[]),
        (false, &["--json"]),
        (true, &[]),
        (true, &["--json"]),
        (true, &["--csv"]),
    ];
    for (sweep, args) in runs {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut cmd = if sweep {
            sweep_command(args)
        } else {
            command(args)
        };
        let o = no_panic(cmd.stdout(full).output().unwrap());
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("modelmeter: error: cannot write to standard output")
                && err.contains("No space left"),
            "{err}"
        );
    }
}

#[test]
fn help_and_version_that_cannot_be_written_are_one_line_errors() {
    // clap's own printing ignored the failed write and exited 0.
    for args in [
        &["analyze", "--help"][..],
        &["sweep", "--help"],
        &["--help"],
        &["--version"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = no_panic(
            Command::new(env!("CARGO_BIN_EXE_modelmeter"))
                .args(args)
                .stdout(full)
                .output()
                .unwrap(),
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.lines().count() == 1
                && err.starts_with("modelmeter: error: cannot write to standard output"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_closed_pipe_ends_quietly() {
    // The command's standard output closed before it writes: exit 0, nothing said.
    let closed = |mut cmd: Command, what: &str| {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = no_panic(child.wait_with_output().unwrap());
        assert_eq!(o.status.code(), Some(0), "{what}: {}", text(&o.stderr));
        assert!(o.stderr.is_empty(), "{what}: {}", text(&o.stderr));
    };
    for (sweep, args) in [(false, &["--json"][..]), (false, &[]), (true, &["--csv"])] {
        let cmd = if sweep {
            sweep_command(args)
        } else {
            command(args)
        };
        closed(cmd, &format!("{args:?}"));
    }
    // Help and the version too (clap prints them; a full disk is an error, a closed pipe
    // is not).
    for args in [&["--help"][..], &["sweep", "--help"], &["--version"]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelmeter"));
        cmd.args(args);
        closed(cmd, &format!("{args:?}"));
    }
}

// Item 3: config files are read up to a bound, and parsed without huge values.

#[test]
fn endless_devices_and_huge_files_are_refused_after_a_bounded_read() {
    let dir = TempDir::new("huge");
    let huge = dir.file("huge.json", &" ".repeat(17 << 20));
    // The refusal names the bound: the read stopped there (on an endless device, it
    // would never return otherwise).
    for path in ["/dev/zero", "/dev/urandom", huge.as_str()] {
        let o = analyze(&["--config", path]);
        assert_refused(&o, &[path, "larger than 16 MiB"]);
        assert_eq!(
            text(&o.stderr).matches("larger than").count(),
            1,
            "said once"
        );
    }
}

#[test]
fn a_folder_given_as_the_config_is_refused_saying_why_once() {
    let dir = TempDir::new("folder");
    let path = dir.root().to_str().unwrap();
    let o = analyze(&["--config", path]);
    assert_refused(
        &o,
        &[path, "it is a directory; give the model's config.json"],
    );
    assert_eq!(
        text(&o.stderr).matches("is a directory").count(),
        1,
        "said once"
    );
}

#[test]
fn a_large_config_parses_in_little_memory() {
    let dir = TempDir::new("memory");
    // About 14 MiB, nearly all of it in a field modelmeter does not read.
    let zeros = "0,".repeat(7 << 20);
    let big = dir.file("big.json", &fixture_with(&format!("\"junk\": [{zeros}0]")));
    let capped = |args: &str| {
        no_panic(
            Command::new("sh")
                .arg("-c")
                .arg(format!("ulimit -v 262144 && exec \"$0\" analyze {args}"))
                .arg(env!("CARGO_BIN_EXE_modelmeter"))
                .output()
                .unwrap(),
        )
    };
    let o = capped(&format!("--json --config '{big}'"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["config"]["hidden_size"], 1280);
    // The same bulk in a field it does read is refused by size, still in bounded memory.
    let known = dir.file(
        "known.json",
        &fixture_with(&format!("\"mlp_layer_types\": [{zeros}0]")),
    );
    let o = capped(&format!("--config '{known}'"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("field mlp_layer_types holds"),
        "{}",
        text(&o.stderr)
    );
}

// Item 7 and 9: wrong JSON types, nested configs that are not objects, odd paths.

#[test]
fn wrong_json_types_and_odd_paths_are_one_line_errors() {
    let dir = TempDir::new("types");
    let cases = [
        // The field, its value, the file it is in and what is valid ({path}: the file).
        (
            include_str!("../fixtures/deepseek-ocr/config.json").replacen(
                "\"torch_dtype\": \"bfloat16\"",
                "\"torch_dtype\": 16",
                1,
            ),
            "torch_dtype = 16 (config {path}) is invalid: expected a string",
        ),
        (
            "{\"language_config\": 5}".to_string(),
            "language_config = 5 (config {path}) is invalid: expected an object",
        ),
        (
            "[0, 0, 0]".to_string(),
            "the top level is not a JSON object",
        ),
        // Another family's config (Mixtral's keys), read field by field, would give a
        // dense model of a quarter of its size: refused by its model_type.
        (
            r#"{"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000,
                "num_local_experts": 8, "num_experts_per_tok": 2}"#
                .to_string(),
            "model_type = \"mixtral\" (config {path}) is not supported: modelmeter models the \
             DeepSeek-V2 family only",
        ),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
        let path = dir.file(&format!("c{i}.json"), body);
        let needle = needle.replace("{path}", &path);
        assert_refused(&analyze(&["--config", &path]), &[&needle]);
    }
    // A byte that is not UTF-8 (Latin-1's é), in a string modelmeter does not otherwise
    // read: its model_type.
    let latin1 = dir.root().join("latin1.json");
    let fixture = include_str!("../fixtures/deepseek-v2-lite/config.json");
    let mut bytes = fixture
        .replacen("deepseek_v2", "deepseek?v2", 1)
        .into_bytes();
    let at = bytes.iter().position(|&b| b == b'?').expect("the marker");
    bytes[at] = 0xE9;
    std::fs::write(&latin1, bytes).expect("writes");
    assert_refused(
        &analyze(&["--config", latin1.to_str().expect("a UTF-8 path")]),
        &["it is not UTF-8 text (save it as UTF-8): byte 0xE9 at line 4 column "],
    );
    let newline = dir.file("a\nb.json", "{ nope");
    assert_refused(&analyze(&["--config", &newline]), &["a\\nb.json"]);
    let missing = format!("{}/no\nsuch.json", dir.root().display());
    assert_refused(&analyze(&["--config", &missing]), &["no\\nsuch.json"]);
}

#[test]
fn arguments_that_are_not_utf8_are_one_line_errors_naming_them() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bad = OsStr::from_bytes(b"\xff");
    let run = |args: &[&OsStr]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelmeter"));
        no_panic(cmd.args(args).output().expect("the binary runs"))
    };
    let (analyze, device) = (OsStr::new("analyze"), OsStr::new("--device"));
    // A value that is not UTF-8: the option it belongs to is named.
    let o = run(&[analyze, device, bad]);
    assert_refused(&o, &["argument 3", "the value of --device", "not UTF-8"]);
    // A subcommand or a stray argument that is not UTF-8 (std::env::args panicked here).
    assert_refused(&run(&[bad]), &["unrecognized subcommand"]);
    assert_refused(&run(&[OsStr::new("--x"), bad, analyze]), &["--x"]);
    // An option written with its value (`--device=…`) is not the value of the flag before
    // it.
    let joined = OsStr::from_bytes(b"--device=\xff");
    let o = run(&[analyze, OsStr::new("--json"), joined]);
    assert_refused(&o, &["argument 3 \"--device=\u{fffd}\" is not UTF-8"]);
    assert!(
        !text(&o.stderr).contains("the value of"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_bare_command_and_options_that_do_nothing_are_one_line_refusals() {
    // No subcommand: one line naming the command to give, not the whole help.
    let o = no_panic(
        Command::new(env!("CARGO_BIN_EXE_modelmeter"))
            .output()
            .expect("the binary runs"),
    );
    assert_refused(
        &o,
        &["a command is required: analyze", "see modelmeter --help"],
    );
    // --depth shapes the tables; the JSON always has the whole tree.
    assert_refused(
        &analyze(&["--json", "--depth", "3"]),
        &["'--json' cannot be used with '--depth <N>'"],
    );
}

// Item 9: overflows name the option or config field; a huge decode context is costed.

#[test]
fn overflows_name_the_option_or_field() {
    let dir = TempDir::new("overflow");
    let hidden = dir.file(
        "hidden.json",
        r#"{"hidden_size": 1000000000000000, "num_attention_heads": 4, "head_dim": 2,
            "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 5}"#,
    );
    let vocab = dir.file(
        "vocab.json",
        r#"{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8,
            "num_hidden_layers": 1, "vocab_size": 18446744073709551615}"#,
    );
    let cases: [(&[&str], &str, &str); 5] = [
        (
            &["--config", &hidden],
            "hidden_size = 1000000000000000 (config ",
            "lower hidden_size",
        ),
        (
            &["--config", &vocab],
            "vocab_size = 18446744073709551615 (config ",
            "lower vocab_size",
        ),
        (
            &["--seq-len", "10000000000"],
            "--seq-len = 10000000000 is too large: ",
            "lower --seq-len",
        ),
        (
            &["--new-tokens", "1000000000"],
            "--new-tokens = 1000000000 is too large: ",
            "lower --new-tokens",
        ),
        (
            &["--batch", "100000000000"],
            "--batch = 100000000000 is too large: ",
            "lower --batch",
        ),
    ];
    for (args, start, end) in cases {
        let o = analyze(args);
        assert_refused(&o, &[start, "would overflow 64-bit integers", end]);
    }
}

#[test]
fn a_decode_step_with_a_huge_context_is_costed() {
    // verify-decoder agrees that these counts fit; it refuses the run only for memory
    // (verify/tests/hostile.rs).
    let o = analyze(&["--phase", "decode", "--context-len", "100000000", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["workload"]["context_len"], 100_000_000);
    let kv = j["stack"]["metrics"]["kv_cache_bytes"].as_u64().unwrap();
    // 12 layers × K and V × (C + 1) × 10 heads × 128 × 2 bytes (bf16).
    assert_eq!(kv, 12 * 2 * 100_000_001 * 10 * 128 * 2);
}

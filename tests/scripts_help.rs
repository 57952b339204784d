//! The repository's shell scripts answer `--help` with their header (through
//! `scripts/script-help`, the one place that turns a header into usage text) and refuse an
//! argument they do not take with exit code 2 and a pointer to `--help`. Only the argument
//! handling runs: every case exits before the script does any work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The scripts that take `-h`/`--help`.
const SCRIPTS: [&str; 6] = [
    "bench",
    "build-device-bundle",
    "cargo-executable",
    "counter-overhead",
    "setup-libtorch",
    "script-help",
];

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(script(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"))
}

/// The script's header comment: from the line after the shebang to the first line that
/// does not start with `#`, without the comment marks.
fn header(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(script(name)).unwrap();
    text.lines()
        .skip(1)
        .take_while(|l| l.starts_with('#'))
        .map(|l| {
            let l = l.trim_start_matches('#');
            l.strip_prefix(' ').unwrap_or(l).to_string()
        })
        .collect()
}

#[test]
fn every_script_prints_its_header_for_help() {
    for name in SCRIPTS {
        let want = header(name);
        assert!(want.len() >= 2, "scripts/{name} has no usage header");
        for flag in ["-h", "--help"] {
            let out = run(name, &[flag]);
            assert_eq!(out.status.code(), Some(0), "scripts/{name} {flag}");
            let got = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                got.lines().collect::<Vec<_>>(),
                want,
                "scripts/{name} {flag}"
            );
        }
    }
}

#[test]
fn an_argument_a_script_does_not_take_is_refused_with_exit_code_2() {
    for name in SCRIPTS {
        let out = run(name, &["--no-such-option", "x"]);
        assert_eq!(out.status.code(), Some(2), "scripts/{name}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with(&format!("{name}: "))
                && err.contains(&format!("scripts/{name} --help")),
            "scripts/{name}: {err}"
        );
        assert!(out.stdout.is_empty(), "scripts/{name} wrote to stdout");
    }
}

//! `modelmeter analyze` against hostile inputs (issue 9): an output that cannot be
//! written, oversized and ill-typed configs, and messages that name what is wrong.
//! Every run checks that nothing panicked.

use std::process::{Command, Output, Stdio};

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelmeter"));
    cmd.arg("analyze").args(args);
    cmd
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

// Item 2: standard output that cannot be written.

#[test]
fn a_full_standard_output_is_a_one_line_error() {
    for json in [false, true] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let args: &[&str] = if json { &["--json"] } else { &[] };
        let o = no_panic(command(args).stdout(full).output().unwrap());
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
fn a_closed_pipe_ends_quietly() {
    for args in [&["--json"][..], &[]] {
        let mut child = command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = no_panic(child.wait_with_output().unwrap());
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    }
}

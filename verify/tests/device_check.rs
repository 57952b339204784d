//! The GPU bundle's library-path logic (`scripts/device-check --print-library-path`),
//! with a fake Python that names a fake torch: torch's lib folder must always come
//! first, and what the GPU image set (the driver's folder) must be kept.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device-check")
}

/// A fake `python3` that prints `lib` for any program (or fails when `lib` is None).
fn fake_python(tag: &str, lib: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("mm-device-check-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("python3");
    let body = match lib {
        Some(lib) => format!("#!/bin/sh\necho '{lib}'\n"),
        None => "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n"
            .to_string(),
    };
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn print_library_path(python: &Path, ld_library_path: Option<&str>) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .arg("--print-library-path")
        .env("PYTHON", python);
    match ld_library_path {
        Some(v) => cmd.env("LD_LIBRARY_PATH", v),
        None => cmd.env_remove("LD_LIBRARY_PATH"),
    };
    cmd.output().expect("bash runs device-check")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn torch_lib_alone_when_nothing_was_set() {
    let py = fake_python("unset", Some("/opt/torch/lib"));
    let o = print_library_path(&py, None);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "/opt/torch/lib");
}

#[test]
fn torch_lib_is_prepended_to_what_the_image_set() {
    let py = fake_python("set", Some("/opt/torch/lib"));
    let o = print_library_path(&py, Some("/usr/local/nvidia/lib64:/usr/local/cuda/lib64"));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&o),
        "/opt/torch/lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64"
    );
}

#[test]
fn a_python_without_torch_is_a_clear_error() {
    let py = fake_python("missing", None);
    let o = print_library_path(&py, Some("/usr/local/nvidia/lib64"));
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stdout(&o).is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("torch's lib folder"), "{err}");
}

#[test]
fn unknown_arguments_are_refused() {
    let o = Command::new("bash")
        .arg(script())
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage: device-check"));
}

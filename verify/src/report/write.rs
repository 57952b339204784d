//! Report files are written whole or not at all: to a temporary file beside the target,
//! then renamed over it.

use std::io::Write;
use std::path::Path;

/// Checks before anything runs that `path` can be written (its folder exists and is a
/// folder); the message names the option and the path.
pub fn check_writable(option: &str, path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(format!(
            "{option} {}: is a directory; give a file path",
            path.display()
        ));
    }
    if !dir.is_dir() {
        return Err(format!(
            "{option} {}: folder {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    // Probe with a temporary file beside the target: a run should not end in a write error.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let probe = dir.join(format!(".{name}.probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "{option} {}: cannot write in {}: {e}",
                path.display(),
                dir.display()
            )
        })
}

/// Writes `text` to `path` atomically.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_checks_folders() {
        let dir = std::env::temp_dir().join(format!("mm-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.json");
        write_atomically(&path, "{}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
        assert!(check_writable("--json", &path).is_ok());
        let e = check_writable("--json", &dir.join("nope/r.json")).unwrap_err();
        assert!(e.contains("--json") && e.contains("does not exist"), "{e}");
        assert!(check_writable("--junit", &dir)
            .unwrap_err()
            .contains("is a directory"));
        assert!(write_atomically(&dir.join("nope/r.json"), "x").is_err());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

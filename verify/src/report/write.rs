//! Report files are written whole or not at all, and only where a report belongs: see
//! [`Destination`](super::Destination) for how `-`, devices, FIFOs, symlinks and regular
//! files are written.

use std::path::Path;

pub use super::destination::write_atomically;
use super::destination::Destination;

/// Checks before anything runs that a report can be written at `path` (see
/// [`Destination`]); the message names the option and the path.
pub fn check_writable(option: &str, path: &Path) -> Result<(), String> {
    Destination::resolve(path)
        .and_then(|d| d.check())
        .map_err(|e| format!("{option} {}: {e}", path.display()))
}

/// Writes a report to `path`: standard output for `-`, devices and FIFOs directly, a
/// symlink's target, regular files atomically.
pub fn write_report(path: &Path, text: &str) -> std::io::Result<()> {
    Destination::resolve(path)
        .map_err(std::io::Error::other)?
        .write(text)
}

/// True when the report at `path` goes to standard output (`-`, `/dev/stdout`).
pub fn goes_to_stdout(path: &Path) -> bool {
    Destination::resolve(path).is_ok_and(|d| d.is_stdout())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_checks_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("r.json");
        write_report(&path, "{}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
        assert!(check_writable("--json", &path).is_ok());
        let e = check_writable("--json", &dir.join("nope/r.json")).unwrap_err();
        assert!(e.contains("--json") && e.contains("does not exist"), "{e}");
        assert!(check_writable("--junit", dir)
            .unwrap_err()
            .contains("is a directory"));
        let e = check_writable("--json", Path::new("out.json/")).unwrap_err();
        assert!(e.contains("--json out.json/: names a folder"), "{e}");
        assert!(write_report(&dir.join("nope/r.json"), "x").is_err());
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        assert!(goes_to_stdout(Path::new("-")) && !goes_to_stdout(&path));
    }
}

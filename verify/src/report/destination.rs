//! Where a report goes. A report path names one of four things, decided before anything
//! runs and again when the report is written:
//!
//! - standard output (`-`, `/dev/stdout`, `/dev/fd/1`, `/proc/self/fd/1`) or standard
//!   error (`/dev/stderr`, `/dev/fd/2`, `/proc/self/fd/2`): written to the process's own
//!   stream, never reopened, so `--json - | jq` and `> out.json` both work;
//! - a character device or a FIFO (`/dev/null`, a named pipe, a `/dev/fd/N` pipe from
//!   process substitution): opened and written directly, never replaced;
//! - a regular file, or a new path: written whole or not at all (a temporary file beside
//!   it, then renamed over it); an existing file the user may not write (`chmod a-w`) is
//!   refused, as `> FILE` would refuse it, although the rename could replace it;
//! - a symlink: followed to its final target, which is then one of the above; the link
//!   itself is never replaced.
//!
//! Anything else (a folder, a path ending in `/`, a block device, a socket, a folder that
//! does not exist or cannot be written) is refused with a one-line reason.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The most symlinks followed from a report path (Linux's own limit is 40).
const MAX_SYMLINKS: usize = 40;

/// Where one report is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
    /// A character device or FIFO, opened and written directly.
    Stream(PathBuf),
    /// A regular file (existing or new), replaced atomically; symlinks already followed.
    File(PathBuf),
}

/// What a destination is, for telling two roles apart: two roles may not share one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Stdout,
    Stderr,
    /// An existing file: device and inode.
    Inode(u64, u64),
    /// A path that does not exist yet: its folder's device and inode, and its name.
    New(u64, u64, std::ffi::OsString),
}

impl Destination {
    /// Decides where `path` goes. The error says why the path cannot take a report (it
    /// does not name the option; the caller adds it).
    pub fn resolve(path: &Path) -> Result<Destination, String> {
        let text = path.as_os_str().as_encoded_bytes();
        if text.is_empty() {
            return Err("is empty; give a file path, or - for standard output".into());
        }
        match text {
            b"-" | b"/dev/stdout" | b"/dev/fd/1" | b"/proc/self/fd/1" => {
                return Ok(Destination::Stdout)
            }
            b"/dev/stderr" | b"/dev/fd/2" | b"/proc/self/fd/2" => return Ok(Destination::Stderr),
            _ => {}
        }
        let folder_like = text.ends_with(b"/")
            || text.ends_with(b"/.")
            || text.ends_with(b"/..")
            || text == b"."
            || text == b"..";
        if folder_like || path.file_name().is_none() {
            return Err("names a folder (it ends in /, . or ..); give a file path".into());
        }
        match fs::metadata(path) {
            Ok(meta) => Destination::existing(path, &meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Destination::new_file(path),
            Err(e) => Err(e.to_string()),
        }
    }

    /// An existing target (symlinks followed by `metadata`).
    fn existing(path: &Path, meta: &fs::Metadata) -> Result<Destination, String> {
        let kind = meta.file_type();
        if kind.is_file() {
            // Rename over the final target, never over a symlink to it.
            let target = fs::canonicalize(path).map_err(|e| e.to_string())?;
            Ok(Destination::File(target))
        } else if kind.is_dir() {
            Err("is a directory; give a file path".into())
        } else if kind.is_char_device() || kind.is_fifo() {
            Ok(Destination::Stream(path.to_path_buf()))
        } else {
            let what = if kind.is_block_device() {
                "a block device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            Err(format!(
                "is {what}; give a file path, a character device, a FIFO or - for standard output"
            ))
        }
    }

    /// A path that does not exist: a new file at the end of its symlinks, if any.
    fn new_file(path: &Path) -> Result<Destination, String> {
        let mut target = path.to_path_buf();
        for _ in 0..MAX_SYMLINKS {
            match fs::symlink_metadata(&target) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let link = fs::read_link(&target).map_err(|e| e.to_string())?;
                    target = match target.parent() {
                        Some(dir) if link.is_relative() => dir.join(link),
                        _ => link,
                    };
                }
                Ok(_) => return Err(format!("{} changed while it was checked", target.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if target.file_name().is_none() {
                        return Err(format!(
                            "links to {}, which is not a file path",
                            target.display()
                        ));
                    }
                    let dir = folder_of(&target);
                    if !dir.is_dir() {
                        return Err(format!("folder {} does not exist", dir.display()));
                    }
                    return Ok(Destination::File(target));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!("more than {MAX_SYMLINKS} symlinks to follow"))
    }

    /// Checks, before anything runs, that the report can be written here: a file's folder
    /// takes a new file; a character device opens for writing. Nothing is left behind.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Destination::Stdout | Destination::Stderr => Ok(()),
            Destination::Stream(path) => {
                let is_fifo = fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
                if is_fifo {
                    // Opening a FIFO waits for a reader; that wait belongs to the write.
                    return Ok(());
                }
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map(drop)
                    .map_err(|e| format!("cannot open for writing: {e}"))
            }
            Destination::File(path) => {
                // The rename needs only the folder: honour the file's own protection.
                if let Err(e) = OpenOptions::new().write(true).open(path) {
                    if e.kind() == io::ErrorKind::PermissionDenied {
                        return Err(format!(
                            "is read-only ({e}); make it writable (chmod u+w) or give another path"
                        ));
                    }
                }
                let dir = folder_of(path);
                let probe = temporary_name(dir);
                // Why the folder matters: an existing report is replaced by renaming a
                // new file over it, never rewritten in place (see `write_atomically`).
                File::create(&probe)
                    .and_then(|_| fs::remove_file(&probe))
                    .map_err(|e| {
                        format!(
                            "cannot write in {} ({e}): a report is written whole to a new file in its folder and renamed into place; give a path in a folder you can create files in",
                            dir.display()
                        )
                    })
            }
        }
    }

    /// Writes `text` here: whole files atomically, streams directly. A reader that closed
    /// standard output early is not an error (the report ends quietly, as in other Unix
    /// tools).
    pub fn write(&self, text: &str) -> io::Result<()> {
        match self {
            Destination::Stdout => modelmeter::cli::print_stdout(text),
            Destination::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(text.as_bytes())?;
                err.flush()
            }
            Destination::Stream(path) => {
                let mut f = OpenOptions::new().write(true).open(path)?;
                f.write_all(text.as_bytes())?;
                f.flush()
            }
            Destination::File(path) => write_atomically(path, text),
        }
    }

    /// True for standard output.
    pub fn is_stdout(&self) -> bool {
        *self == Destination::Stdout
    }

    /// What this destination is, or `None` where two roles may share it (a character
    /// device other than standard output and error, such as `/dev/null`).
    fn identity(&self) -> Option<Identity> {
        match self {
            Destination::Stdout => Some(Identity::Stdout),
            Destination::Stderr => Some(Identity::Stderr),
            Destination::Stream(path) => {
                let meta = fs::metadata(path).ok()?;
                if meta.file_type().is_char_device() {
                    None
                } else {
                    Some(Identity::Inode(meta.dev(), meta.ino()))
                }
            }
            Destination::File(path) => match fs::metadata(path) {
                Ok(meta) => Some(Identity::Inode(meta.dev(), meta.ino())),
                Err(_) => {
                    let dir = fs::metadata(folder_of(path)).ok()?;
                    let name = path.file_name()?.to_os_string();
                    Some(Identity::New(dir.dev(), dir.ino(), name))
                }
            },
        }
    }
}

/// The input config a report must not overwrite: the `--config` file, or the source file
/// of the built-in config the binary was compiled from (when it is on this machine).
#[derive(Clone, Copy, Debug)]
pub enum ConfigFile<'a> {
    /// `--config PATH`.
    Given(&'a Path),
    /// The built-in config `name`, compiled from `source`.
    Builtin { name: &'a str, source: &'a Path },
}

impl ConfigFile<'_> {
    fn path(&self) -> &Path {
        match self {
            ConfigFile::Given(path) => path,
            ConfigFile::Builtin { source, .. } => source,
        }
    }

    fn described(&self) -> String {
        match self {
            ConfigFile::Given(path) => format!("the --config file {}", path.display()),
            ConfigFile::Builtin { name, source } => format!(
                "{}, the file built-in config {name} is compiled from",
                source.display()
            ),
        }
    }
}

/// Refuses, before anything runs, two reports with one destination (the second would
/// replace the first), a report over the input config file, and a report over the file
/// the process's standard output or error goes to (`--junit r.xml > r.xml`: the report
/// would replace what the run prints there, or the printing would land in a file the
/// report then replaced). `reports` pairs each report option with its path.
pub fn check_distinct(
    reports: &[(&str, &Path)],
    config: Option<ConfigFile<'_>>,
) -> Result<(), String> {
    let streams = [
        ("standard output", stream_identity(io::stdout().as_fd())),
        ("standard error", stream_identity(io::stderr().as_fd())),
    ];
    check_distinct_from(reports, config, &streams)
}

/// [`check_distinct`] with the identities of the process's streams given (`None` for a
/// terminal or another device, which a report cannot replace).
fn check_distinct_from(
    reports: &[(&str, &Path)],
    config: Option<ConfigFile<'_>>,
    streams: &[(&str, Option<Identity>)],
) -> Result<(), String> {
    let mut seen: Vec<(&str, &Path, Identity)> = Vec::new();
    for (option, path) in reports {
        let Some(id) = Destination::resolve(path).ok().and_then(|d| d.identity()) else {
            continue;
        };
        if let Some((first, first_path, _)) = seen.iter().find(|(_, _, i)| *i == id) {
            return Err(format!(
                "{first} {} and {option} {} are the same destination, so one report would replace the other; give each report its own path",
                first_path.display(),
                path.display()
            ));
        }
        seen.push((option, path, id));
    }
    // The files a report must not replace, each with what it is and why: the input
    // config, and the regular files the process's streams go to.
    let mut kept: Vec<(Identity, String)> = Vec::new();
    if let Some(config) = config {
        if let Some(id) = fs::metadata(config.path())
            .ok()
            .and_then(|m| file_identity(&m))
        {
            kept.push((
                id,
                format!(
                    "{}: the report would overwrite the model config; give the report another path",
                    config.described()
                ),
            ));
        }
    }
    for (stream, id) in streams {
        if let Some(id) = id {
            kept.push((
                id.clone(),
                format!(
                    "the file {stream} goes to, so the report and what the run prints there would replace each other; give the report another path or send {stream} elsewhere"
                ),
            ));
        }
    }
    for (id, what) in &kept {
        if let Some((option, path, _)) = seen.iter().find(|(_, _, i)| i == id) {
            return Err(format!("{option} {} is {what}", path.display()));
        }
    }
    Ok(())
}

/// The identity of a regular file, the only kind a report replaces (a report there is
/// written to a new file renamed over it); `None` for anything else.
fn file_identity(meta: &fs::Metadata) -> Option<Identity> {
    meta.file_type()
        .is_file()
        .then(|| Identity::Inode(meta.dev(), meta.ino()))
}

/// What a process stream is when a report could replace it: a regular file. A terminal,
/// a device or a pipe is written in place, like `--json -`, and shares nothing a report
/// could replace.
fn stream_identity(fd: BorrowedFd<'_>) -> Option<Identity> {
    file_identity(&File::from(fd.try_clone_to_owned().ok()?).metadata().ok()?)
}

/// The folder a file path is in (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A short temporary file name in `dir`, unique in this process: short so that it fits
/// wherever the target's own name fits (a file name may have at most 255 bytes).
fn temporary_name(dir: &Path) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".modelmeter-{}-{n}.tmp", std::process::id()))
}

/// Writes `text` to the regular file `path` atomically: a temporary file in the same
/// folder, synced, then renamed over `path` (keeping an existing file's permissions).
/// The temporary file is created new (never one already there, nor through a symlink
/// planted at its name in a shared folder such as /tmp). On any later error it is
/// removed and `path` is untouched.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let tmp = temporary_name(folder_of(path));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let result = (|| {
        f.write_all(text.as_bytes())?;
        if let Ok(old) = fs::metadata(path) {
            f.set_permissions(old.permissions())?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_written_through() {
        let tmp = temp_dir("planted");
        let dir = tmp.path();
        let victim = dir.join("victim");
        fs::write(&victim, "precious").unwrap();
        // The next temporary names, planted as symlinks to the victim (as another user of
        // a shared /tmp could): the write must not follow one.
        let next = temporary_name(dir);
        let n: usize = next
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.rsplit('-').next())
            .and_then(|f| f.strip_suffix(".tmp"))
            .and_then(|f| f.parse().ok())
            .unwrap();
        for k in n + 1..n + 50 {
            let name = dir.join(format!(".modelmeter-{}-{k}.tmp", std::process::id()));
            std::os::unix::fs::symlink(&victim, name).unwrap();
        }
        let target = dir.join("report.json");
        let written = write_atomically(&target, "{}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        match written {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}"),
            Ok(()) => assert_eq!(fs::read_to_string(&target).unwrap(), "{}"),
        }
    }

    /// A fresh folder, removed when dropped (even when the test fails first).
    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("mm-dest-{tag}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn special_names_are_the_process_streams() {
        for name in ["-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"] {
            assert_eq!(
                Destination::resolve(Path::new(name)),
                Ok(Destination::Stdout)
            );
        }
        assert_eq!(
            Destination::resolve(Path::new("/dev/stderr")),
            Ok(Destination::Stderr)
        );
        assert_eq!(
            Destination::resolve(Path::new("/dev/null")),
            Ok(Destination::Stream("/dev/null".into()))
        );
        assert!(Destination::resolve(Path::new("/dev/null"))
            .unwrap()
            .check()
            .is_ok());
    }

    #[test]
    fn folders_and_missing_folders_are_refused() {
        let tmp = temp_dir("folders");
        let dir = tmp.path();
        for bad in ["out.json/", "/tmp/.", ".."] {
            let e = Destination::resolve(Path::new(bad)).unwrap_err();
            assert!(e.contains("names a folder"), "{bad}: {e}");
        }
        assert!(Destination::resolve(dir)
            .unwrap_err()
            .contains("is a directory"));
        let e = Destination::resolve(&dir.join("nope/r.json")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert!(Destination::resolve(Path::new(""))
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn a_bare_file_name_goes_in_the_working_folder() {
        // `--json r.json`: the folder is `.`, which exists, not the empty path, which does
        // not (the report would be refused as "folder  does not exist").
        assert_eq!(folder_of(Path::new("r.json")), Path::new("."));
        assert_eq!(folder_of(Path::new("/r.json")), Path::new("/"));
        assert_eq!(folder_of(Path::new("a/r.json")), Path::new("a"));
        let name = Path::new("modelmeter-bare-name-that-does-not-exist.json");
        assert!(!name.exists());
        assert_eq!(
            Destination::resolve(name),
            Ok(Destination::File(name.to_path_buf()))
        );
        assert!(!name.exists(), "resolving creates nothing");
    }

    #[test]
    fn symlinks_are_followed_and_never_replaced() {
        let tmp = temp_dir("links");
        let dir = tmp.path();
        let target = dir.join("target.json");
        fs::write(&target, "old").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("target.json", &link).unwrap();
        let d = Destination::resolve(&link).unwrap();
        assert_eq!(d, Destination::File(fs::canonicalize(&target).unwrap()));
        d.check().unwrap();
        d.write("new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        // A dangling link: the new file is made at its target.
        let dangling = dir.join("dangling.json");
        std::os::unix::fs::symlink("made.json", &dangling).unwrap();
        Destination::resolve(&dangling).unwrap().write("x").unwrap();
        assert_eq!(fs::read_to_string(dir.join("made.json")).unwrap(), "x");
        assert!(fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
        // A loop is refused.
        let a = dir.join("a.json");
        std::os::unix::fs::symlink("b.json", &a).unwrap();
        std::os::unix::fs::symlink("a.json", dir.join("b.json")).unwrap();
        assert!(Destination::resolve(&a).is_err());
    }

    #[test]
    fn long_names_that_fit_are_accepted_and_written() {
        let tmp = temp_dir("long");
        let dir = tmp.path();
        let name = format!("{}.json", "r".repeat(245));
        assert_eq!(name.len(), 250);
        let d = Destination::resolve(&dir.join(&name)).unwrap();
        d.check().unwrap();
        d.write("{}").unwrap();
        assert_eq!(fs::read_to_string(dir.join(&name)).unwrap(), "{}");
        let too_long = dir.join("r".repeat(256));
        assert!(Destination::resolve(&too_long).is_err());
    }

    #[test]
    fn writes_whole_files_and_leaves_no_temporary_file() {
        let tmp = temp_dir("whole");
        let dir = tmp.path();
        let path = dir.join("r.json");
        write_atomically(&path, "{}").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        assert!(write_atomically(&dir.join("nope/r.json"), "x").is_err());
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }

    #[test]
    fn one_destination_per_role() {
        let tmp = temp_dir("distinct");
        let dir = tmp.path();
        let (a, b) = (dir.join("a.json"), dir.join("b.xml"));
        assert!(check_distinct(&[("--json", &a), ("--junit", &b)], None).is_ok());
        let e = check_distinct(&[("--json", &a), ("--junit", &a)], None).unwrap_err();
        assert!(e.contains("--json") && e.contains("--junit"), "{e}");
        let e = check_distinct(
            &[
                ("--json", Path::new("-")),
                ("--junit", Path::new("/dev/stdout")),
            ],
            None,
        )
        .unwrap_err();
        assert!(e.contains("same destination"), "{e}");
        let null = Path::new("/dev/null");
        assert!(check_distinct(&[("--json", null), ("--junit", null)], None).is_ok());
        fs::write(&a, "{}").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let e = check_distinct(&[("--json", &link)], Some(ConfigFile::Given(&a))).unwrap_err();
        assert!(e.contains("--config"), "{e}");
        let builtin = ConfigFile::Builtin {
            name: "deepseek-ocr-v1-base",
            source: &a,
        };
        let e = check_distinct(&[("--junit", &link)], Some(builtin)).unwrap_err();
        assert!(e.contains("built-in config deepseek-ocr-v1-base"), "{e}");
    }

    #[test]
    fn a_report_may_not_replace_the_file_a_stream_goes_to() {
        let tmp = temp_dir("streams");
        let dir = tmp.path();
        let out = dir.join("out.txt");
        fs::write(&out, "").unwrap();
        let meta = fs::metadata(&out).unwrap();
        let streams = [
            (
                "standard output",
                Some(Identity::Inode(meta.dev(), meta.ino())),
            ),
            ("standard error", None),
        ];
        let other = dir.join("r.json");
        let reports = [("--json", Path::new("-")), ("--junit", out.as_path())];
        let e = check_distinct_from(&reports, None, &streams).unwrap_err();
        assert!(
            e.contains("--junit") && e.contains("the file standard output goes to"),
            "{e}"
        );
        let fine = [("--json", Path::new("-")), ("--junit", other.as_path())];
        assert!(check_distinct_from(&fine, None, &streams).is_ok());
        // The process's own streams: under the test harness, never one of these files.
        assert!(check_distinct(&fine, None).is_ok());
    }
}

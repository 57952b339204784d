//! What bounds the host memory this process may take besides the machine's available
//! memory: its cgroup's memory limit (a container's or a CI job's: cgroup v2 `memory.max`,
//! v1 `memory.limit_in_bytes`) and its own resource limits (`ulimit -v`, `RLIMIT_AS`;
//! `RLIMIT_DATA`). Past a cgroup limit the kernel kills the run (exit 137, no report);
//! past an rlimit libtorch's allocations fail mid-run. The memory pre-check compares a
//! CPU run's need with the tightest of them, so such a run is refused up front instead.

use std::path::{Path, PathBuf};

/// The tightest bound below the machine's available memory, if any: how many bytes are
/// left under it and what it is, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub free_bytes: u64,
    pub what: String,
}

/// The tightest of this process's cgroup and rlimit bounds (Linux; `None` elsewhere, or
/// when none is set).
pub fn tightest() -> Option<Bound> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_bound(Path::new("/sys/fs/cgroup"), &text));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    [
        cgroup,
        rlimit_bound(Rlimit::AddressSpace, &status),
        rlimit_bound(Rlimit::Data, &status),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|b| b.free_bytes)
}

/// The bytes left under the memory limit of the cgroup a `/proc/self/cgroup` text names
/// (and of each cgroup above it up to the mount point, the tightest), with cgroups
/// mounted at `root`: the limit less what the cgroup uses, not counting its page cache
/// and reclaimable slab, which the kernel reclaims before it kills anything (as
/// MemAvailable counts them available). cgroup v2 first, then v1's memory controller.
/// Inside a cgroup namespace the mount point is the namespace's root: a limit above it
/// (a pod's, say) is not visible here.
fn cgroup_bound(root: &Path, proc_cgroup: &str) -> Option<Bound> {
    let mut v2 = None;
    let mut v1 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    let levels = |base: PathBuf, path: &str| -> Vec<PathBuf> {
        // The cgroup itself, then each parent up to the mount point.
        let mut dirs = vec![base.clone()];
        let mut dir = base;
        // A path that leaves the mount point ("/../x" outside a cgroup namespace's root)
        // is read no further than the mount point.
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if part == ".." || part == "." {
                break;
            }
            dir = dir.join(part);
            dirs.push(dir.clone());
        }
        dirs.reverse();
        dirs
    };
    let limited = |dirs: Vec<PathBuf>, limit: &str, usage: &str, reclaimable: &[&str]| {
        dirs.into_iter()
            .filter_map(|dir| {
                let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
                // "max" (v2) or v1's page-rounded i64::MAX: no limit at this level.
                let max: u64 = read(limit)?.trim().parse().ok()?;
                if max >= 1 << 62 {
                    return None;
                }
                let used: u64 = read(usage)?.trim().parse().ok()?;
                let stat = read("memory.stat").unwrap_or_default();
                let cache = reclaimable
                    .iter()
                    .filter_map(|key| stat_value(&stat, key))
                    .fold(0u64, u64::saturating_add);
                Some(Bound {
                    free_bytes: max.saturating_sub(used.saturating_sub(cache)),
                    what: format!(
                        "under its cgroup's {limit} ({}: {max} bytes)",
                        dir.join(limit).display()
                    ),
                })
            })
            .min_by_key(|b| b.free_bytes)
    };
    if let Some(path) = v2 {
        if let Some(bound) = limited(
            levels(root.to_path_buf(), path),
            "memory.max",
            "memory.current",
            &["active_file", "inactive_file", "slab_reclaimable"],
        ) {
            return Some(bound);
        }
    }
    let path = v1?;
    limited(
        levels(root.join("memory"), path),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        &["total_active_file", "total_inactive_file"],
    )
}

/// The value in KiB of the `key` line (`Key:   N kB`) of a /proc text such as
/// `/proc/meminfo` or `/proc/self/status`.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The value of `key` in a cgroup `memory.stat` text (`key value` lines).
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[derive(Clone, Copy)]
enum Rlimit {
    /// `RLIMIT_AS` (`ulimit -v`) against `VmSize`.
    AddressSpace,
    /// `RLIMIT_DATA` (`ulimit -d`) against `VmData`.
    Data,
}

/// The bytes left under an rlimit: its soft limit less what `/proc/self/status` says the
/// process holds of what it limits.
fn rlimit_bound(which: Rlimit, status: &str) -> Option<Bound> {
    let (held, what) = match which {
        Rlimit::AddressSpace => ("VmSize:", "address-space limit (ulimit -v)"),
        Rlimit::Data => ("VmData:", "data-segment limit (ulimit -d)"),
    };
    let limit = soft_limit(which)?;
    let held_kib = kib_field(status, held)?;
    Some(Bound {
        free_bytes: limit.saturating_sub(held_kib.saturating_mul(1024)),
        what: format!("under this process's {what} of {limit} bytes"),
    })
}

/// The soft limit of `which`, if finite.
#[cfg(target_os = "linux")]
fn soft_limit(which: Rlimit) -> Option<u64> {
    let resource = match which {
        Rlimit::AddressSpace => libc::RLIMIT_AS,
        Rlimit::Data => libc::RLIMIT_DATA,
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct it is given, which lives here.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

#[cfg(not(target_os = "linux"))]
fn soft_limit(_which: Rlimit) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn a_cgroup_v2_limit_is_what_is_left_under_it_less_reclaimable_memory() {
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("ci/job");
        write(&job, "memory.max", "4294967296\n");
        write(&job, "memory.current", "1073741824\n");
        write(
            &job,
            "memory.stat",
            "anon 805306368\ninactive_file 168435456\nactive_file 60000000\nslab_reclaimable 40000000\nslab_unreclaimable 1\n",
        );
        // The parent is unlimited.
        write(&root.path().join("ci"), "memory.max", "max\n");
        let b = cgroup_bound(root.path(), "0::/ci/job\n").unwrap();
        // 4 GiB − (1 GiB − 256 MiB of page cache and reclaimable slab).
        assert_eq!(b.free_bytes, 4294967296 - (1073741824 - 268435456));
        assert!(
            b.what.contains("memory.max") && b.what.contains("ci/job"),
            "{}",
            b.what
        );
        // A tighter parent binds instead.
        write(&root.path().join("ci"), "memory.max", "2147483648\n");
        write(&root.path().join("ci"), "memory.current", "2000000000\n");
        let b = cgroup_bound(root.path(), "0::/ci/job\n").unwrap();
        assert_eq!(b.free_bytes, 147483648);
        // No limit anywhere: none.
        let free = tempfile::tempdir().unwrap();
        write(&free.path().join("x"), "memory.max", "max\n");
        assert_eq!(cgroup_bound(free.path(), "0::/x\n"), None);
        assert_eq!(cgroup_bound(free.path(), "0::/\n"), None);
    }

    #[test]
    fn a_cgroup_v1_memory_controller_limit_is_read_too() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("memory/docker/abc");
        write(&dir, "memory.limit_in_bytes", "3221225472\n");
        write(&dir, "memory.usage_in_bytes", "1073741824\n");
        write(
            &dir,
            "memory.stat",
            "cache 0\ntotal_inactive_file 53741824\ntotal_active_file 20000000\n",
        );
        // v1's "unlimited" is a page-rounded i64::MAX at the root.
        write(
            &root.path().join("memory"),
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        let text = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n";
        let b = cgroup_bound(root.path(), text).unwrap();
        assert_eq!(b.free_bytes, 3221225472 - (1073741824 - 73741824));
        assert!(b.what.contains("memory.limit_in_bytes"), "{}", b.what);
        // This machine's layout: v1 memory controller without a limit.
        let text = "4:memory:/process_api/d3\n0::/\n";
        let unlimited = tempfile::tempdir().unwrap();
        write(
            &unlimited.path().join("memory/process_api/d3"),
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(cgroup_bound(unlimited.path(), text), None);
    }

    #[test]
    fn odd_cgroup_lines_and_paths_are_read_no_further_than_the_mount() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "memory.max", "1000\n");
        write(root.path(), "memory.current", "400\n");
        // A malformed line is skipped, not the whole file.
        let b = cgroup_bound(root.path(), "garbage\n0::/\n").unwrap();
        assert_eq!(b.free_bytes, 600);
        // "/../x" stops at the mount point: the root's limit, nothing outside it read.
        let b = cgroup_bound(root.path(), "0::/../x\n").unwrap();
        assert_eq!(b.free_bytes, 600);
    }

    #[test]
    fn stat_values_are_found_by_their_whole_key() {
        let stat = "total_inactive_file 5\ninactive_file 7\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(7));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(5));
        assert_eq!(stat_value(stat, "active_file"), None);
    }
}

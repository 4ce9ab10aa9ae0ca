//! How much memory the server may still use: the machine's `MemAvailable`, bounded by the
//! memory limit of the control group it runs in.
//!
//! Exists because the default KV-cache budget is a share of this figure, and inside a container
//! (Docker `--memory`, a Kubernetes `resources.limits.memory`, a systemd `MemoryMax=`) the host's
//! `/proc/meminfo` tells the host's memory, not the limit past which the kernel kills the
//! process.

use std::path::Path;

/// Bytes the process can still allocate: the least of `MemAvailable` and, for its control group
/// and every ancestor with a limit, that limit less what the group uses. `None` when
/// `/proc/meminfo` cannot be read.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = mem_available(&info)?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Some(match cgroup_headroom(Path::new("/sys/fs/cgroup"), &cgroups) {
        Some(headroom) => available.min(headroom),
        None => available,
    })
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The least headroom (limit less usage) over the process's control group and its ancestors,
/// under the cgroup mount `root`, from the text of `/proc/self/cgroup`; `None` when no group
/// on the way sets a limit.
///
/// cgroup v2 (`0::/path`): `memory.max` (`max` for none) and `memory.current` in
/// `root/path` and each parent folder. cgroup v1 (`N:memory:/path`): `memory.limit_in_bytes`
/// and `memory.usage_in_bytes` under `root/memory`. In a container with its own cgroup
/// namespace the path is `/` and the files at the top of the mount are the container's own.
pub fn cgroup_headroom(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (base, limit_file, usage_file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            if let Some(limit) = read_number(&dir.join(limit_file)) {
                let used = read_number(&dir.join(usage_file)).unwrap_or(0);
                let headroom = limit.saturating_sub(used);
                least = Some(least.map_or(headroom, |l| l.min(headroom)));
            }
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    least
}

/// A cgroup number file; `None` for `max`, a v1 "no limit" value (close to `i64::MAX`) or a
/// missing file.
fn read_number(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let n: u64 = text.trim().parse().ok()?;
    (n < 1 << 60).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(files: &[(&str, &str)]) -> tempfile_dir::Dir {
        let dir = tempfile_dir::Dir::new();
        for (path, text) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn v2_container_with_a_limit() {
        let d = tree(&[("memory.max", "8589934592\n"), ("memory.current", "1073741824\n")]);
        assert_eq!(cgroup_headroom(d.path(), "0::/\n"), Some(7 << 30));
    }

    #[test]
    fn v2_limit_on_an_ancestor_counts() {
        let d = tree(&[
            ("system.slice/memory.max", "4294967296"),
            ("system.slice/memory.current", "1073741824"),
            ("system.slice/phi.service/memory.max", "max"),
            ("system.slice/phi.service/memory.current", "536870912"),
        ]);
        assert_eq!(cgroup_headroom(d.path(), "0::/system.slice/phi.service"), Some(3 << 30));
    }

    #[test]
    fn no_limit_anywhere() {
        let d = tree(&[("memory.max", "max"), ("memory.current", "5")]);
        assert_eq!(cgroup_headroom(d.path(), "0::/"), None);
        let d = tree(&[("memory/memory.limit_in_bytes", "9223372036854771712")]);
        assert_eq!(cgroup_headroom(d.path(), "4:memory:/\n3:cpu,cpuacct:/"), None);
        assert_eq!(cgroup_headroom(Path::new("/nonexistent"), "0::/"), None);
    }

    #[test]
    fn v1_memory_controller() {
        let d = tree(&[
            ("memory/docker/abc/memory.limit_in_bytes", "2147483648"),
            ("memory/docker/abc/memory.usage_in_bytes", "1073741824"),
        ]);
        let cgroup = "12:cpuset:/docker/abc\n4:memory:/docker/abc\n";
        assert_eq!(cgroup_headroom(d.path(), cgroup), Some(1 << 30));
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(text), Some(20_000_000 * 1024));
        assert!(available_memory().is_some());
    }

    /// A temporary folder removed on drop (std only, no extra crate).
    mod tempfile_dir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("phi-serve-cgroup-test-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}

//! Resource alarms, as RabbitMQ raises them: memory above the high
//! watermark, or free disk space below the limit. While one is on,
//! connections that publish are sent `connection.blocked` and their sockets
//! are not read; consumers keep draining. When both clear, they are sent
//! `connection.unblocked` and reading resumes.
//!
//! Memory is the process's resident set as the kernel counts it (what the
//! OOM killer sees), read from `/proc/self/status`.

use std::path::Path;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

impl AlarmState {
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason sent in `connection.blocked` (RabbitMQ's wording).
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// The alarm state, watched by every connection.
pub struct Alarms {
    tx: watch::Sender<AlarmState>,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms { tx: watch::channel(AlarmState::default()).0 }
    }
}

impl Alarms {
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.tx.subscribe()
    }

    pub fn state(&self) -> AlarmState {
        *self.tx.borrow()
    }

    /// Sets one alarm; returns whether it changed.
    pub fn set(&self, memory: Option<bool>, disk: Option<bool>) -> bool {
        self.tx.send_if_modified(|state| {
            let before = *state;
            if let Some(memory) = memory {
                state.memory = memory;
            }
            if let Some(disk) = disk {
                state.disk = disk;
            }
            *state != before
        })
    }
}

/// The process's resident set size in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
}

/// The soft limit on open files (`ulimit -n`), from `/proc/self/limits`.
pub fn max_open_files() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    max_open_files_in(&limits)
}

fn max_open_files_in(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Open file descriptors, and how many of them are sockets.
pub fn open_fds_and_sockets() -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return (0, 0) };
    let mut fds = 0;
    let mut sockets = 0;
    for entry in dir.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    (fds, sockets)
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Memory available to this process: the machine's, or its cgroup's limit
/// if lower.
pub fn total_memory() -> Option<u64> {
    let machine = kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")?;
    let cgroup =
        std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|text| text.trim().parse::<u64>().ok());
    Some(cgroup.map_or(machine, |limit| limit.min(machine)))
}

/// Free space for unprivileged writers on the file system holding `path`.
pub fn disk_free(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Raises the soft limit on open files to the hard one (distributions
/// often start services at 1024, fewer than a busy broker's sockets plus
/// its log segments); returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited".
    let below = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_read_from_procs_table() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63414                63414                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files_in(limits), Some(1024));
        assert!(max_open_files().is_some_and(|n| n > 0));
        let (fds, sockets) = open_fds_and_sockets();
        assert!(fds >= 3 && sockets <= fds);
    }

    #[test]
    fn readings_are_plausible() {
        let rss = resident_bytes().unwrap();
        let total = total_memory().unwrap();
        assert!(rss > 1 << 20 && rss < total, "rss {rss}, total {total}");
        assert!(disk_free(&std::env::temp_dir()).is_some());
        assert_eq!(kib_field("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234 * 1024));
    }

    #[test]
    fn alarms_change_only_when_a_flag_does() {
        let alarms = Alarms::default();
        let mut rx = alarms.subscribe();
        assert!(!alarms.set(Some(false), None));
        assert!(alarms.set(Some(true), None));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().reason(), "low on memory");
        assert!(alarms.set(None, Some(true)));
        assert_eq!(alarms.state().reason(), "low on memory and disk");
        assert!(alarms.set(Some(false), Some(false)));
        assert!(!alarms.state().any());
    }
}

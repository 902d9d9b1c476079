//! The memory this process may use: its cgroup's limit (in a pod, the container's memory
//! limit), else the machine's memory. The prefix cache's default budget is a share of it, so a
//! pod that sets no budget still keeps the cache within what its limit leaves.

/// Where the cgroup limit is read: v2 (one hierarchy), then v1's memory controller. In a
/// container both are the container's own cgroup.
const CGROUP_LIMIT_FILES: [&str; 2] = [
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
];

/// A byte count and where it came from, for the start-up log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The limit.
    pub bytes: u64,
    /// `cgroup` or `machine`.
    pub source: &'static str,
}

/// The tighter of the cgroup's limit and the machine's memory; `None` when neither can be read.
pub fn memory_limit() -> Option<MemoryLimit> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|text| mem_total(&text));
    let cgroup = CGROUP_LIMIT_FILES
        .iter()
        .find_map(|path| read(path).and_then(|text| cgroup_limit(&text)));
    pick(cgroup, machine)
}

fn pick(cgroup: Option<u64>, machine: Option<u64>) -> Option<MemoryLimit> {
    match (cgroup, machine) {
        // cgroup v1 writes "no limit" as a number near 2^63: larger than the machine.
        (Some(cgroup), Some(machine)) if cgroup >= machine => Some(MemoryLimit {
            bytes: machine,
            source: "machine",
        }),
        (Some(bytes), _) => Some(MemoryLimit {
            bytes,
            source: "cgroup",
        }),
        (None, Some(bytes)) => Some(MemoryLimit {
            bytes,
            source: "machine",
        }),
        (None, None) => None,
    }
}

/// A cgroup limit file's value: a byte count, or `max` (v2) for none.
fn cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_limit_wins_over_the_machine_and_no_limit_means_the_machine() {
        let gib = 1 << 30;
        assert_eq!(
            pick(cgroup_limit("1073741824\n"), Some(24 * gib)),
            Some(MemoryLimit {
                bytes: gib,
                source: "cgroup"
            })
        );
        // v2 without a limit; v1 without a limit.
        for text in ["max\n", "9223372036854771712\n"] {
            assert_eq!(
                pick(cgroup_limit(text), Some(24 * gib)),
                Some(MemoryLimit {
                    bytes: 24 * gib,
                    source: "machine"
                }),
                "{text}"
            );
        }
        assert_eq!(pick(None, None), None);
    }

    #[test]
    fn reads_mem_total() {
        let meminfo = "MemTotal:       24731400 kB\nMemFree:        1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_731_400 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn this_process_has_a_limit() {
        // Every Linux machine has /proc/meminfo.
        assert!(memory_limit().is_some_and(|l| l.bytes > 0));
    }
}

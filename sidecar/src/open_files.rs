//! The process's limit on open files, which bounds the connections it can hold: raised to the
//! hard limit at start (as Go's runtime does), then shared out so that a flood of API
//! connections can never take the descriptors the admin port's probes need.
#![allow(unsafe_code)]

/// Descriptors kept for everything but client connections: stdio, the runtime's epoll and event
/// descriptors, the model file, the config watcher's and the Kubernetes client's connections
/// (about 20 in all, measured), and the refused connections being answered (16).
pub const RESERVED: u64 = 64;

/// Connections the admin listener holds at most: probes and scrapes come from a few clients.
pub const ADMIN_CONNECTIONS: usize = 32;

/// API connections held at most when the open-file limit leaves room for more.
pub const DEFAULT_API_CONNECTIONS: usize = 4096;

/// The soft limit is never raised past this, even under an unlimited hard limit.
const CEILING: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard one (at most [`CEILING`]) and returns the
/// limit in force afterwards; `None` where it cannot be read.
pub fn raise_to_hard_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given, which lives here.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        let wanted = limit.rlim_max.min(CEILING);
        if wanted > limit.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit only reads the struct it is given, which lives here.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                return Some(wanted);
            }
        }
        Some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    None
}

/// API connections an open-file limit of `nofile` leaves room for: each may hold a second
/// descriptor (a forward to another variant), after the admin listener's and the reserve.
pub fn api_connections(nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return DEFAULT_API_CONNECTIONS;
    };
    let spare = nofile.saturating_sub(RESERVED + ADMIN_CONNECTIONS as u64) / 2;
    usize::try_from(spare)
        .unwrap_or(usize::MAX)
        .clamp(1, DEFAULT_API_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_connections_leave_the_admin_port_its_share() {
        assert_eq!(api_connections(Some(128)), 16);
        assert_eq!(api_connections(Some(1024)), 464);
        assert_eq!(api_connections(Some(1 << 20)), DEFAULT_API_CONNECTIONS);
        assert_eq!(api_connections(Some(10)), 1);
        assert_eq!(api_connections(None), DEFAULT_API_CONNECTIONS);
    }

    #[test]
    fn the_limit_in_force_is_read() {
        let limit = raise_to_hard_limit().expect("readable on unix");
        assert!(limit >= 16, "{limit}");
    }
}

//! Thread scheduling priority: the engine's kernel threads run below the threads that serve
//! HTTP, so that a streamed token, an admission or a probe never waits for a kernel's time
//! slice. Only the sharing among this process's own threads changes: in a container the
//! scheduler weighs the container's cgroup as a whole against the rest of the node.
#![allow(unsafe_code)]

/// Sets the calling thread's nice value (Linux keeps one per thread). Raising it needs no
/// privilege. Elsewhere than Linux it does nothing.
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes no pointers. On Linux, PRIO_PROCESS with id 0 names the
        // calling thread, not the whole process.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn a_thread_lowers_its_own_priority_and_no_other() {
        let nice_of = |tid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            // Field 19 (nice) counts from after the parenthesised command name.
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            after_name
                .split(' ')
                .nth(16)
                .unwrap()
                .parse::<i32>()
                .unwrap()
        };
        let before = nice_of(std::process::id() as i32);
        let lowered = std::thread::spawn(move || {
            super::set_current_thread_nice(before + 5).unwrap();
            nice_of(gettid())
        })
        .join()
        .unwrap();
        assert_eq!(lowered, before + 5);
        assert_eq!(nice_of(std::process::id() as i32), before);
    }

    #[cfg(target_os = "linux")]
    fn gettid() -> i32 {
        // /proc/thread-self links to /proc/<pid>/task/<tid>.
        std::fs::read_link("/proc/thread-self")
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

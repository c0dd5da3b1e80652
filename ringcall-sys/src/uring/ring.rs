//! Ring setup and its diagnosis: a ring with the fastest flags this kernel accepts, the
//! check that this host can run the `uring` backend, why it cannot, and queueing an entry.

use std::io;

use io_uring::{IoUring, squeue};

use super::pool::BufferPool;

/// Submission queue entries; the completion queue is sized larger so bursts of multishot
/// completions do not overflow it.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries.
pub const CQ_ENTRIES: u32 = 16 * 1024;

/// Queues `entry` on `ring`, submitting first while the submission queue is full.
///
/// # Safety
/// Every buffer `entry` points to must stay valid and unmoved until its completion.
pub unsafe fn push_entry(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: the caller keeps the entry's buffers alive until it completes.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Creates a ring with the fastest flags this kernel accepts.
pub fn build_ring() -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = None;
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES).setup_submit_all();
        configure(&mut builder);
        match builder.build(SQ_ENTRIES) {
            Ok(ring) => return Ok(ring),
            // EINVAL: a flag this kernel does not know; try fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring_setup failed")))
}

/// Checks that this host can run the `uring` backend: a ring and a provided-buffer ring.
pub fn probe() -> io::Result<()> {
    let ring = build_ring()?;
    BufferPool::new(&ring, 0).map(drop)
}

/// Why io_uring setup failed, and what to do about it.
pub fn diagnose(err: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match err.raw_os_error() {
        Some(libc::ENOSYS) => {
            "The kernel has no io_uring (built without CONFIG_IO_URING, or older than 5.19 \
             for multishot and buffer rings). Use --backend epoll."
                .into()
        }
        Some(libc::EPERM) | Some(libc::EACCES) => match disabled {
            Some(2) => "io_uring is disabled by sysctl kernel.io_uring_disabled=2. \
                 Set it to 0 (sysctl -w kernel.io_uring_disabled=0) or use --backend epoll."
                .into(),
            Some(1) => "sysctl kernel.io_uring_disabled=1 allows io_uring only to the group in \
                 kernel.io_uring_group. Add this user to it, set the sysctl to 0, or use --backend epoll."
                .into(),
            _ => "A seccomp profile blocks io_uring (Docker's and many container runtimes' default \
                 profiles do). Allow io_uring_setup/io_uring_enter/io_uring_register in the profile \
                 or use --backend epoll."
                .into(),
        },
        Some(libc::ENOMEM) => "Not enough locked memory for the ring and its buffers \
             (RLIMIT_MEMLOCK, `ulimit -l`, is 8 MiB by default). Raise it (ulimit -l unlimited, or \
             LimitMEMLOCK=infinity in a systemd unit) or run fewer --threads."
            .into(),
        _ => "Use --backend epoll on this host.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_failures_name_the_cause_and_the_fix() {
        let hint = |errno| diagnose(&io::Error::from_raw_os_error(errno));
        assert!(hint(libc::ENOSYS).contains("--backend epoll"));
        assert!(hint(libc::ENOMEM).contains("RLIMIT_MEMLOCK"));
        let denied = hint(libc::EPERM);
        assert!(denied.contains("seccomp") || denied.contains("io_uring_disabled"), "{denied}");
        assert!(denied.contains("--backend epoll"));
    }
}

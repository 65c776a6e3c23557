//! The runtime layer's small helpers: the one place that starts glommio executors.
//!
//! glommio locks memory for its io_uring rings; the default `RLIMIT_MEMLOCK` of many
//! machines (8 MiB) is too small for several executors, so the limit is raised first.

use std::future::Future;

/// Raises `RLIMIT_MEMLOCK` to at least `bytes` (as far as the hard limit allows, or
/// further when running as root). Returns the soft limit in force afterwards.
pub fn raise_memlock_limit(bytes: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur >= bytes {
            return limit.rlim_cur;
        }
        let wanted = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: limit.rlim_max.max(bytes),
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) == 0 {
            return bytes;
        }
        let capped = libc::rlimit {
            rlim_cur: limit.rlim_max.min(bytes),
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &capped) == 0 {
            return capped.rlim_cur;
        }
        limit.rlim_cur
    }
}

/// Runs `make()` to completion on a fresh glommio executor in its own thread.
pub fn run_local<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    raise_memlock_limit(512 << 20);
    glommio::LocalExecutorBuilder::default()
        .name("ringkv-local")
        .spawn(make)
        .expect("start a glommio executor (is RLIMIT_MEMLOCK large enough?)")
        .join()
        .expect("glommio executor thread")
}

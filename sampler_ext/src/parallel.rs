//! The sampler's second core: one helper thread, kept by rayon, that joins a call's work.
//!
//! A step of a 262,144-token row is a few hundred microseconds, and waking a parked thread costs
//! 15 to 50 of them on this kind of VM: so the calling thread never waits for the helper to start.
//! It begins the work itself, the helper takes a share of what is left when it arrives, and work
//! is handed out in chunks from a shared counter, so a late helper only does less.
//! With one core, or in a child forked after the helper started (which has no such thread), the
//! caller does all the work alone.

use std::sync::OnceLock;

struct Helper {
    pool: rayon::ThreadPool,
    /// The process that started the helper: a forked child shares the pool's memory, not its thread.
    pid: u32,
}

fn helper() -> Option<&'static rayon::ThreadPool> {
    static HELPER: OnceLock<Option<Helper>> = OnceLock::new();
    let helper = HELPER.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "sampler-helper".into())
            .build()
            .ok()
            .map(|pool| Helper {
                pool,
                pid: std::process::id(),
            })
    });
    helper
        .as_ref()
        .filter(|h| h.pid == std::process::id())
        .map(|h| &h.pool)
}

/// Whether a second thread can take part.
pub fn available() -> bool {
    helper().is_some()
}

/// Runs `work` on this thread and on the helper at once, and returns when both have returned;
/// `work` must share out its own work (each call takes what is left). Without a helper, runs it
/// once here.
pub fn on_both<F: Fn() + Sync>(work: F) {
    match helper() {
        Some(pool) => pool.in_place_scope(|scope| {
            scope.spawn(|_| work());
            work();
        }),
        None => work(),
    }
}

/// `(a(), b())`, `b` on the helper when there is one.
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA,
    B: FnOnce() -> RB + Send,
    RB: Send,
{
    match helper() {
        Some(pool) => {
            let mut second = None;
            let first = pool.in_place_scope(|scope| {
                scope.spawn(|_| second = Some(b()));
                a()
            });
            // The scope has joined the spawned closure, which always sets `second`.
            let second = second.unwrap_or_else(|| unreachable!("the scope ran b"));
            (first, second)
        }
        None => (a(), b()),
    }
}

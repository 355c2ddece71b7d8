//! Giving freed memory back to the system. glibc's allocator keeps what the program freed
//! in its arenas (it returns only the top of a heap), so after a burst (a resync listing
//! thousands of keys, many streams at once) an idle agent stays at its peak. Every
//! [`EVERY`] the agent asks it to return every free page (`malloc_trim(0)`): a walk over
//! the arenas that takes about a millisecond for the agent's heap.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free memory is given back.
pub(crate) const EVERY: Duration = Duration::from_secs(10);

/// Asks the allocator to return its free pages; whether it returned any.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn release() -> bool {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointer, reads no caller memory and locks the arenas it
    // walks like any other allocator call; glibc provides it on every supported version.
    unsafe { malloc_trim(0) == 1 }
}

/// Elsewhere (musl, other systems) allocators return memory themselves: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release() -> bool {
    false
}

/// Gives free memory back every [`EVERY`] until `shutdown`.
pub(crate) async fn keep_releasing(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // Off the async threads: the walk locks each arena in turn.
        match tokio::task::spawn_blocking(release).await {
            Ok(released) => tracing::trace!(released, "asked the allocator for free memory"),
            Err(e) => tracing::debug!(error = %e, "releasing free memory failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_memory_can_be_released() {
        // A burst of small allocations, freed while a later one stays: the pages below it
        // are free, but glibc gives back only the top of a heap by itself.
        let burst: Vec<Vec<u8>> = (0..20_000).map(|i| vec![1; 200 + i % 50]).collect();
        let kept: Vec<u8> = std::iter::repeat_n(2, 100).collect();
        drop(burst);
        let released = super::release();
        assert_eq!(kept[0], 2);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "glibc gave the burst's pages back");
        }
    }
}

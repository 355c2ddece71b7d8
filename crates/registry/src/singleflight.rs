//! Single flight: concurrent callers asking for the same key share one run of the work.
//! (A tag revalidation, a manifest fetch: one upstream request however many ask at once.)

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

/// One run of work, shared by its callers, with an id telling runs apart.
type Run<V> = (u64, Shared<BoxFuture<'static, V>>);

/// Runs of work in flight, by key.
pub struct SingleFlight<K, V: Clone> {
    calls: Mutex<HashMap<K, Run<V>>>,
    next: AtomicU64,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl<K, V: Clone> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V: Clone + Send + Sync + 'static> SingleFlight<K, V> {
    /// The result of the run for `key` in flight, or of a new run of `work`; the flag is
    /// true when this caller joined a run another started. The work goes on as long as any
    /// caller waits for it.
    pub async fn run(&self, key: K, work: impl FnOnce() -> BoxFuture<'static, V>) -> (V, bool) {
        let (id, fut, joined) = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            match calls.get(&key) {
                Some((id, f)) => (*id, f.clone(), true),
                None => {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    let f = work().shared();
                    calls.insert(key.clone(), (id, f.clone()));
                    (id, f, false)
                }
            }
        };
        let value = fut.await;
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if calls.get(&key).is_some_and(|(i, _)| *i == id) {
            calls.remove(&key);
        }
        (value, joined)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_ones_start_anew() {
        let flights: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let call = |flights: Arc<SingleFlight<&'static str, usize>>, runs: Arc<AtomicUsize>| async move {
            flights
                .run("k", || {
                    async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    }
                    .boxed()
                })
                .await
        };
        let all =
            futures_util::future::join_all((0..8).map(|_| call(flights.clone(), runs.clone())))
                .await;
        assert!(all.iter().all(|(v, _)| *v == 1), "{all:?}");
        assert_eq!(all.iter().filter(|(_, joined)| !joined).count(), 1);
        let (v, joined) = call(flights.clone(), runs.clone()).await;
        assert_eq!((v, joined), (2, false), "a later call runs the work again");
    }
}

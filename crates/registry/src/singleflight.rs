//! Single flight: concurrent callers asking for the same key share one run of the work.
//! (A tag revalidation, a manifest fetch: one upstream request however many ask at once.)

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

/// One run of work, shared by its callers, with an id telling runs apart.
type Run<V> = (u64, Shared<BoxFuture<'static, Option<V>>>);

/// Runs of work in flight, by key.
pub struct SingleFlight<K, V: Clone> {
    calls: Arc<Mutex<HashMap<K, Run<V>>>>,
    next: AtomicU64,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            calls: Arc::new(Mutex::new(HashMap::new())),
            next: AtomicU64::new(0),
        }
    }
}

impl<K, V: Clone> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight").finish_non_exhaustive()
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of the run for `key` in flight, or of a new run of `work`; the flag is
    /// true when this caller joined a run another started. The work runs as a task of its
    /// own, to completion whoever stops waiting (so nothing it holds, a token lock say, is
    /// left hanging by a caller that went away); `None` if it panicked.
    pub async fn run(
        &self,
        key: K,
        work: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> (Option<V>, bool) {
        let (fut, joined) = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            match calls.get(&key) {
                Some((_, f)) => (f.clone(), true),
                None => {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    let (calls_ref, task_key, job) = (self.calls.clone(), key.clone(), work());
                    let task = tokio::spawn(async move {
                        let value = job.await;
                        let mut calls = calls_ref.lock().unwrap_or_else(PoisonError::into_inner);
                        if calls.get(&task_key).is_some_and(|(i, _)| *i == id) {
                            calls.remove(&task_key);
                        }
                        value
                    });
                    let f = async move { task.await.ok() }.boxed().shared();
                    calls.insert(key, (id, f.clone()));
                    (f, false)
                }
            }
        };
        (fut.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
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
        assert!(all.iter().all(|(v, _)| *v == Some(1)), "{all:?}");
        assert_eq!(all.iter().filter(|(_, joined)| !joined).count(), 1);
        let (v, joined) = call(flights.clone(), runs.clone()).await;
        assert_eq!(
            (v, joined),
            (Some(2), false),
            "a later call runs the work again"
        );

        // A caller that goes away does not stop the work (nor leave it half done).
        let started = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (s2, d2) = (started.clone(), done.clone());
        let abandoned = flights.run("k", move || {
            async move {
                s2.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                d2.fetch_add(1, Ordering::SeqCst);
                7
            }
            .boxed()
        });
        let _ = tokio::time::timeout(Duration::from_millis(10), abandoned).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1, "finished on its own");
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }
}

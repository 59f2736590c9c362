//! A bounded pool for decisions whose cost grows with the request: those
//! that carry their own entities (`entities_json`). Ordinary decisions are
//! microseconds and run where the call arrives, on the async workers; a
//! request at the limits (a thousand entities, a hierarchy 32 deep, ten
//! thousand ancestor pairs) takes milliseconds, and two heavy requests once
//! held both workers of a 2-core machine while ordinary calls waited. Here
//! such work runs on `heavy_workers` threads of the pool's own, and at most
//! `heavy_queue` more wait for one; beyond that a call is shed at once with
//! `RESOURCE_EXHAUSTED`, rather than queued without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use tonic::Status;

type Job = Box<dyn FnOnce() + Send>;

/// The admission control and the pool's own threads, shared by every
/// service. The threads run at the lowest priority the kernel gives a
/// normal thread (`SCHED_BATCH`, nice 19): on a busy machine they get what
/// ordinary calls leave, and still make progress (`SCHED_IDLE` could starve
/// them behind any other process).
#[derive(Debug, Clone)]
pub struct HeavyPool {
    jobs: SyncSender<Job>,
    /// Calls admitted (queued or running).
    admitted: Arc<AtomicUsize>,
    max_admitted: usize,
}

/// Takes back an admission when the call ends, or is dropped by its
/// client while it waits.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HeavyPool {
    /// `workers` threads (at least one) and `queue` more calls waiting.
    /// The threads end when the last clone of the pool is dropped.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(queue + workers);
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..workers {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("arbiter-heavy-{index}"))
                .spawn(move || work(&receiver));
            if let Err(error) = spawned {
                tracing::error!(target: "arbiter::adapter", %error, "cannot start a heavy-request thread");
            }
        }
        HeavyPool {
            jobs,
            admitted: Arc::new(AtomicUsize::new(0)),
            max_admitted: workers + queue,
        }
    }

    /// Runs `work` on one of the pool's threads, or sheds the call when the
    /// threads and the queue are full. A call whose client is gone by the
    /// time a thread takes it is not run.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.max_admitted {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(shed(self.max_admitted));
        }
        let _admission = Admission(&self.admitted);
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if !answer.is_closed() {
                let _ = answer.send(work());
            }
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(shed(self.max_admitted)),
            Err(TrySendError::Disconnected(_)) => {
                return Err(Status::unavailable("the heavy-request threads are gone"));
            }
        }
        answered
            .await
            .map_err(|_| Status::internal("the decision failed on a heavy-request thread"))
    }
}

fn shed(max: usize) -> Status {
    metrics::counter!("arbiter_requests_shed_total", "reason" => "heavy_queue").increment(1);
    Status::resource_exhausted(format!(
        "too many requests with their own entities in flight ({max}; `heavy_workers` + `heavy_queue`): retry later"
    ))
}

/// One pool thread: lowest priority, then jobs until the pool is dropped.
fn work(receiver: &Mutex<Receiver<Job>>) {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    if let Err(error) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
    ) {
        tracing::warn!(target: "arbiter::adapter", ?error, "heavy-request thread keeps normal priority");
    }
    loop {
        let job = {
            let receiver = receiver.lock().unwrap_or_else(PoisonError::into_inner);
            receiver.recv()
        };
        let Ok(job) = job else { return };
        // A panic in one decision (Cedar's or ours) must not take the
        // thread with it: the caller gets an error, the thread goes on.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!(target: "arbiter::adapter", "a decision panicked on a heavy-request thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_at_most_workers_at_once_and_sheds_beyond_the_queue() {
        let pool = HeavyPool::new(1, 1);
        let (release, held) = mpsc::channel::<()>();
        let held = Arc::new(std::sync::Mutex::new(held));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        // The first call holds the only worker until released.
        let first = {
            let pool = pool.clone();
            let held = held.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    held.lock().unwrap().recv().unwrap();
                    1
                })
                .await
            })
        };
        started.await.unwrap();
        // The second waits in the queue; the third is shed at once.
        let second = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 2).await })
        };
        while pool.admitted.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let third = pool.run(|| 3).await.unwrap_err();
        assert_eq!(third.code(), tonic::Code::ResourceExhausted);
        assert!(third.message().contains("heavy_queue"), "{third:?}");
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        // Everything admitted was given back.
        assert_eq!(pool.admitted.load(Ordering::Acquire), 0);
        assert_eq!(pool.run(|| 4).await.unwrap(), 4);
    }
}

//! Background writers that keep the checkpoint's syncs off an epoch's path.
//!
//! An epoch makes two small durable writes besides its state and output: its plan, and its
//! commit (whose lane also syncs the state files and a Parquet directory's file). Each
//! is a file sync and a directory sync, which take half a millisecond on an idle disk. On a
//! disk the Kafka broker writes to as well, a sync waits for the journal commit that carries
//! the broker's writes too, and took 45–240 ms at times: those waits were the tail of the
//! Kafka path's latency. A [`Lane`] is one thread that makes the writes it is given in the
//! order it was given them, so the driver hands a write over, goes on, and waits for it only
//! where the protocol needs it durable (see [`crate::stream`]).
//!
//! After a write fails, a lane makes no more: every later one fails too. A commit must never
//! land after an earlier epoch's failed one (its output may not be on the broker), since a
//! restart resumes after the last commit.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::error::{Result, RiffleError};

type Job = Box<dyn FnOnce() -> Result<()> + Send>;

/// The outcome of a write handed to a [`Lane`]; see [`done`].
pub(crate) type Pending = oneshot::Receiver<Result<()>>;

/// A thread making writes one after another, in the order they were submitted, until one
/// fails.
pub(crate) struct Lane {
    jobs: Option<mpsc::Sender<(Job, oneshot::Sender<Result<()>>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Lane {
    /// Starts the thread, named `name` (as `top -H` and a debugger show it).
    ///
    /// # Errors
    /// The thread could not be started.
    pub(crate) fn new(name: &str) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<(Job, oneshot::Sender<Result<()>>)>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut failed = false;
                for (job, reply) in queue {
                    let outcome = if failed {
                        Err(RiffleError::Internal(
                            "not written: an earlier checkpoint write failed".into(),
                        ))
                    } else {
                        job()
                    };
                    failed |= outcome.is_err();
                    // The driver may have stopped waiting (it failed): the write is made anyway.
                    let _ = reply.send(outcome);
                }
            })
            .map_err(|e| RiffleError::Internal(format!("starting the {name} thread: {e}")))?;
        Ok(Lane {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues `job` behind the writes submitted before it.
    pub(crate) fn submit(&self, job: impl FnOnce() -> Result<()> + Send + 'static) -> Pending {
        let (reply, pending) = oneshot::channel();
        if let Some(jobs) = &self.jobs
            && let Err(mpsc::SendError((_, reply))) = jobs.send((Box::new(job), reply))
        {
            // The thread is gone (it panicked in an earlier write): say so to the waiter.
            let _ = reply.send(Err(stopped()));
        }
        pending
    }
}

/// Waits for a submitted write.
///
/// # Errors
/// The write's own error, or [`RiffleError::Internal`] if the lane's thread died in it.
pub(crate) async fn done(pending: &mut Pending) -> Result<()> {
    pending.await.map_err(|_| stopped())?
}

/// Waits for a submitted write from a thread outside the async runtime (another lane's).
///
/// # Errors
/// As [`done`].
pub(crate) fn wait_blocking(pending: Pending) -> Result<()> {
    pending.blocking_recv().map_err(|_| stopped())?
}

/// The write's outcome if it is known without waiting.
pub(crate) fn poll(pending: &mut Pending) -> Option<Result<()>> {
    match pending.try_recv() {
        Ok(result) => Some(result),
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => Some(Err(stopped())),
    }
}

fn stopped() -> RiffleError {
    RiffleError::Internal("a checkpoint writer thread stopped in a write".into())
}

impl Drop for Lane {
    /// Makes the writes still queued before returning: none is left half done behind a query
    /// that stopped, and the next run's checkpoint lock is not taken while this one writes.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn writes_run_in_submission_order_until_one_fails() {
        let lane = Lane::new("test-lane").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut pending: Vec<Pending> = (0..50)
            .map(|i| {
                let seen = seen.clone();
                lane.submit(move || {
                    seen.lock().unwrap().push(i);
                    if i == 7 {
                        Err(RiffleError::Internal("write 7 failed".into()))
                    } else {
                        Ok(())
                    }
                })
            })
            .collect();
        for (i, p) in pending.iter_mut().enumerate() {
            let outcome = done(p).await;
            assert_eq!(outcome.is_err(), i >= 7, "write {i}: {outcome:?}");
            if i > 7 {
                let err = outcome.unwrap_err().to_string();
                assert!(err.contains("an earlier checkpoint write failed"), "{err}");
            }
        }
        assert_eq!(*seen.lock().unwrap(), (0..=7).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_write_that_panics_is_an_error_for_it_and_every_later_one() {
        let lane = Lane::new("test-lane").unwrap();
        let mut first = lane.submit(|| panic!("disk on fire"));
        let err = done(&mut first).await.unwrap_err();
        assert!(err.to_string().contains("writer thread stopped"), "{err}");
        let mut later = lane.submit(|| Ok(()));
        assert!(done(&mut later).await.is_err());
    }

    #[test]
    fn dropping_the_lane_makes_the_queued_writes_first() {
        let seen = Arc::new(Mutex::new(0));
        {
            let lane = Lane::new("test-lane").unwrap();
            for _ in 0..20 {
                let seen = seen.clone();
                drop(lane.submit(move || {
                    std::thread::yield_now();
                    *seen.lock().unwrap() += 1;
                    Ok(())
                }));
            }
        }
        assert_eq!(*seen.lock().unwrap(), 20);
    }
}

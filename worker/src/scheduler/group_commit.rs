//! Group commit: the small writes of many concurrent send tasks (the "call started" marks,
//! the "sent" records) go to the database in one transaction per group instead of one each.
//!
//! Each commit waits for a WAL flush, and with one transaction per send the flushes, not the
//! statements, bounded the scheduler (BENCHMARKS.md). A [`GroupCommit`] runs up to
//! `parallel` batches at a time, each on its own connection: while they commit, the next
//! requests queue up and go together in the next one, so under load a group grows by itself
//! and at low load a request commits alone, at once. More than one batch at a time lets the
//! database run one group's statements while another waits for its flush; requests of one
//! batch never depend on another's (each send task waits for its own write before the next),
//! and lock order inside a batch is the batch function's to keep (see `call_start`).
//!
//! A failed batch is applied again one request at a time, so that a request that always
//! fails cannot take the others of its group down with it.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::store::StoreError;

/// Applies a group of requests in one transaction and returns one result per request, in
/// order.
pub type ApplyBatch<Req, Resp> =
    Arc<dyn Fn(Vec<Req>) -> BoxFuture<'static, Result<Vec<Resp>, StoreError>> + Send + Sync>;

type Reply<Resp> = oneshot::Sender<Result<Resp, String>>;

/// A queue of writes applied in groups by one background task (see the module doc).
pub struct GroupCommit<Req, Resp> {
    queue: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
    name: &'static str,
}

impl<Req, Resp> GroupCommit<Req, Resp>
where
    Req: Clone + Send + 'static,
    Resp: Send + 'static,
{
    /// Starts the task that applies groups of at most `max_batch` requests with `apply`, at
    /// most `parallel` groups at once (each on its own connection). It ends when this handle
    /// is dropped and the queue is empty.
    pub fn start(
        name: &'static str,
        max_batch: usize,
        parallel: usize,
        apply: ApplyBatch<Req, Resp>,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(name, max_batch.max(1), parallel.max(1), apply, rx));
        Self { queue, name }
    }

    /// Queues `req` and waits until its group has committed (or failed).
    pub async fn submit(&self, req: Req) -> Result<Resp, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((req, reply))
            .map_err(|_| StoreError::Group(format!("the {} writer has stopped", self.name)))?;
        match answer.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(message)) => Err(StoreError::Group(message)),
            Err(_) => Err(StoreError::Group(format!(
                "the {} writer stopped before answering",
                self.name
            ))),
        }
    }
}

async fn run<Req, Resp>(
    name: &'static str,
    max_batch: usize,
    parallel: usize,
    apply: ApplyBatch<Req, Resp>,
    mut rx: mpsc::UnboundedReceiver<(Req, Reply<Resp>)>,
) where
    Req: Clone + Send + 'static,
    Resp: Send + 'static,
{
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            // Finished groups first: a free place is what lets the next group start.
            biased;
            Some(_) = running.join_next(), if !running.is_empty() => {}
            first = rx.recv(), if running.len() < parallel => {
                let Some(first) = first else { break };
                let mut group = vec![first];
                while group.len() < max_batch {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                running.spawn(apply_group(name, apply.clone(), group));
            }
            else => break,
        }
    }
    while running.join_next().await.is_some() {}
}

/// Applies one group and answers each of its requests (see the module doc for a failure).
async fn apply_group<Req: Clone, Resp>(
    name: &'static str,
    apply: ApplyBatch<Req, Resp>,
    group: Vec<(Req, Reply<Resp>)>,
) {
    let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) = group.into_iter().unzip();
    let n = reqs.len();
    match apply(reqs.clone()).await {
        Ok(resps) if resps.len() == n => {
            for (reply, resp) in replies.into_iter().zip(resps) {
                let _ = reply.send(Ok(resp));
            }
        }
        Ok(resps) => {
            let message = format!(
                "{name}: {} results for {n} requests (a bug in the batch function)",
                resps.len()
            );
            tracing::error!("{message}");
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
        Err(e) if n == 1 => {
            for reply in replies {
                let _ = reply.send(Err(e.to_string()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, size = n, "{name}: a group failed; applying its requests one by one");
            for (req, reply) in reqs.into_iter().zip(replies) {
                let result = match apply(vec![req]).await {
                    Ok(mut one) if one.len() == 1 => one.pop().ok_or_else(String::new),
                    Ok(_) => Err(format!("{name}: wrong number of results")),
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Every group the apply function was called with.
    type Groups = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Multiplies by ten; fails any group holding `poison`.
    fn recording(poison: u32) -> (ApplyBatch<u32, u32>, Groups) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let apply: ApplyBatch<u32, u32> = Arc::new(move |reqs: Vec<u32>| {
            let log = log.clone();
            Box::pin(async move {
                // Long enough for the other tasks to queue behind the first group.
                tokio::task::yield_now().await;
                log.lock().expect("log").push(reqs.clone());
                if reqs.contains(&poison) {
                    return Err(StoreError::Group(format!("poison {poison}")));
                }
                Ok(reqs.iter().map(|r| r * 10).collect())
            })
        });
        (apply, seen)
    }

    /// Submits 0..n from n concurrent tasks; returns each request with its answer.
    async fn submit_all(
        group: &Arc<GroupCommit<u32, u32>>,
        n: u32,
    ) -> Vec<(u32, Result<u32, StoreError>)> {
        let tasks: Vec<_> = (0..n)
            .map(|k| {
                let group = group.clone();
                tokio::spawn(async move { (k, group.submit(k).await) })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("task"));
        }
        answers
    }

    #[tokio::test]
    async fn concurrent_requests_share_groups_and_each_gets_its_own_answer() {
        let (apply, seen) = recording(u32::MAX);
        let group = Arc::new(GroupCommit::start("test", 16, 1, apply));
        for (k, answer) in submit_all(&group, 40).await {
            assert_eq!(answer.expect("answer"), k * 10);
        }
        let groups = seen.lock().expect("log").clone();
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 40);
        assert!(groups.iter().all(|g| g.len() <= 16), "{groups:?}");
        assert!(groups.len() < 40, "requests were grouped: {groups:?}");
    }

    #[tokio::test]
    async fn groups_run_in_parallel_up_to_the_bound() {
        // Each group waits until two groups are inside the apply function at once: with one
        // group at a time this never happens and the requests would never be answered.
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let apply: ApplyBatch<u32, u32> = Arc::new(move |reqs: Vec<u32>| {
            let barrier = barrier.clone();
            Box::pin(async move {
                barrier.wait().await;
                Ok(reqs)
            })
        });
        let group = Arc::new(GroupCommit::start("test", 1, 2, apply));
        let both = submit_all(&group, 2);
        let answers = tokio::time::timeout(std::time::Duration::from_secs(30), both)
            .await
            .expect("two groups were applied at the same time");
        assert!(answers.iter().all(|(k, a)| a.as_ref().ok() == Some(k)));
    }

    #[tokio::test]
    async fn a_request_that_fails_does_not_fail_the_others_of_its_group() {
        let (apply, seen) = recording(7);
        let group = Arc::new(GroupCommit::start("test", 64, 1, apply));
        for (k, answer) in submit_all(&group, 20).await {
            if k == 7 {
                let e = answer.expect_err("poison fails");
                assert!(e.to_string().contains("poison 7"), "{e}");
            } else {
                assert_eq!(answer.expect("answer"), k * 10);
            }
        }
        let groups = seen.lock().expect("log").clone();
        assert!(
            groups.iter().any(|g| g == &vec![7]),
            "the poison request was retried alone: {groups:?}"
        );
    }
}

//! The attempts of one call that are out at once (a first attempt and its hedges, or a
//! retry beside a hedge), raced: the HTTP client and the tower service share this loop's
//! waiting, and each handles an attempt's end in its own terms.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

/// The attempts out, each with what it was started with (`M`: its guard, its instance).
pub(crate) struct Race<M, F> {
    running: Vec<(M, Pin<Box<F>>)>,
}

/// What [`Race::next`] waited for.
pub(crate) enum Next<M, O> {
    /// An attempt ended: what it was started with, and its output.
    Ended(M, O),
    /// The hedge's time came before any attempt ended.
    Hedge,
}

impl<M, F: Future> Race<M, F> {
    pub(crate) fn new() -> Self {
        Race {
            running: Vec::new(),
        }
    }

    /// Starts racing `attempt` (it runs only while [`next`](Self::next) is awaited).
    pub(crate) fn push(&mut self, meta: M, attempt: F) {
        self.running.push((meta, Box::pin(attempt)));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// The first attempt to end, taken out of the race, or [`Next::Hedge`] at `hedge_at`
    /// (never, with `None`). An attempt that has ended wins over a hedge that is due. With no
    /// attempt out, only the hedge's time ends the wait. Dropping the race drops the attempts
    /// still out: their guards count them as cancelled.
    pub(crate) async fn next(&mut self, hedge_at: Option<Instant>) -> Next<M, F::Output> {
        let running = &mut self.running;
        // At most `max_attempts` are out, so polling each on every wake-up costs little.
        let ended = std::future::poll_fn(|cx| {
            for i in 0..running.len() {
                if let Poll::Ready(out) = running[i].1.as_mut().poll(cx) {
                    let (meta, _) = running.swap_remove(i);
                    return Poll::Ready((meta, out));
                }
            }
            Poll::Pending
        });
        // Without a hedge to wait for, no timer is made (calls that never hedge pay for none).
        let Some(at) = hedge_at else {
            let (meta, out) = ended.await;
            return Next::Ended(meta, out);
        };
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(at));
        tokio::select! {
            biased;
            (meta, out) = ended => Next::Ended(meta, out),
            () = timer => Next::Hedge,
        }
    }
}

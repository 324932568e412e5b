//! Watching a service with blocking queries, following Consul's rules for them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::{info, warn, Instrument, Span};
use waypost_core::{Error, InstanceSet, ServiceName, Watch, WatchEvent};

use crate::api::{Api, HealthAnswer, HealthQuery};
use crate::backoff::TokenBucket;
use crate::feed::{Feed, Wait};
use waypost_core::Backoff;

/// The index to send next, given the one sent and the one returned.
///
/// A returned 0 counts as 1 (an index of 0 would turn the blocking query into a busy loop);
/// an index that went backwards (snapshot restore, leader change, agent restart) resets to 0,
/// meaning "read afresh without blocking".
pub(crate) fn next_index(sent: u64, returned: Option<u64>) -> u64 {
    let returned = returned.unwrap_or(0).max(1);
    if returned < sent {
        0
    } else {
        returned
    }
}

pub(crate) struct WatchConfig {
    pub query: HealthQuery,
    pub wait: Duration,
    pub rate_limit: (u32, Duration),
}

struct State {
    api: Arc<Api>,
    service: ServiceName,
    query: HealthQuery,
    wait: Duration,
    index: u64,
    delivered: InstanceSet,
    pending: VecDeque<Result<WatchEvent, Error>>,
    bucket: TokenBucket,
    backoff: Backoff,
    /// Set after an error: wait this long before the next query.
    delay: Option<Duration>,
    /// Whether the last return brought no real change, so the next query must take a token.
    throttle: bool,
    /// Failed queries in a row (0 while healthy).
    failures: u32,
    /// When the current run of failures began.
    failing_since: Option<tokio::time::Instant>,
    /// `watch` {service, backend}: every item is produced inside it.
    span: Span,
    /// A blocking query of its own, or wakes from the client's shared feed.
    waits: Wait,
}

/// The watch owns a handle on the connection: it runs for as long as its stream is held, even
/// after the `Consul` that made it is dropped.
pub(crate) fn watch(
    api: Arc<Api>,
    feed: &Arc<Feed>,
    service: ServiceName,
    cfg: WatchConfig,
) -> Watch {
    let waits = feed.wait_for();
    // The same span as every backend's watch; whether it is on the shared watch is logged
    // once, at debug, when it subscribes.
    let span = tracing::info_span!("watch", service = %service, backend = crate::BACKEND);
    let state = State {
        backoff: api.backoff(),
        api,
        service,
        query: cfg.query,
        wait: cfg.wait,
        index: 0,
        delivered: InstanceSet::new(),
        pending: VecDeque::new(),
        bucket: TokenBucket::new(
            cfg.rate_limit.0,
            cfg.rate_limit.1,
            tokio::time::Instant::now(),
        ),
        delay: None,
        throttle: false,
        failures: 0,
        failing_since: None,
        span,
        waits,
    };
    futures::stream::unfold(state, |mut st| async move {
        let span = st.span.clone();
        let item = st.next_item().instrument(span).await?;
        Some((item, st))
    })
    .boxed()
}

impl State {
    /// The next item. Never `None`: the watch ends only when its stream is dropped.
    async fn next_item(&mut self) -> Option<Result<WatchEvent, Error>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if let Some(delay) = self.delay.take() {
                tokio::time::sleep(delay).await;
            }
            if self.throttle {
                self.bucket.take().await;
            }
            // A query after an error reconnects and resyncs: its own span, so that the error,
            // the retries and the recovery read as one story.
            let span = if self.failures > 0 {
                tracing::info_span!("resync", attempt = self.failures)
            } else {
                Span::none()
            };
            let (sent, answer) = match &mut self.waits {
                Wait::Blocking { .. } => {
                    let sent = self.index;
                    let answer = self
                        .api
                        .health(&self.service, &self.query, sent, self.wait)
                        .instrument(span.clone())
                        .await;
                    (sent, answer)
                }
                Wait::Shared { feed, subscription } => {
                    let sub = match subscription {
                        Some(sub) => sub,
                        None => {
                            let sub = subscription.insert(feed.subscribe(&self.service));
                            sub.baseline(self.api.request_timeout).await;
                            sub
                        }
                    };
                    // After a good answer, wait for the feed to name this service (or for
                    // `wait`, when a blocking query would have returned); after an error, retry
                    // at once (the backoff's delay has passed).
                    if self.index > 0 && self.failures == 0 {
                        sub.woken(self.wait).await;
                    }
                    sub.seen();
                    let _permit = sub.fetch_permit().await;
                    let answer = self
                        .api
                        .health(&self.service, &self.query, 0, self.wait)
                        .instrument(span.clone())
                        .await;
                    (0, answer)
                }
            };
            span.in_scope(|| self.handle(sent, answer));
        }
    }

    /// Takes in the answer to the query sent with index `sent`.
    fn handle(&mut self, sent: u64, answer: Result<HealthAnswer, Error>) {
        match answer {
            Ok(answer) => {
                if self.failures > 0 {
                    let down_for = self.failing_since.take().map(|t| t.elapsed());
                    info!(service = %self.service, failures = self.failures, ?down_for, "consul watch recovered");
                    self.failures = 0;
                }
                self.backoff.reset();
                self.index = next_index(sent, answer.index);
                if self.index == 0 {
                    warn!(service = %self.service, sent, returned = ?answer.index, "consul index went backwards; reading afresh");
                }
                // A return is not a change: tell only the real difference.
                let events = self.delivered.sync(answer.instances);
                self.throttle = events.is_empty();
                self.pending.extend(events.into_iter().map(Ok));
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                warn!(service = %self.service, retry_in = ?delay, "consul watch failed: {e}; keeping the last known instances");
                self.failures = self.failures.saturating_add(1);
                self.failing_since
                    .get_or_insert_with(tokio::time::Instant::now);
                // The next good answer then ends with Synced, changed or not.
                self.delivered.interrupted();
                // The server may have restarted with a lower index, and some servers block on
                // an index they have not reached yet: start over with a fresh read (the diff
                // keeps the events to the real difference).
                self.index = 0;
                self.delay = Some(delay);
                self.throttle = false;
                self.pending.push_back(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        // First read, then blocking on what came back.
        assert_eq!(next_index(0, Some(42)), 42);
        assert_eq!(next_index(42, Some(42)), 42);
        assert_eq!(next_index(42, Some(50)), 50);
        // Backwards: reset to 0 (a fresh, non-blocking read).
        assert_eq!(next_index(50, Some(7)), 0);
        // Never below 1: 0 or a missing index counts as 1.
        assert_eq!(next_index(0, Some(0)), 1);
        assert_eq!(next_index(1, Some(0)), 1);
        assert_eq!(next_index(0, None), 1);
    }
}

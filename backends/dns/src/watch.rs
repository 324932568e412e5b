//! The polling watch: DNS has no push, so a watch asks every poll interval and tells only the
//! difference from what it delivered.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use tracing::{debug, info, warn, Instrument, Span};
use waypost_core::{Backoff, Error, InstanceSet, ServiceName, Watch, WatchEvent};

use crate::{lookup, Inner, BACKEND};

struct Poller {
    inner: Arc<Inner>,
    service: ServiceName,
    delivered: InstanceSet,
    pending: VecDeque<Result<WatchEvent, Error>>,
    backoff: Backoff,
    /// How long to wait before the next question (none before the first).
    delay: Option<std::time::Duration>,
    /// Failed questions in a row (0 while healthy).
    failures: u32,
    /// When the current run of failures began.
    failing_since: Option<tokio::time::Instant>,
    /// `watch` {service, backend}: every poll runs inside it.
    span: Span,
}

/// A watch of `service`. It holds the DNS client: it runs for as long as its stream is held, also
/// after the [`Dns`](crate::Dns) that made it is dropped.
pub(crate) fn watch(inner: Arc<Inner>, service: ServiceName) -> Watch {
    let span = tracing::info_span!("watch", service = %service, backend = BACKEND);
    let (min, max) = inner.backoff;
    let poller = Poller {
        backoff: Backoff::new(min, max),
        inner,
        service,
        delivered: InstanceSet::new(),
        pending: VecDeque::new(),
        delay: None,
        failures: 0,
        failing_since: None,
        span,
    };
    futures::stream::unfold(poller, |mut p| async move {
        let span = p.span.clone();
        let item = p.next_item().instrument(span).await;
        Some((item, p))
    })
    .boxed()
}

impl Poller {
    /// The next item. The watch never ends by itself.
    async fn next_item(&mut self) -> Result<WatchEvent, Error> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            if let Some(delay) = self.delay.take() {
                tokio::time::sleep(delay).await;
            }
            let answer = lookup::instances(&self.inner, &self.service).await;
            self.handle(answer);
        }
    }

    fn handle(&mut self, answer: Result<Vec<waypost_core::ServiceInstance>, Error>) {
        match answer {
            Ok(instances) => {
                if self.failures > 0 {
                    let down_for = self.failing_since.take().map(|t| t.elapsed());
                    info!(service = %self.service, failures = self.failures, ?down_for, "dns watch recovered");
                    self.failures = 0;
                }
                self.backoff.reset();
                debug!(service = %self.service, instances = instances.len(), "dns answer");
                // An unchanged answer says nothing; after an error, the difference ends with
                // Synced.
                self.pending
                    .extend(self.delivered.sync(instances).into_iter().map(Ok));
                self.delay = Some(self.inner.poll_interval);
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                warn!(service = %self.service, retry_in = ?delay, error = %e, "dns watch failed; keeping the last known instances");
                self.failures = self.failures.saturating_add(1);
                self.failing_since
                    .get_or_insert_with(tokio::time::Instant::now);
                // The next good answer then ends with Synced, changed or not; what was
                // delivered stays (an error is never an empty set).
                self.delivered.interrupted();
                self.delay = Some(delay);
                self.pending.push_back(Err(e));
            }
        }
    }
}

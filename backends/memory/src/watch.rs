//! The watch stream: re-reads a service whenever its change signal fires and tells only the
//! difference from what it delivered.

use std::collections::VecDeque;
use std::sync::Weak;

use futures::stream::{self, StreamExt};
use tokio::sync::watch;
use tracing::{Instrument, Span};
use waypost_core::{Error, InstanceSet, ServiceName, Watch, WatchEvent};

use crate::state::Inner;

struct Watcher {
    inner: Weak<Inner>,
    service: ServiceName,
    changes: watch::Receiver<()>,
    delivered: InstanceSet,
    queue: VecDeque<Result<WatchEvent, Error>>,
    /// Whether the last read failed, so that an outage is reported once, not on every signal.
    failing: bool,
    started: bool,
    /// `watch` {service, backend}: every item is produced inside it.
    span: Span,
}

impl Watcher {
    /// Waits for the next change (none for the first read) and queues what to tell. Returns
    /// `false` when the backend is gone, which ends the stream.
    async fn read(&mut self) -> bool {
        if self.started && self.changes.changed().await.is_err() {
            return false;
        }
        self.started = true;
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        // The re-read after an outage is the resync: its own span.
        let span = if self.failing {
            tracing::info_span!("resync")
        } else {
            Span::none()
        };
        span.in_scope(|| match inner.list(&self.service) {
            Ok(current) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(service = %self.service, "memory watch recovered");
                }
                self.queue
                    .extend(self.delivered.sync(current).into_iter().map(Ok));
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(service = %self.service, error = %e, "memory watch failed; keeping the last known instances");
                    self.failing = true;
                    self.delivered.interrupted();
                    self.queue.push_back(Err(e));
                }
            }
        });
        true
    }
}

/// A watch of `service`. The change signal is taken before the first read, so nothing that
/// happens in between is missed.
pub(crate) fn watch(inner: &std::sync::Arc<Inner>, service: &ServiceName) -> Watch {
    let watcher = Watcher {
        inner: std::sync::Arc::downgrade(inner),
        service: service.clone(),
        changes: inner.subscribe(service),
        delivered: InstanceSet::new(),
        queue: VecDeque::new(),
        failing: false,
        started: false,
        span: tracing::info_span!("watch", service = %service, backend = crate::BACKEND),
    };
    stream::unfold(watcher, |mut w| {
        // Every log line of the watch carries its service and backend.
        let span = w.span.clone();
        async move {
            loop {
                if let Some(item) = w.queue.pop_front() {
                    return Some((item, w));
                }
                if !w.read().await {
                    return None;
                }
            }
        }
        .instrument(span)
    })
    .boxed()
}

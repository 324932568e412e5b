//! Finding the instances of a service, now and as they change.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Error;
use crate::event::Watch;
use crate::instance::{ServiceInstance, ServiceName};

/// Looks up the healthy instances of a service, once or continuously.
///
/// A watch starts with a [`WatchEvent::Snapshot`](crate::WatchEvent::Snapshot) delivered as
/// soon as the backend answered (not after a poll period), then delivers only changes. It never
/// ends on a backend error: it yields the error, backs off, and resumes, telling only the real
/// difference from what it delivered before. It ends when the stream is dropped.
///
/// ```
/// use futures::{stream, StreamExt};
/// use waypost_core::{Discovery, Error, ServiceInstance, ServiceName, Watch, WatchEvent};
///
/// /// A discovery with one fixed instance.
/// struct Fixed(ServiceInstance);
///
/// #[async_trait::async_trait]
/// impl Discovery for Fixed {
///     async fn instances(&self, _: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
///         Ok(vec![self.0.clone()])
///     }
///     fn watch(&self, _: &ServiceName) -> Watch {
///         let first = Ok(WatchEvent::Snapshot(vec![self.0.clone()]));
///         stream::iter([first]).chain(stream::pending()).boxed()
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let inst = ServiceInstance::builder("users", "u1").host("10.0.0.1").port(80).build()?;
/// let d = Fixed(inst);
/// let name: ServiceName = "users".parse()?;
/// assert_eq!(d.instances(&name).await?.len(), 1);
/// let mut watch = d.watch(&name);
/// assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(v))) if v.len() == 1));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait Discovery: Send + Sync {
    /// The healthy instances of `service` now, sorted by id.
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error>;

    /// A stream of the instances of `service`: a snapshot, then changes. See the trait docs.
    fn watch(&self, service: &ServiceName) -> Watch;
}

#[async_trait]
impl<T: Discovery + ?Sized> Discovery for Arc<T> {
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
        (**self).instances(service).await
    }
    fn watch(&self, service: &ServiceName) -> Watch {
        (**self).watch(service)
    }
}

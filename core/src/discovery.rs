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
    /// The healthy instances of `service` now, sorted by id. A service nobody registered has
    /// none: `Ok` with an empty list, not an error (the conformance suite's `unknown_service`
    /// holds every backend to it). An `Err` says that the backend could not answer.
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use waypost_core::{async_trait, Discovery, Error, InstanceSet, ServiceInstance, ServiceName, Watch};
    ///
    /// /// The instances of one service, held in-process.
    /// struct Static {
    ///     service: ServiceName,
    ///     set: InstanceSet,
    /// }
    ///
    /// #[async_trait]
    /// impl Discovery for Static {
    ///     async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
    ///         // An InstanceSet keeps its instances by id: they come out sorted.
    ///         Ok(if *service == self.service { self.set.instances() } else { Vec::new() })
    ///     }
    ///     fn watch(&self, _: &ServiceName) -> Watch {
    ///         stream::pending().boxed()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let inst = |id: &str| ServiceInstance::builder("users", id).host("10.0.0.1").port(80).build();
    /// let mut set = InstanceSet::new();
    /// set.sync([inst("b")?, inst("a")?]);
    /// let d = Static { service: "users".parse()?, set };
    ///
    /// let ids: Vec<String> = d.instances(&"users".parse()?).await?.iter().map(|i| i.id().to_string()).collect();
    /// assert_eq!(ids, ["a", "b"]);
    /// assert!(d.instances(&"orders".parse()?).await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    async fn instances(&self, service: &ServiceName) -> Result<Vec<ServiceInstance>, Error>;

    /// A stream of the instances of `service`: a [`Snapshot`](crate::WatchEvent::Snapshot)
    /// and [`Synced`](crate::WatchEvent::Synced), then only changes. See the trait docs.
    ///
    /// A backend that learns the whole set at a time (a poll, a re-list after a reconnect)
    /// turns each answer into these events with an [`InstanceSet`](crate::InstanceSet):
    ///
    /// ```
    /// use futures::{stream, StreamExt, TryStreamExt};
    /// use waypost_core::{async_trait, Discovery, Error, InstanceSet, ServiceInstance, ServiceName, Watch, WatchEvent};
    ///
    /// /// A backend that answered twice: `a`, then `a` and `b`.
    /// struct TwoAnswers(Vec<ServiceInstance>, Vec<ServiceInstance>);
    ///
    /// #[async_trait]
    /// impl Discovery for TwoAnswers {
    ///     async fn instances(&self, _: &ServiceName) -> Result<Vec<ServiceInstance>, Error> {
    ///         Ok(self.1.clone())
    ///     }
    ///     fn watch(&self, _: &ServiceName) -> Watch {
    ///         let mut delivered = InstanceSet::new();
    ///         let mut events = delivered.sync(self.0.clone());
    ///         events.extend(delivered.sync(self.1.clone()));
    ///         // A watch ends only when it is dropped.
    ///         stream::iter(events.into_iter().map(Ok)).chain(stream::pending()).boxed()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let a = ServiceInstance::builder("users", "a").host("10.0.0.1").port(80).build()?;
    /// let b = ServiceInstance::builder("users", "b").host("10.0.0.2").port(80).build()?;
    /// let d = TwoAnswers(vec![a.clone()], vec![a.clone(), b.clone()]);
    ///
    /// let events: Vec<WatchEvent> = d.watch(&"users".parse()?).take(3).try_collect().await?;
    /// assert_eq!(events, [WatchEvent::Snapshot(vec![a]), WatchEvent::Synced, WatchEvent::Added(b)]);
    /// # Ok(())
    /// # }
    /// ```
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

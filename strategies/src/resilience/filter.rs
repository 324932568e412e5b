//! Which instances a balancer may use at all.

use waypost_core::ServiceInstance;

/// A hard requirement on instances: all of some tags, some metadata values, one of some zones.
/// Applied when the instance set changes, not per pick; instances that fail it are never picked
/// (if none passes, picks fail with `PickError::NoneFits`). The empty filter passes everything.
///
/// ```
/// use waypost_core::ServiceInstance;
/// use waypost_strategies::resilience::Filter;
///
/// let canary = Filter::new().tag("v2").tag("canary").meta("lane", "blue").zone("eu-1a");
/// let inst = ServiceInstance::builder("users", "u1").host("h").port(1)
///     .tags(["v2", "canary", "http"]).meta("lane", "blue").zone("eu-1a").build()?;
/// assert!(canary.matches(&inst));
/// assert!(!Filter::new().tag("v3").matches(&inst));
/// assert!(Filter::new().matches(&inst));
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Filter {
    tags: Vec<String>,
    metadata: Vec<(String, String)>,
    zones: Vec<String>,
}

impl Filter {
    /// Passes everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires `tag` (in addition to every tag required before).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Requires metadata `key` to equal `value` (in addition to the pairs required before).
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Allows zone `zone`; once any zone is given, an instance must be in one of them.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zones.push(zone.into());
        self
    }

    /// Whether the filter passes everything.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.metadata.is_empty() && self.zones.is_empty()
    }

    /// Whether `instance` passes.
    pub fn matches(&self, instance: &ServiceInstance) -> bool {
        self.tags.iter().all(|t| instance.has_tag(t))
            && self
                .metadata
                .iter()
                .all(|(k, v)| instance.metadata().get(k) == Some(v))
            && (self.zones.is_empty()
                || instance
                    .zone()
                    .is_some_and(|z| self.zones.iter().any(|allowed| allowed == z)))
    }
}

//! A service instance and the validated names it is made of.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Field, Problem, ValidationError};

const NAME_MAX: usize = 128;
const HOST_MAX: usize = 253;
const TAG_MAX: usize = 255;
const TAGS_MAX: usize = 64;
const META_PAIRS_MAX: usize = 64;
const META_KEY_MAX: usize = 128;
const META_VALUE_MAX: usize = 512;

fn check_text(field: Field, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, Problem::Empty));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            Problem::TooLong { len: s.len(), max },
        ));
    }
    if let Some((at, _)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(ValidationError::new(
            field,
            Problem::ControlCharacter { at },
        ));
    }
    Ok(())
}

fn check_chars(
    field: Field,
    s: &str,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    match s.char_indices().find(|&(_, c)| !ok(c)) {
        Some((at, ch)) => Err(ValidationError::new(
            field,
            Problem::InvalidCharacter { ch, at, allowed },
        )),
        None => Ok(()),
    }
}

fn utf8(field: Field, bytes: &[u8]) -> Result<&str, ValidationError> {
    std::str::from_utf8(bytes).map_err(|_| ValidationError::new(field, Problem::NotUtf8))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:expr, $allowed:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `value`.
            pub fn new(value: impl AsRef<str>) -> Result<Self, ValidationError> {
                let s = value.as_ref();
                check_text($field, s, NAME_MAX)?;
                check_chars($field, s, $allowed, $ok)?;
                Ok(Self(Arc::from(s)))
            }

            /// Validates raw bytes (from the network, a file): they must be UTF-8, then as [`Self::new`].
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
                Self::new(utf8($field, bytes)?)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&String> for $name {
            type Error = ValidationError;
            fn try_from(s: &String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl TryFrom<Box<str>> for $name {
            type Error = ValidationError;
            fn try_from(s: Box<str>) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl TryFrom<std::borrow::Cow<'_, str>> for $name {
            type Error = ValidationError;
            fn try_from(s: std::borrow::Cow<'_, str>) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        // A name already validated converts without a second check (and, through the standard
        // blanket impl, infallibly: `TryFrom<&Self>` with `Error = Infallible`).
        impl From<&$name> for $name {
            fn from(name: &$name) -> Self {
                name.clone()
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A logical service name such as `user-service`: 1 to 128 ASCII letters, digits, `-`, `_`
    /// or `.` (names that Consul DNS and etcd keys both accept).
    ///
    /// ```
    /// use waypost_core::ServiceName;
    /// let name: ServiceName = "user-service".parse()?;
    /// assert_eq!(name.as_str(), "user-service");
    /// assert!(ServiceName::new("users/admin").is_err());
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    ServiceName,
    Field::ServiceName,
    "ASCII letters, digits, '-', '_', '.'",
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
);

name_type!(
    /// The id of one instance of a service, unique within the service: 1 to 128 printable
    /// characters without whitespace or `/` (it becomes part of an etcd key and a Consul URL).
    ///
    /// ```
    /// use waypost_core::InstanceId;
    /// let id = InstanceId::new("users-10.0.0.5:8080")?;
    /// assert_eq!(id.to_string(), "users-10.0.0.5:8080");
    /// assert!(InstanceId::new("a b").is_err());
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    InstanceId,
    Field::InstanceId,
    "printable characters except whitespace and '/'",
    |c: char| !c.is_whitespace() && c != '/'
);

/// A balancing weight: at least 1, at most [`Weight::MAX`]. Relative: an instance of weight 3
/// gets three times the traffic of one of weight 1 under weighted strategies.
///
/// ```
/// use waypost_core::Weight;
/// assert_eq!(Weight::new(3)?.get(), 3);
/// assert!(Weight::new(0).is_err());
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Weight(NonZeroU32);

impl Weight {
    /// The largest weight: large enough for any ratio in practice, small enough that sums over
    /// many instances fit in 64 bits with room to spare.
    pub const MAX: u32 = 1_000_000;
    /// Weight 1, the default.
    pub const ONE: Weight = Weight(NonZeroU32::MIN);

    /// Validates `w`.
    pub fn new(w: u32) -> Result<Self, ValidationError> {
        match NonZeroU32::new(w) {
            None => Err(ValidationError::new(Field::Weight, Problem::Zero)),
            Some(_) if w > Self::MAX => Err(ValidationError::new(
                Field::Weight,
                Problem::OutOfRange {
                    value: w.into(),
                    min: 1,
                    max: Self::MAX.into(),
                },
            )),
            Some(nz) => Ok(Weight(nz)),
        }
    }

    /// The weight as a number.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

impl fmt::Debug for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0.get(), f)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.get(), f)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = u32::deserialize(d)?;
        Weight::new(w).map_err(serde::de::Error::custom)
    }
}

/// What the registry says of an instance's health checks.
///
/// Most backends report passing instances only (Consul's default `?passing`, an etcd key whose
/// lease expired is gone). A backend that also reports failing instances (Consul with
/// `passing_only(false)`) marks them, so that a [`Balancer`](crate::Balancer) can count them
/// without sending them traffic: a balancer serves `Passing` and `Warning` instances and
/// never a `Critical` one, and a [tiered](crate::BalancerBuilder::tier) balancer measures each
/// tier's health as the share of its instances that are not critical.
///
/// ```
/// use waypost_core::{Health, ServiceInstance};
/// let inst = ServiceInstance::builder("users", "u1").host("h").port(1).build()?;
/// assert_eq!(inst.health(), Health::Passing);
/// let failing = inst.to_builder().health(Health::Critical).build()?;
/// assert!(!failing.health().is_serving());
/// assert_eq!("critical".parse::<Health>(), Ok(Health::Critical));
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Every check passes (or the backend reports passing instances only).
    #[default]
    Passing,
    /// A check warns; the instance still takes traffic.
    Warning,
    /// A check fails; the instance takes no traffic.
    Critical,
}

impl Health {
    /// Whether a balancer sends this instance traffic (`Passing` or `Warning`).
    pub const fn is_serving(self) -> bool {
        !matches!(self, Health::Critical)
    }

    /// The lower-case name Consul uses (`passing`, `warning`, `critical`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    fn is_passing(&self) -> bool {
        *self == Health::Passing
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Health {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "passing" => Ok(Health::Passing),
            "warning" => Ok(Health::Warning),
            "critical" => Ok(Health::Critical),
            _ => Err(ValidationError::new(
                Field::Health,
                Problem::Invalid(format!(
                    "{s:?} is not a health status (expected passing, warning or critical)"
                )),
            )),
        }
    }
}

impl Serialize for Health {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One reachable instance of a service: where it listens and how it describes itself.
///
/// Built with [`ServiceInstance::builder`], which validates every field. Cheap to clone.
///
/// ```
/// use waypost_core::ServiceInstance;
/// let inst = ServiceInstance::builder("users", "users-1")
///     .host("10.0.0.5")
///     .port(8080)
///     .tag("v1")
///     .meta("version", "1.4.2")
///     .weight(3)
///     .zone("eu-1a")
///     .build()?;
/// assert_eq!(inst.authority(), "10.0.0.5:8080");
/// assert_eq!(inst.weight().get(), 3);
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct ServiceInstance {
    id: InstanceId,
    service: ServiceName,
    host: Arc<str>,
    port: u16,
    tags: Arc<[String]>,
    metadata: Arc<BTreeMap<String, String>>,
    weight: Weight,
    zone: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Health::is_passing")]
    health: Health,
}

// Builders take names as `TryInto<ServiceName>` etc.: converting a name that is already valid
// fails with `Infallible`, and this lets the same bound accept it next to strings.
impl From<std::convert::Infallible> for ValidationError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl ServiceInstance {
    /// Starts building an instance of `service` with id `id`. Host and port are required.
    ///
    /// Both names are validated here, once: pass a [`ServiceName`] / [`InstanceId`] you
    /// already have (by value or by reference), or any string (`&str`, `String`, ...), whose
    /// problem [`build`](InstanceBuilder::build) then reports.
    ///
    /// ```
    /// use waypost_core::{Field, ServiceInstance, ServiceName};
    /// let users: ServiceName = "users".parse()?;
    /// let a = ServiceInstance::builder(&users, "users-a").host("10.0.0.1").port(80).build()?;
    /// assert_eq!(a.service(), &users);
    /// let bad = ServiceInstance::builder("users", "a b").host("h").port(80).build();
    /// assert_eq!(bad.unwrap_err().field(), &Field::InstanceId);
    /// # Ok::<(), waypost_core::ValidationError>(())
    /// ```
    pub fn builder(
        service: impl TryInto<ServiceName, Error: Into<ValidationError>>,
        id: impl TryInto<InstanceId, Error: Into<ValidationError>>,
    ) -> InstanceBuilder {
        InstanceBuilder {
            service: service.try_into().map_err(Into::into),
            id: id.try_into().map_err(Into::into),
            host: None,
            port: None,
            tags: Vec::new(),
            metadata: Vec::new(),
            weight: None,
            zone: None,
            health: Health::Passing,
        }
    }

    /// The instance id, unique within its service.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }
    /// The service this is an instance of.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }
    /// Host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }
    /// Port, never 0.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
    /// Tags, in registration order.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }
    /// Whether the instance carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
    /// Free-form metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The balancing weight.
    pub fn weight(&self) -> Weight {
        self.weight
    }
    /// The zone (locality), if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
    /// What the registry says of its health checks ([`Health::Passing`] unless the backend
    /// reports failing instances too).
    pub fn health(&self) -> Health {
        self.health
    }
    /// A builder holding this instance's values, to change some of them.
    pub fn to_builder(&self) -> InstanceBuilder {
        InstanceBuilder {
            service: Ok(self.service.clone()),
            id: Ok(self.id.clone()),
            host: Some(self.host.to_string()),
            port: Some(self.port),
            tags: self.tags.to_vec(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            weight: Some(self.weight.get()),
            zone: self.zone.as_deref().map(str::to_owned),
            health: self.health,
        }
    }
}

/// Builds a validated [`ServiceInstance`]; see [`ServiceInstance::builder`].
///
/// The weight is the one given with [`weight`](Self::weight); failing that a `weight:N` tag
/// (a habit of older registrations); failing that 1.
///
/// ```
/// use waypost_core::ServiceInstance;
/// let inst = ServiceInstance::builder("users", "u1").host("h").port(1).tag("weight:4").build()?;
/// assert_eq!(inst.weight().get(), 4);
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct InstanceBuilder {
    service: Result<ServiceName, ValidationError>,
    id: Result<InstanceId, ValidationError>,
    host: Option<String>,
    port: Option<u16>,
    tags: Vec<String>,
    metadata: Vec<(String, String)>,
    weight: Option<u32>,
    zone: Option<String>,
    health: Health,
}

impl InstanceBuilder {
    /// Host name or IP address clients connect to.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
    /// Port clients connect to (1..=65535).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    /// Adds several tags.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
    /// Adds a metadata pair; keys are ASCII letters, digits, `-` and `_`.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
    /// Sets the balancing weight (1..=[`Weight::MAX`]).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }
    /// Sets the zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
    /// Sets or clears the zone.
    pub fn zone_opt(mut self, zone: Option<String>) -> Self {
        self.zone = zone;
        self
    }
    /// Sets the health the registry reports (default [`Health::Passing`]); for backends.
    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Validates every field; the error names the first bad one.
    pub fn build(self) -> Result<ServiceInstance, ValidationError> {
        let service = self.service?;
        let id = self.id?;
        let host = self
            .host
            .ok_or_else(|| ValidationError::new(Field::Host, Problem::Empty))?;
        check_text(Field::Host, &host, HOST_MAX)?;
        check_chars(
            Field::Host,
            &host,
            "a host name or an IP address",
            |c: char| !c.is_whitespace() && !matches!(c, '/' | '@' | '?' | '#'),
        )?;
        let port = match self.port {
            None | Some(0) => return Err(ValidationError::new(Field::Port, Problem::Zero)),
            Some(p) => p,
        };
        if self.tags.len() > TAGS_MAX {
            return Err(ValidationError::new(
                Field::Tag(TAGS_MAX),
                Problem::TooMany {
                    count: self.tags.len(),
                    max: TAGS_MAX,
                },
            ));
        }
        for (i, t) in self.tags.iter().enumerate() {
            check_text(Field::Tag(i), t, TAG_MAX)?;
        }
        if self.metadata.len() > META_PAIRS_MAX {
            return Err(ValidationError::new(
                Field::MetadataKey(String::new()),
                Problem::TooMany {
                    count: self.metadata.len(),
                    max: META_PAIRS_MAX,
                },
            ));
        }
        let mut metadata = BTreeMap::new();
        for (k, v) in self.metadata {
            let field = Field::MetadataKey(k.clone());
            check_text(field.clone(), &k, META_KEY_MAX)?;
            check_chars(
                field.clone(),
                &k,
                "ASCII letters, digits, '-', '_'",
                |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'),
            )?;
            if v.len() > META_VALUE_MAX {
                return Err(ValidationError::new(
                    Field::MetadataValue(k),
                    Problem::TooLong {
                        len: v.len(),
                        max: META_VALUE_MAX,
                    },
                ));
            }
            if let Some((at, _)) = v.char_indices().find(|(_, c)| c.is_control()) {
                return Err(ValidationError::new(
                    Field::MetadataValue(k),
                    Problem::ControlCharacter { at },
                ));
            }
            if metadata.insert(k, v).is_some() {
                return Err(ValidationError::new(field, Problem::Duplicate));
            }
        }
        let weight = match self.weight {
            Some(w) => Weight::new(w)?,
            None => weight_from_tags(&self.tags)?.unwrap_or_default(),
        };
        let zone = match self.zone {
            Some(z) => {
                check_text(Field::Zone, &z, NAME_MAX)?;
                Some(Arc::from(z))
            }
            None => None,
        };
        Ok(ServiceInstance {
            id,
            service,
            host: Arc::from(host),
            port,
            tags: Arc::from(self.tags),
            metadata: Arc::new(metadata),
            weight,
            zone,
            health: self.health,
        })
    }
}

/// Reads a `weight:N` tag. A malformed one is an error rather than a silent weight of 1.
fn weight_from_tags(tags: &[String]) -> Result<Option<Weight>, ValidationError> {
    for t in tags {
        if let Some(n) = t.strip_prefix("weight:") {
            let w: u32 = n.trim().parse().map_err(|_| {
                ValidationError::new(
                    Field::Weight,
                    Problem::Invalid(format!("tag {t:?} is not weight:<1..={}>", Weight::MAX)),
                )
            })?;
            return Weight::new(w).map(Some);
        }
    }
    Ok(None)
}

/// The wire form of an instance; deserializing goes through the builder so that a record from
/// the network is validated like any other input.
#[derive(Deserialize)]
struct RawInstance {
    id: String,
    service: String,
    host: String,
    port: u16,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    health: Health,
}

impl<'de> Deserialize<'de> for ServiceInstance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawInstance::deserialize(d)?;
        let mut b = ServiceInstance::builder(raw.service, raw.id)
            .host(raw.host)
            .port(raw.port)
            .tags(raw.tags)
            .zone_opt(raw.zone)
            .health(raw.health);
        for (k, v) in raw.metadata {
            b = b.meta(k, v);
        }
        if let Some(w) = raw.weight {
            b = b.weight(w);
        }
        b.build().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> InstanceBuilder {
        ServiceInstance::builder("users", "u1")
            .host("127.0.0.1")
            .port(80)
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(InstanceBuilder, Field)> = vec![
            (
                ServiceInstance::builder("", "u1").host("h").port(1),
                Field::ServiceName,
            ),
            (
                ServiceInstance::builder("a/b", "u1").host("h").port(1),
                Field::ServiceName,
            ),
            (
                ServiceInstance::builder("x".repeat(129), "u1")
                    .host("h")
                    .port(1),
                Field::ServiceName,
            ),
            (
                ServiceInstance::builder("users", "").host("h").port(1),
                Field::InstanceId,
            ),
            (
                ServiceInstance::builder("users", "a\nb").host("h").port(1),
                Field::InstanceId,
            ),
            (ServiceInstance::builder("users", "u1").port(1), Field::Host),
            (
                ServiceInstance::builder("users", "u1").host("").port(1),
                Field::Host,
            ),
            (
                ServiceInstance::builder("users", "u1").host("h"),
                Field::Port,
            ),
            (base().port(0), Field::Port),
            (base().weight(0), Field::Weight),
            (base().weight(Weight::MAX + 1), Field::Weight),
            (base().tag("ok").tag("bad\u{7}"), Field::Tag(1)),
            (base().tag(""), Field::Tag(0)),
            (
                base().meta("bad key", "v"),
                Field::MetadataKey("bad key".into()),
            ),
            (base().meta("k", "v\0"), Field::MetadataValue("k".into())),
            (
                base().meta("k", "1").meta("k", "2"),
                Field::MetadataKey("k".into()),
            ),
            (base().zone(""), Field::Zone),
            (base().tag("weight:zero"), Field::Weight),
        ];
        for (b, field) in cases {
            let err = b.clone().build().expect_err(&format!("{b:?} should fail"));
            assert_eq!(err.field(), &field, "{b:?}: {err}");
        }
    }

    #[test]
    fn non_utf8_bytes_are_rejected() {
        let err = ServiceName::from_bytes(&[0x75, 0xff]).unwrap_err();
        assert_eq!(err.problem(), &Problem::NotUtf8);
        assert_eq!(InstanceId::from_bytes(b"ok-1").unwrap().as_str(), "ok-1");
    }

    #[test]
    fn weight_precedence_explicit_then_tag_then_one() {
        assert_eq!(base().build().unwrap().weight().get(), 1);
        assert_eq!(base().tag("weight:7").build().unwrap().weight().get(), 7);
        assert_eq!(
            base()
                .tag("weight:7")
                .weight(2)
                .build()
                .unwrap()
                .weight()
                .get(),
            2
        );
    }

    #[test]
    fn json_round_trip_validates() {
        let inst = base()
            .tag("v1")
            .meta("k", "v")
            .weight(5)
            .zone("z")
            .build()
            .unwrap();
        let json = serde_json::to_string(&inst).unwrap();
        let back: ServiceInstance = serde_json::from_str(&json).unwrap();
        assert_eq!(back, inst);
        let bad = json.replace("\"port\":80", "\"port\":0");
        assert!(serde_json::from_str::<ServiceInstance>(&bad).is_err());
    }

    #[test]
    fn names_are_taken_as_they_come_and_validated_once() {
        let users = ServiceName::new("users").unwrap();
        let id = InstanceId::new("u1").unwrap();
        let owned = String::from("users");
        let build = |b: InstanceBuilder| b.host("h").port(1).build();
        // Every way a caller holds a name.
        for b in [
            ServiceInstance::builder("users", "u1"),
            ServiceInstance::builder(owned.clone(), String::from("u1")),
            ServiceInstance::builder(&owned, &String::from("u1")),
            ServiceInstance::builder(std::borrow::Cow::Borrowed("users"), Box::<str>::from("u1")),
            ServiceInstance::builder(&users, &id),
            ServiceInstance::builder(users.clone(), id.clone()),
        ] {
            let inst = build(b).unwrap();
            assert_eq!((inst.service(), inst.id()), (&users, &id));
        }
        // A valid name is reused as it is, not parsed again into a new one.
        let inst = build(ServiceInstance::builder(&users, &id)).unwrap();
        assert!(Arc::ptr_eq(&inst.service.0, &users.0));
        let changed = inst.to_builder().port(2).build().unwrap();
        assert!(Arc::ptr_eq(&changed.service.0, &users.0));
        assert!(Arc::ptr_eq(&changed.id.0, &id.0));
        // A bad string fails the build, naming the field; the service is checked first.
        let err = build(ServiceInstance::builder("a/b", "c d")).unwrap_err();
        assert_eq!(err.field(), &Field::ServiceName);
        let err = build(ServiceInstance::builder(&users, "c d")).unwrap_err();
        assert_eq!(err.field(), &Field::InstanceId);
    }

    #[test]
    fn ipv6_authority_has_brackets() {
        let i = ServiceInstance::builder("s", "i")
            .host("::1")
            .port(9)
            .build()
            .unwrap();
        assert_eq!(i.authority(), "[::1]:9");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".*", p in proptest::num::u16::ANY, w in proptest::num::u32::ANY) {
            let _ = ServiceInstance::builder(s.clone(), s.clone()).host(s.clone()).port(p).tag(s.clone()).meta(s.clone(), s).weight(w).build();
        }
    }
}

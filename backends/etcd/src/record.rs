//! The key layout and the JSON record stored under each key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use waypost_core::{InstanceId, ServiceInstance, ServiceName};

/// The version of the record layout this crate writes and reads. A record with any other
/// `schema` is skipped (and counted), never guessed at.
pub const SCHEMA_VERSION: u32 = 1;

/// The wire form of an instance. Field order is the order written; unknown fields are ignored so
/// that a later minor addition does not hide instances from older readers.
#[derive(Serialize, Deserialize)]
struct Record {
    schema: u32,
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
}

/// Why a value under the prefix is not an instance.
///
/// ```
/// use waypost_etcd::decode_record;
/// let err = decode_record("users", "u1", b"not json").unwrap_err();
/// assert!(err.to_string().contains("not a JSON record"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The key below the prefix is not `<service>/<instance-id>`.
    #[error("key is not <prefix>/<service>/<instance-id>: {0}")]
    Key(String),
    /// The value is not JSON of the expected shape.
    #[error("value is not a JSON record: {0}")]
    Json(String),
    /// The record has another schema version.
    #[error("record has schema {found}, this reader understands schema {SCHEMA_VERSION}")]
    Schema {
        /// The version found.
        found: u32,
    },
    /// The record names another service or instance than its key.
    #[error("record says {field} {found:?} but its key says {expected:?}")]
    KeyMismatch {
        /// `service` or `id`.
        field: &'static str,
        /// What the key says.
        expected: String,
        /// What the record says.
        found: String,
    },
    /// A field fails validation (empty host, port 0, ...).
    #[error("record is invalid: {0}")]
    Invalid(#[from] waypost_core::ValidationError),
}

/// The JSON record of `instance`, as written to etcd.
///
/// ```
/// use waypost_core::ServiceInstance;
/// let i = ServiceInstance::builder("users", "u1").host("10.0.0.5").port(8080).build()?;
/// let json = waypost_etcd::encode_record(&i);
/// assert_eq!(
///     json,
///     r#"{"schema":1,"id":"u1","service":"users","host":"10.0.0.5","port":8080,"tags":[],"metadata":{},"weight":1,"zone":null}"#
/// );
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
pub fn encode_record(instance: &ServiceInstance) -> String {
    let record = Record {
        schema: SCHEMA_VERSION,
        id: instance.id().to_string(),
        service: instance.service().to_string(),
        host: instance.host().to_owned(),
        port: instance.port(),
        tags: instance.tags().to_vec(),
        metadata: instance.metadata().clone(),
        weight: Some(instance.weight().get()),
        zone: instance.zone().map(str::to_owned),
    };
    // Serializing strings, numbers and maps of strings cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

/// The key that instance `id` of `service` is stored under below `prefix` (trailing slashes
/// ignored): `<prefix>/<service>/<id>`. With [`encode_record`], what a writer outside Waypost
/// puts; [`Etcd::key`](crate::Etcd::key) gives the same for the client's own prefix.
///
/// ```
/// let key = waypost_etcd::record_key("/waypost/services/", &"users".parse()?, &"users-1".parse()?);
/// assert_eq!(key, "/waypost/services/users/users-1");
/// # Ok::<(), waypost_core::ValidationError>(())
/// ```
pub fn record_key(prefix: &str, service: &ServiceName, id: &InstanceId) -> String {
    format!("{}/{}/{}", prefix.trim_end_matches('/'), service, id)
}

/// Reads the record stored under `<prefix>/<service>/<id>`: valid JSON, schema
/// [`SCHEMA_VERSION`], the same service and id as the key, and every field valid.
///
/// ```
/// use waypost_etcd::{decode_record, RecordError};
/// let v = br#"{"schema":1,"id":"u1","service":"users","host":"10.0.0.5","port":8080}"#;
/// let i = decode_record("users", "u1", v)?;
/// assert_eq!(i.authority(), "10.0.0.5:8080");
/// assert!(matches!(decode_record("users", "u2", v), Err(RecordError::KeyMismatch { .. })));
/// # Ok::<(), RecordError>(())
/// ```
pub fn decode_record(
    service: &str,
    id: &str,
    value: &[u8],
) -> Result<ServiceInstance, RecordError> {
    // Check the version on its own first, so that a record of a future schema is reported as
    // such rather than as whatever field it lacks.
    #[derive(Deserialize)]
    struct Version {
        schema: Option<u32>,
    }
    let version: Version =
        serde_json::from_slice(value).map_err(|e| RecordError::Json(e.to_string()))?;
    match version.schema {
        Some(SCHEMA_VERSION) => {}
        Some(found) => return Err(RecordError::Schema { found }),
        None => return Err(RecordError::Json("missing field `schema`".into())),
    }
    let r: Record = serde_json::from_slice(value).map_err(|e| RecordError::Json(e.to_string()))?;
    if r.service != service {
        return Err(RecordError::KeyMismatch {
            field: "service",
            expected: service.to_owned(),
            found: r.service,
        });
    }
    if r.id != id {
        return Err(RecordError::KeyMismatch {
            field: "id",
            expected: id.to_owned(),
            found: r.id,
        });
    }
    let mut b = ServiceInstance::builder(r.service, r.id)
        .host(r.host)
        .port(r.port)
        .tags(r.tags)
        .zone_opt(r.zone);
    for (k, v) in r.metadata {
        b = b.meta(k, v);
    }
    if let Some(w) = r.weight {
        b = b.weight(w);
    }
    Ok(b.build()?)
}

/// Where instances live: `<prefix>/<service>/<instance-id>`.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` without its trailing slashes.
    pub(crate) fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of one instance.
    pub(crate) fn key(&self, service: &ServiceName, id: &InstanceId) -> String {
        record_key(&self.prefix, service, id)
    }

    /// The prefix of every key of `service`, with the trailing slash so that `users` does not
    /// also match `users-admin`.
    pub(crate) fn service_prefix(&self, service: &ServiceName) -> String {
        format!("{}/{}/", self.prefix, service)
    }

    /// Decodes one key-value pair found under `service_prefix(service)`.
    pub(crate) fn decode(
        &self,
        service: &ServiceName,
        key: &[u8],
        value: &[u8],
    ) -> Result<ServiceInstance, RecordError> {
        let id = self.instance_id(service, key)?;
        decode_record(service.as_str(), id.as_str(), value)
    }

    /// The instance id in a key found under `service_prefix(service)`.
    pub(crate) fn instance_id(
        &self,
        service: &ServiceName,
        key: &[u8],
    ) -> Result<InstanceId, RecordError> {
        let rest = key
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|k| k.strip_prefix(b"/"))
            .and_then(|k| k.strip_prefix(service.as_str().as_bytes()))
            .and_then(|k| k.strip_prefix(b"/"))
            .ok_or_else(|| RecordError::Key(String::from_utf8_lossy(key).into_owned()))?;
        InstanceId::from_bytes(rest)
            .map_err(|e| RecordError::Key(format!("{}: {e}", String::from_utf8_lossy(key))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> ServiceInstance {
        ServiceInstance::builder("users", "u1")
            .host("10.0.0.5")
            .port(8080)
            .tag("v1")
            .meta("version", "1.4.2")
            .weight(3)
            .zone("eu-1a")
            .build()
            .unwrap()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let i = inst();
        let json = encode_record(&i);
        assert_eq!(decode_record("users", "u1", json.as_bytes()).unwrap(), i);
    }

    #[test]
    fn foreign_minimal_record_is_read_with_defaults() {
        let v = br#"{"schema":1,"id":"u1","service":"users","host":"h","port":1,"extra":true}"#;
        let i = decode_record("users", "u1", v).unwrap();
        assert_eq!(i.weight().get(), 1);
        assert!(i.tags().is_empty() && i.zone().is_none());
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        type Check = fn(&RecordError) -> bool;
        let cases: Vec<(&[u8], Check)> = vec![
            (b"garbage", |e| matches!(e, RecordError::Json(_))),
            (b"", |e| matches!(e, RecordError::Json(_))),
            (b"[1,2]", |e| matches!(e, RecordError::Json(_))),
            (br#"{"id":"u1"}"#, |e| matches!(e, RecordError::Json(_))),
            (br#"{"schema":2,"id":"u1"}"#, |e| {
                matches!(e, RecordError::Schema { found: 2 })
            }),
            (
                br#"{"schema":1,"id":"u1","service":"users","host":"h"}"#,
                |e| matches!(e, RecordError::Json(_)),
            ),
            (
                br#"{"schema":1,"id":"u1","service":"users","host":"h","port":0}"#,
                |e| matches!(e, RecordError::Invalid(_)),
            ),
            (
                br#"{"schema":1,"id":"u1","service":"other","host":"h","port":1}"#,
                |e| {
                    matches!(
                        e,
                        RecordError::KeyMismatch {
                            field: "service",
                            ..
                        }
                    )
                },
            ),
            (&[0xff, 0xfe], |e| matches!(e, RecordError::Json(_))),
        ];
        for (value, ok) in cases {
            let err = decode_record("users", "u1", value).unwrap_err();
            assert!(ok(&err), "{:?}: {err}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn layout_keys_and_prefixes() {
        let l = Layout::new("/waypost/services/");
        let s = ServiceName::new("users").unwrap();
        let id = InstanceId::new("u1").unwrap();
        assert_eq!(l.key(&s, &id), "/waypost/services/users/u1");
        assert_eq!(l.service_prefix(&s), "/waypost/services/users/");
        let v = encode_record(&inst());
        assert!(l
            .decode(&s, b"/waypost/services/users/u1", v.as_bytes())
            .is_ok());
        assert!(matches!(
            l.decode(&s, b"/waypost/services/users/u1/x", v.as_bytes()),
            Err(RecordError::Key(_))
        ));
        assert!(matches!(
            l.decode(&s, b"/elsewhere/u1", v.as_bytes()),
            Err(RecordError::Key(_))
        ));
    }
}

//! Consul's JSON: the registration payload, and health entries turned into instances.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;
use waypost_core::{CheckTls, Health, HealthCheck, Registration, ServiceInstance, ServiceName};

/// The metadata key that carries an instance's zone: a registration's zone is written to
/// `Meta.zone` (replacing a metadata pair of that name), and `Meta.zone` is read back as the
/// zone, not as metadata.
pub const ZONE_META_KEY: &str = "zone";
/// The metadata key read as a weight when `Weights.Passing` is left at Consul's default of 1
/// (registrations by other tools); a `weight:N` tag comes next, then 1.
pub const WEIGHT_META_KEY: &str = "weight";

/// The safety net when the registration sets none: Consul's reaper clamps anything shorter to
/// about a minute anyway.
const DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// Body of `PUT /v1/agent/service/register`.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub check: Check,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Weights {
    pub passing: u32,
    #[serde(default)]
    pub warning: u32,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Check {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "std::ops::Not::not")]
    pub grpc_use_tls: bool,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "std::ops::Not::not")]
    pub tls_skip_verify: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A TTL check starts critical unless told otherwise: register it passing so that the
    /// instance is routable at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    pub deregister_critical_service_after: String,
}

/// The id of the check registered with instance `id`.
pub(crate) fn check_id(id: &str) -> String {
    format!("service:{id}")
}

/// A duration the way Go's `time.ParseDuration` reads it.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl ServiceRegistration {
    /// The payload for `instance` (host already filled in) registered with `reg`'s check.
    pub(crate) fn new(instance: &ServiceInstance, reg: &Registration) -> Self {
        let id = instance.id().to_string();
        let mut meta = instance.metadata().clone();
        if let Some(zone) = instance.zone() {
            meta.insert(ZONE_META_KEY.to_owned(), zone.to_owned());
        }
        let after = reg
            .deregister_critical_after()
            .unwrap_or(DEFAULT_DEREGISTER_AFTER);
        let mut check = Check {
            check_id: check_id(&id),
            name: format!("waypost health of {id}"),
            ttl: None,
            http: None,
            tcp: None,
            grpc: None,
            grpc_use_tls: false,
            tls_skip_verify: false,
            interval: None,
            timeout: None,
            status: None,
            deregister_critical_service_after: go_duration(after),
        };
        match reg.check() {
            HealthCheck::Ttl { ttl } => {
                check.ttl = Some(go_duration(*ttl));
                check.status = Some("passing");
            }
            HealthCheck::Http {
                url,
                interval,
                timeout,
                tls,
            } => {
                check.http = Some(url.clone());
                check.tls_skip_verify = *tls == CheckTls::SkipVerify;
                check.interval = Some(go_duration(*interval));
                check.timeout = Some(go_duration(*timeout));
            }
            HealthCheck::Tcp {
                address,
                interval,
                timeout,
            } => {
                check.tcp = Some(address.clone());
                check.interval = Some(go_duration(*interval));
                check.timeout = Some(go_duration(*timeout));
            }
            HealthCheck::Grpc {
                target,
                interval,
                timeout,
                tls,
            } => {
                check.grpc = Some(target.clone());
                check.grpc_use_tls = tls.is_some();
                // A kind of verification this crate does not know yet is the strict one.
                check.tls_skip_verify = matches!(tls, Some(CheckTls::SkipVerify));
                check.interval = Some(go_duration(*interval));
                check.timeout = Some(go_duration(*timeout));
            }
            // HealthCheck is non-exhaustive: a check kind this crate does not know yet falls
            // back to a heartbeat, which the handle keeps passing.
            _ => {
                check.ttl = Some(go_duration(Duration::from_secs(10)));
                check.status = Some("passing");
            }
        }
        ServiceRegistration {
            id,
            name: instance.service().to_string(),
            address: instance.host().to_owned(),
            port: instance.port(),
            tags: instance.tags().to_vec(),
            meta,
            weights: Weights {
                passing: instance.weight().get(),
                warning: 1,
            },
            check,
        }
    }
}

/// Text of the answer, borrowed from the body unless JSON escapes made it a copy.
///
/// `Cow<str>` borrows only as a plain field (serde special-cases it there); inside an `Option`
/// or a `Vec` it is always a copy, hence this type.
#[derive(Debug, Default)]
pub(crate) struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// One element of `GET /v1/health/service/<name>`: only the fields Waypost reads, borrowed
/// from the answer's body (an entry's other fields, the checks' `Output` among them, are
/// skipped without being copied).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntry<'a> {
    #[serde(default, borrow)]
    pub node: Option<Node<'a>>,
    #[serde(borrow)]
    pub service: Service<'a>,
    /// The node's checks (`serfHealth`, with an empty `ServiceID`) and the service's.
    #[serde(default, borrow)]
    pub checks: Option<Vec<EntryCheck<'a>>>,
}

/// One element of a health entry's `Checks`.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EntryCheck<'a> {
    #[serde(rename = "CheckID", default, borrow)]
    pub check_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub status: Option<Text<'a>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Node<'a> {
    #[serde(default, borrow)]
    pub address: Option<Text<'a>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Service<'a> {
    #[serde(rename = "ID", borrow)]
    pub id: Text<'a>,
    #[serde(borrow)]
    pub service: Text<'a>,
    #[serde(default, borrow)]
    pub address: Option<Text<'a>>,
    pub port: u32,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub weights: Option<Weights>,
}

impl HealthEntry<'_> {
    /// The instance this entry describes, validated like any input, as an instance of
    /// `service` (the caller checked that the entry names it: sharing the name saves a copy
    /// per instance).
    ///
    /// Address: `Service.Address`, else `Node.Address`. Weight: `Service.Weights.Passing` when
    /// set above Consul's default of 1, else `Meta.weight`, else a `weight:N` tag (read by the
    /// instance builder), else 1. Zone: `Meta.zone` (taken out of the metadata). Health: the
    /// worst status of all the entry's checks, node checks included (as Consul's `?passing`
    /// filter counts them); passing when it has none.
    pub(crate) fn into_instance(self, service: &ServiceName) -> Result<ServiceInstance, String> {
        let health = aggregate_health(self.checks.as_deref().unwrap_or_default(), &self.service);
        let svc = self.service;
        let host = svc
            .address
            .filter(|a| !a.0.is_empty())
            .or_else(|| self.node.and_then(|n| n.address))
            .unwrap_or_default();
        let port =
            u16::try_from(svc.port).map_err(|_| format!("port {} is out of range", svc.port))?;
        let mut meta = svc.meta.unwrap_or_default();
        let zone = meta.remove(ZONE_META_KEY);
        let mut b = ServiceInstance::builder(service.clone(), svc.id.0)
            .host(host.0)
            .port(port)
            .tags(svc.tags.unwrap_or_default())
            .zone_opt(zone)
            .health(health);
        let passing = svc.weights.map(|w| w.passing);
        match passing {
            // Consul fills in {Passing: 1, Warning: 1} when a registration gives no weights, so
            // only a larger value is a deliberate choice; 0 is invalid and fails validation.
            Some(p) if p != 1 => b = b.weight(p),
            _ => {
                if let Some(w) = meta.get(WEIGHT_META_KEY) {
                    let w: u32 = w
                        .trim()
                        .parse()
                        .map_err(|_| format!("Meta.weight {w:?} is not a number"))?;
                    b = b.weight(w);
                }
            }
        }
        for (k, v) in meta {
            b = b.meta(k, v);
        }
        b.build().map_err(|e| e.to_string())
    }
}

/// Reads `GET /v1/health/service/<name>`'s JSON array as its bytes arrive, turning each entry
/// into an instance as soon as it is complete: a large answer is never held whole, and most of
/// it is read by the time its last byte is in.
///
/// An entry that is not a valid instance of the service (a foreign registration with a bad
/// port, an entry of the wrong shape) is skipped and logged, never hiding the others; an answer
/// that is not a JSON array, or is cut off, fails as a whole.
pub(crate) struct HealthEntries<'s> {
    service: &'s ServiceName,
    /// Text received and not yet read: at most one entry and the chunk it ends in. Checked
    /// as UTF-8 once, as it arrives, so that reading its strings does not check them again.
    buf: String,
    /// The next byte of `buf` to read.
    pos: usize,
    /// The start of a character the last chunk cut in two (at most 3 bytes).
    cut: Vec<u8>,
    expect: Expect,
    instances: Vec<ServiceInstance>,
    /// The answer's first bytes, for error messages.
    head: Vec<u8>,
    /// How many bytes of text were taken in, for error messages.
    received: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `[`.
    Open,
    /// An entry or `]`.
    FirstEntry,
    /// An entry.
    Entry,
    /// `,` or `]`.
    Separator,
    /// Nothing but whitespace.
    End,
}

/// Why an answer could not be read.
#[derive(Debug)]
pub(crate) struct BadAnswer {
    pub reason: String,
    /// The answer's first bytes.
    pub head: Vec<u8>,
}

/// When a buffer's read part is compacted away: often enough that the buffer stays about one
/// chunk long, rarely enough that the move is cheap.
const COMPACT_AFTER: usize = 64 << 10;

/// How many of an answer's first bytes an error message may quote.
const HEAD_MAX: usize = 256;

impl<'s> HealthEntries<'s> {
    /// A reader of the answer for `service`; entries of other services are skipped.
    pub(crate) fn new(service: &'s ServiceName) -> Self {
        HealthEntries {
            service,
            buf: String::new(),
            pos: 0,
            cut: Vec::new(),
            expect: Expect::Open,
            instances: Vec::new(),
            head: Vec::new(),
            received: 0,
        }
    }

    /// Takes in the next bytes of the answer, and reads every entry they complete.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), BadAnswer> {
        if self.head.len() < HEAD_MAX {
            let n = bytes.len().min(HEAD_MAX - self.head.len());
            self.head.extend_from_slice(&bytes[..n]);
        }
        if self.pos >= COMPACT_AFTER {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.take_text(bytes).map_err(|reason| self.bad(reason))?;
        self.read(false).map_err(|reason| self.bad(reason))
    }

    /// Appends `bytes` to the text, keeping a character they end inside for the next chunk.
    fn take_text(&mut self, bytes: &[u8]) -> Result<(), String> {
        let joined;
        let mut bytes = bytes;
        if !self.cut.is_empty() {
            self.cut.extend_from_slice(bytes);
            joined = std::mem::take(&mut self.cut);
            bytes = &joined;
        }
        let (text, cut) = match std::str::from_utf8(bytes) {
            Ok(text) => (text, &[][..]),
            // Cut inside a character: the rest of it comes with the next chunk.
            Err(e) if e.error_len().is_none() => {
                let (valid, cut) = bytes.split_at(e.valid_up_to());
                (std::str::from_utf8(valid).map_err(|e| e.to_string())?, cut)
            }
            Err(e) => {
                return Err(format!(
                    "not UTF-8 at byte {}",
                    self.received + e.valid_up_to()
                ))
            }
        };
        self.received += text.len();
        self.buf.push_str(text);
        self.cut.extend_from_slice(cut);
        Ok(())
    }

    /// The instances of the whole answer, in the order they came.
    pub(crate) fn finish(mut self) -> Result<Vec<ServiceInstance>, BadAnswer> {
        if !self.cut.is_empty() {
            return Err(self.bad("the answer ends inside a UTF-8 character".to_owned()));
        }
        self.read(true).map_err(|reason| self.bad(reason))?;
        if self.expect != Expect::End {
            return Err(self.bad("the answer ends before its closing ']'".to_owned()));
        }
        Ok(self.instances)
    }

    fn bad(&self, reason: String) -> BadAnswer {
        BadAnswer {
            reason,
            head: self.head.clone(),
        }
    }

    /// Reads as far as the bytes go; `all` when no more will come.
    fn read(&mut self, all: bool) -> Result<(), String> {
        loop {
            let bytes = self.buf.as_bytes();
            while bytes.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
                self.pos += 1;
            }
            let Some(&next) = bytes.get(self.pos) else {
                return Ok(());
            };
            match (self.expect, next) {
                // Every step moves past an ASCII byte or a whole value: `pos` stays on a
                // character boundary of `buf`.
                (Expect::Open, b'[') => self.expect = Expect::FirstEntry,
                (Expect::FirstEntry | Expect::Separator, b']') => self.expect = Expect::End,
                (Expect::Separator, b',') => self.expect = Expect::Entry,
                (Expect::FirstEntry | Expect::Entry, _) => {
                    if !self.entry(all)? {
                        return Ok(());
                    }
                    self.expect = Expect::Separator;
                    continue;
                }
                (Expect::Open, _) => return Err("not a JSON array".to_owned()),
                (Expect::End, _) => return Err("more after the closing ']'".to_owned()),
                (Expect::Separator, _) => {
                    let found = self.buf.get(self.pos..).and_then(|r| r.chars().next());
                    return Err(format!(
                        "expected ',' or ']' after an entry, found {}",
                        found.map_or_else(String::new, |c| format!("{c:?}"))
                    ));
                }
            }
            self.pos += 1;
        }
    }

    /// Reads the entry at `pos`, if its bytes are all in; whether it was.
    fn entry(&mut self, all: bool) -> Result<bool, String> {
        use serde_json::error::Category;
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let mut typed = serde_json::Deserializer::from_str(rest).into_iter::<HealthEntry<'_>>();
        let parsed = typed.next();
        let mut end = typed.byte_offset();
        let outcome = match parsed {
            Some(Ok(entry)) => Ok(entry),
            Some(Err(e)) if e.classify() == Category::Data => {
                // The wrong shape: step over the entry, keep the reason.
                let mut any =
                    serde_json::Deserializer::from_str(rest).into_iter::<serde::de::IgnoredAny>();
                match any.next() {
                    Some(Ok(_)) => {
                        end = any.byte_offset();
                        Err(e.to_string())
                    }
                    Some(Err(e)) if e.classify() == Category::Eof && !all => return Ok(false),
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Ok(false),
                }
            }
            Some(Err(e)) if e.classify() == Category::Eof && !all => return Ok(false),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(false),
        };
        // A value that ends where the bytes end may go on in the next chunk (a number).
        if end == rest.len() && !all {
            return Ok(false);
        }
        let service = self.service;
        let instance = outcome.and_then(|entry| {
            if entry.service.service.0 != service.as_str() {
                warn!(service = %service, other = %entry.service.service.0, "consul listed an instance of another service; skipped");
                return Ok(None);
            }
            entry.into_instance(service).map(Some)
        });
        match instance {
            Ok(Some(inst)) => self.instances.push(inst),
            Ok(None) => {}
            // One bad foreign registration must not hide the valid ones.
            Err(why) => warn!(service = %service, "skipping an invalid consul entry: {why}"),
        }
        self.pos += end;
        Ok(true)
    }
}

/// The worst of `checks`' statuses: critical over warning over passing. A status this crate
/// does not know (Consul reports maintenance as a critical check, but a future one may not) is
/// counted as critical: an instance is not served on a status nobody understood.
fn aggregate_health(checks: &[EntryCheck], svc: &Service) -> Health {
    let mut worst = Health::Passing;
    for check in checks {
        let status = check.status.as_ref().map_or("", Text::as_str);
        let health = match status {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            "critical" => Health::Critical,
            _ => {
                warn!(
                    service = %svc.service.as_str(),
                    id = %svc.id.as_str(),
                    check = ?check.check_id.as_ref().map_or("", Text::as_str),
                    ?status,
                    "consul check status not understood; counting the instance as critical"
                );
                Health::Critical
            }
        };
        worst = worse(worst, health);
    }
    worst
}

fn worse(a: Health, b: Health) -> Health {
    let rank = |h: Health| match h {
        Health::Passing => 0,
        Health::Warning => 1,
        // Critical, and any status core adds later: not served.
        _ => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Result<ServiceInstance, String> {
        serde_json::from_str::<HealthEntry>(json)
            .map_err(|e| e.to_string())?
            .into_instance(&ServiceName::new("s").map_err(|e| e.to_string())?)
    }

    #[test]
    fn registration_payload_carries_everything() {
        let reg = Registration::builder("users", "u-1")
            .host("10.0.0.5")
            .port(8080)
            .tag("v1")
            .meta("k", "v")
            .weight(3)
            .zone("eu-1a")
            .check(HealthCheck::ttl(Duration::from_secs(9)))
            .deregister_critical_after(Duration::from_secs(90))
            .build()
            .unwrap();
        let inst = reg.instance_or_host("ignored").unwrap();
        let json = serde_json::to_value(ServiceRegistration::new(&inst, &reg)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ID": "u-1", "Name": "users", "Address": "10.0.0.5", "Port": 8080,
                "Tags": ["v1"], "Meta": {"k": "v", "zone": "eu-1a"},
                "Weights": {"Passing": 3, "Warning": 1},
                "Check": {"CheckID": "service:u-1", "Name": "waypost health of u-1", "TTL": "9s",
                          "Status": "passing", "DeregisterCriticalServiceAfter": "90s"}
            })
        );
    }

    #[test]
    fn http_tcp_and_grpc_checks_are_run_by_consul() {
        let reg = Registration::builder("s", "i")
            .port(1)
            .check(HealthCheck::http(
                "http://127.0.0.1:1/health",
                Duration::from_millis(1500),
            ))
            .build()
            .unwrap();
        let inst = reg.instance_or_host("127.0.0.1").unwrap();
        let p = ServiceRegistration::new(&inst, &reg);
        assert_eq!(p.check.http.as_deref(), Some("http://127.0.0.1:1/health"));
        assert_eq!(p.check.interval.as_deref(), Some("1500ms"));
        assert!(!p.check.tls_skip_verify);
        assert_eq!(p.check.status, None);
        assert_eq!(p.check.ttl, None);
        assert_eq!(p.check.deregister_critical_service_after, "60s");
        let every = Duration::from_secs(1);
        let reg = Registration::builder("s", "i")
            .port(1)
            .check(HealthCheck::https(
                "https://h:1/",
                every,
                CheckTls::SkipVerify,
            ))
            .build()
            .unwrap();
        let p = ServiceRegistration::new(&reg.instance_or_host("h").unwrap(), &reg);
        let json = serde_json::to_value(&p.check).unwrap();
        assert_eq!(
            (&json["HTTP"], &json["TLSSkipVerify"]),
            (&"https://h:1/".into(), &true.into())
        );
        assert_eq!(json.get("GRPCUseTLS"), None);
        let reg = Registration::builder("s", "i")
            .port(1)
            .check(HealthCheck::tcp("127.0.0.1:1", Duration::from_secs(2)))
            .build()
            .unwrap();
        let p = ServiceRegistration::new(&reg.instance_or_host("h").unwrap(), &reg);
        assert_eq!(p.check.tcp.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(p.check.timeout.as_deref(), Some("2s"));
        let reg = Registration::builder("s", "i")
            .port(1)
            .check(HealthCheck::grpc(
                "127.0.0.1:1/users.Users",
                Duration::from_secs(3),
            ))
            .build()
            .unwrap();
        let p = ServiceRegistration::new(&reg.instance_or_host("h").unwrap(), &reg);
        let json = serde_json::to_value(&p.check).unwrap();
        assert_eq!(json["GRPC"], "127.0.0.1:1/users.Users");
        assert_eq!(
            (json["Interval"].as_str(), json.get("TTL")),
            (Some("3s"), None)
        );
        // Plaintext: neither TLS field is sent.
        assert_eq!(
            (json.get("GRPCUseTLS"), json.get("TLSSkipVerify")),
            (None, None)
        );
        for (tls, skip) in [(CheckTls::Verify, None), (CheckTls::SkipVerify, Some(true))] {
            let reg = Registration::builder("s", "i")
                .port(1)
                .check(HealthCheck::grpc_tls("h:1", Duration::from_secs(3), tls))
                .build()
                .unwrap();
            let p = ServiceRegistration::new(&reg.instance_or_host("h").unwrap(), &reg);
            let json = serde_json::to_value(&p.check).unwrap();
            assert_eq!(json["GRPCUseTLS"], true, "{tls:?}");
            assert_eq!(
                json.get("TLSSkipVerify").and_then(|v| v.as_bool()),
                skip,
                "{tls:?}"
            );
        }
    }

    #[test]
    fn weight_precedence_weights_then_meta_then_tag_then_one() {
        let base = |weights: &str, meta: &str, tags: &str| {
            entry(&format!(
                r#"{{"Node":{{"Address":"10.0.0.1"}},"Service":{{"ID":"a","Service":"s","Address":"h","Port":1,
                "Tags":{tags},"Meta":{meta},"Weights":{weights}}}}}"#
            ))
            .unwrap()
            .weight()
            .get()
        };
        let w5 = r#"{"Passing":5,"Warning":1}"#;
        let w1 = r#"{"Passing":1,"Warning":1}"#;
        assert_eq!(base(w5, r#"{"weight":"7"}"#, r#"["weight:9"]"#), 5);
        assert_eq!(base(w1, r#"{"weight":"7"}"#, r#"["weight:9"]"#), 7);
        assert_eq!(base(w1, "null", r#"["weight:9"]"#), 9);
        assert_eq!(base("null", "{}", "null"), 1);
        assert_eq!(base(w1, "{}", "[]"), 1);
    }

    #[test]
    fn address_falls_back_to_node_and_zone_comes_from_meta() {
        let i = entry(
            r#"{"Node":{"Address":"10.0.0.9"},"Service":{"ID":"a","Service":"s","Address":"","Port":7,
            "Meta":{"zone":"z1","k":"v"}}}"#,
        )
        .unwrap();
        assert_eq!(i.host(), "10.0.0.9");
        assert_eq!(i.zone(), Some("z1"));
        assert_eq!(i.metadata().len(), 1);
        assert_eq!(i.metadata()["k"], "v");
    }

    #[test]
    fn bad_entries_are_errors_not_panics() {
        for bad in [
            r#"{"Service":{"ID":"a","Service":"s","Address":"h","Port":0}}"#,
            r#"{"Service":{"ID":"a","Service":"s","Address":"h","Port":70000}}"#,
            r#"{"Service":{"ID":"a b","Service":"s","Address":"h","Port":1}}"#,
            r#"{"Service":{"ID":"a","Service":"s","Address":"","Port":1}}"#,
            r#"{"Service":{"ID":"a","Service":"s","Address":"h","Port":1,"Meta":{"weight":"x"}}}"#,
            r#"{"Service":{"ID":"a","Service":"s","Address":"h","Port":1,"Weights":{"Passing":0}}}"#,
        ] {
            assert!(entry(bad).is_err(), "{bad}");
        }
    }

    fn health_of(checks: &str) -> Health {
        entry(&format!(
            r#"{{"Service":{{"ID":"a","Service":"s","Address":"h","Port":1}}{checks}}}"#
        ))
        .unwrap()
        .health()
    }

    fn check(id: &str, service_id: &str, status: &str) -> String {
        format!(
            r#"{{"CheckID":"{id}","ServiceID":"{service_id}","Status":"{status}","Node":"n1"}}"#
        )
    }

    #[test]
    fn all_checks_passing_is_passing() {
        let checks = [
            check("serfHealth", "", "passing"),
            check("service:a", "a", "passing"),
        ];
        let h = health_of(&format!(r#","Checks":[{}]"#, checks.join(",")));
        assert_eq!(h, Health::Passing);
    }

    #[test]
    fn one_warning_check_is_warning() {
        let checks = [
            check("serfHealth", "", "passing"),
            check("service:a", "a", "warning"),
            check("extra", "a", "passing"),
        ];
        let h = health_of(&format!(r#","Checks":[{}]"#, checks.join(",")));
        assert_eq!(h, Health::Warning);
    }

    #[test]
    fn critical_node_check_makes_the_instance_critical() {
        // The node's serfHealth has no ServiceID, and counts like Consul's ?passing counts it.
        let checks = [
            check("serfHealth", "", "critical"),
            check("service:a", "a", "passing"),
            check("other", "a", "warning"),
        ];
        let h = health_of(&format!(r#","Checks":[{}]"#, checks.join(",")));
        assert_eq!(h, Health::Critical);
    }

    #[test]
    fn unknown_or_missing_status_is_critical() {
        for bad in [
            check("service:a", "a", "maintenance"),
            check("service:a", "a", "PASSING"),
            r#"{"CheckID":"service:a","ServiceID":"a"}"#.to_owned(),
            r#"{"CheckID":"service:a","Status":null}"#.to_owned(),
        ] {
            let h = health_of(&format!(
                r#","Checks":[{},{}]"#,
                check("serfHealth", "", "passing"),
                bad
            ));
            assert_eq!(h, Health::Critical, "{bad}");
        }
    }

    #[test]
    fn no_checks_is_passing() {
        assert_eq!(health_of(""), Health::Passing);
        assert_eq!(health_of(r#","Checks":null"#), Health::Passing);
        assert_eq!(health_of(r#","Checks":[]"#), Health::Passing);
    }

    #[test]
    fn a_check_of_the_wrong_shape_is_an_error_not_a_panic() {
        for bad in [
            r#","Checks":{}"#,
            r#","Checks":[{"Status":7}]"#,
            r#","Checks":"x""#,
        ] {
            let json =
                format!(r#"{{"Service":{{"ID":"a","Service":"s","Address":"h","Port":1}}{bad}}}"#);
            assert!(entry(&json).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(3333)), "3333ms");
        // Consul parses Go durations: a TTL under a second keeps its precision.
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
    }

    fn svc() -> ServiceName {
        ServiceName::new("s").unwrap()
    }

    fn valid(id: &str, port: u16) -> String {
        format!(
            r#"{{"Node":{{"Node":"n1","Address":"10.0.0.1","Meta":{{"k":"v"}}}},
            "Service":{{"ID":"{id}","Service":"s","Address":"","Port":{port},"Tags":[],
            "Meta":{{"note":"é漢 🎉"}},"Weights":{{"Passing":1,"Warning":1}},"Proxy":{{"Expose":{{}}}}}},
            "Checks":[{{"CheckID":"serfHealth","Status":"passing","Output":"alive, \"ok\" ✓"}}]}}"#
        )
    }

    /// Reads `body` in the given pieces.
    fn read_in(pieces: &[&[u8]]) -> Result<Vec<ServiceInstance>, BadAnswer> {
        let service = svc();
        let mut reader = HealthEntries::new(&service);
        for piece in pieces {
            reader.feed(piece)?;
        }
        reader.finish()
    }

    fn ids(got: &[ServiceInstance]) -> Vec<&str> {
        got.iter().map(|i| i.id().as_str()).collect()
    }

    #[test]
    fn an_answer_reads_the_same_however_it_is_cut_into_chunks() {
        let body = format!(
            " [ {} ,\n{},{}\n ] \n",
            valid("a", 1),
            valid("b\\u002dc", 2),
            valid("d", 3)
        );
        let body = body.as_bytes();
        let whole = read_in(&[body]).unwrap();
        assert_eq!(ids(&whole), ["a", "b-c", "d"]);
        assert_eq!(whole[0].host(), "10.0.0.1");
        assert_eq!(whole[0].metadata()["note"], "é漢 🎉");
        for at in 0..=body.len() {
            let got = read_in(&[&body[..at], &body[at..]]).unwrap();
            assert_eq!(got, whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(read_in(&bytes).unwrap(), whole);
        assert!(read_in(&[b"[]"]).unwrap().is_empty());
        assert!(read_in(&[b" [", b" ", b"]"]).unwrap().is_empty());
    }

    #[test]
    fn entries_of_the_wrong_shape_or_service_are_skipped_and_nothing_else_is_lost() {
        let body = format!(
            r#"[{},{{"Service":{{"ID":"x","Service":"s","Port":"eighty"}}}},56,"str",null,[1,2],
            {{"Checks":{{}},"Service":{{"ID":"y","Service":"s","Address":"h","Port":1}}}},
            {{"Service":{{"ID":"z","Service":"other","Address":"h","Port":1}}}},
            {{"Service":{{"ID":"p0","Service":"s","Address":"h","Port":0}}}},{}]"#,
            valid("a", 1),
            valid("b", 2)
        );
        let body = body.as_bytes();
        for at in 0..=body.len() {
            // Split inside `56` too: the number must not be read as `5`.
            let got = read_in(&[&body[..at], &body[at..]]).unwrap();
            assert_eq!(ids(&got), ["a", "b"], "split at {at}");
        }
    }

    #[test]
    fn an_answer_that_is_no_array_or_is_cut_off_fails_as_a_whole() {
        let one = valid("a", 1);
        for bad in [
            "{}".to_owned(),
            r#""x""#.to_owned(),
            "".to_owned(),
            format!("[{one}"),
            format!("[{one},"),
            format!("[{one}] x"),
            format!("[{one}][]"),
            format!("[{one} {one}]"),
            r#"[{"Service":}]"#.to_owned(),
            r#"[{"Service":{"ID":"a""#.to_owned(),
            "[1,]".to_owned(),
            "[,1]".to_owned(),
            format!("[{one}é]"),
        ] {
            let err = read_in(&[bad.as_bytes()]).unwrap_err();
            assert!(!err.reason.is_empty(), "{bad}");
            assert_eq!(err.head, bad.as_bytes()[..bad.len().min(HEAD_MAX)], "{bad}");
        }
    }

    #[test]
    fn an_answer_that_is_not_utf8_fails_as_a_whole() {
        let mut bad = format!("[{}]", valid("a", 1)).into_bytes();
        let at = bad.len() - 10;
        bad[at] = 0xff;
        assert!(read_in(&[&bad]).unwrap_err().reason.contains("UTF-8"));
        // Cut inside a character, and never finished.
        let cut = "[\"é".as_bytes();
        let err = read_in(&[&cut[..cut.len() - 1]]).unwrap_err();
        assert!(err.reason.contains("UTF-8"), "{}", err.reason);
    }

    #[test]
    fn a_large_answer_is_never_held_whole() {
        let entries: Vec<String> = (0..4000).map(|i| valid(&format!("i{i:04}"), 1)).collect();
        let body = format!("[{}]", entries.join(","));
        let service = svc();
        let mut reader = HealthEntries::new(&service);
        let chunk = 16 << 10;
        for piece in body.as_bytes().chunks(chunk) {
            reader.feed(piece).unwrap();
            // What is kept: the read part until it is compacted, and the unread rest.
            assert!(
                reader.buf.len() <= COMPACT_AFTER + 2 * chunk,
                "{}",
                reader.buf.len()
            );
        }
        assert!(body.len() > 10 * (COMPACT_AFTER + 2 * chunk));
        assert_eq!(reader.finish().unwrap().len(), 4000);
    }
}

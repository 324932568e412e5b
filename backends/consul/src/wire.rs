//! Consul's JSON: the registration payload, and health entries turned into instances.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;
use waypost_core::{Health, HealthCheck, Registration, ServiceInstance};

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
            } => {
                check.http = Some(url.clone());
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

/// One element of `GET /v1/health/service/<name>`.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntry {
    #[serde(default)]
    pub node: Option<Node>,
    pub service: Service,
    /// The node's checks (`serfHealth`, with an empty `ServiceID`) and the service's.
    #[serde(default)]
    pub checks: Option<Vec<EntryCheck>>,
}

/// One element of a health entry's `Checks`.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EntryCheck {
    #[serde(rename = "CheckID", default)]
    pub check_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Node {
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Service {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default)]
    pub address: Option<String>,
    pub port: u32,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub weights: Option<Weights>,
}

impl HealthEntry {
    /// The instance this entry describes, validated like any input.
    ///
    /// Address: `Service.Address`, else `Node.Address`. Weight: `Service.Weights.Passing` when
    /// set above Consul's default of 1, else `Meta.weight`, else a `weight:N` tag (read by the
    /// instance builder), else 1. Zone: `Meta.zone` (taken out of the metadata). Health: the
    /// worst status of all the entry's checks, node checks included (as Consul's `?passing`
    /// filter counts them); passing when it has none.
    pub(crate) fn into_instance(self) -> Result<ServiceInstance, String> {
        let health = aggregate_health(self.checks.as_deref().unwrap_or_default(), &self.service);
        let svc = self.service;
        let host = svc
            .address
            .filter(|a| !a.is_empty())
            .or_else(|| self.node.and_then(|n| n.address))
            .unwrap_or_default();
        let port =
            u16::try_from(svc.port).map_err(|_| format!("port {} is out of range", svc.port))?;
        let mut meta = svc.meta.unwrap_or_default();
        let zone = meta.remove(ZONE_META_KEY);
        let mut b = ServiceInstance::builder(svc.service, svc.id)
            .host(host)
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

/// The worst of `checks`' statuses: critical over warning over passing. A status this crate
/// does not know (Consul reports maintenance as a critical check, but a future one may not) is
/// counted as critical: an instance is not served on a status nobody understood.
fn aggregate_health(checks: &[EntryCheck], svc: &Service) -> Health {
    let mut worst = Health::Passing;
    for check in checks {
        let status = check.status.as_deref().unwrap_or_default();
        let health = match status {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            "critical" => Health::Critical,
            _ => {
                warn!(
                    service = %svc.service,
                    id = %svc.id,
                    check = ?check.check_id.as_deref().unwrap_or_default(),
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
            .into_instance()
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
    fn http_and_tcp_checks_are_run_by_consul() {
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
        assert_eq!(p.check.status, None);
        assert_eq!(p.check.ttl, None);
        assert_eq!(p.check.deregister_critical_service_after, "60s");
        let reg = Registration::builder("s", "i")
            .port(1)
            .check(HealthCheck::tcp("127.0.0.1:1", Duration::from_secs(2)))
            .build()
            .unwrap();
        let p = ServiceRegistration::new(&reg.instance_or_host("h").unwrap(), &reg);
        assert_eq!(p.check.tcp.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(p.check.timeout.as_deref(), Some("2s"));
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
}

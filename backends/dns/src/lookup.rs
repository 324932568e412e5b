//! One look-up: the SRV records of a service, the addresses of their targets, the instances.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures::{stream, StreamExt, TryStreamExt};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::proto::xfer::{DnsHandle, DnsResponse, FirstAnswer};
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use hickory_resolver::Name;
use waypost_core::{Error, ServiceInstance, ServiceName, Weight};

use crate::{Inner, BACKEND};

/// How many target address questions are in flight at once.
const TARGET_LOOKUPS_IN_FLIGHT: usize = 8;

/// One SRV record, as far as discovery needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: Name,
}

/// The instances of `service` now: see [`Dns`](crate::Dns)'s docs for the rules.
pub(crate) async fn instances(
    inner: &Inner,
    service: &ServiceName,
) -> Result<Vec<ServiceInstance>, Error> {
    let name = inner.template.render(service)?;
    let operation = format!("SRV {name}");
    let answer = match ask(inner, &operation, name.clone(), RecordType::SRV).await? {
        Answer::Records(answer) => answer,
        // NXDOMAIN or no SRV records: nobody provides the service.
        Answer::Nothing => return Ok(Vec::new()),
        Answer::Refused { error, .. } => return Err(error),
    };
    let records: Vec<Srv> = answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(srv) => Some(Srv {
                priority: srv.priority(),
                weight: srv.weight(),
                port: srv.port(),
                target: srv.target().clone(),
            }),
            _ => None,
        })
        .collect();
    // Addresses the answer carries (Consul: the additional section), by target.
    let mut addresses: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for record in answer.answers().iter().chain(answer.additionals()) {
        if let Some(ip) = ip_of(record) {
            addresses.entry(key(record.name())).or_default().push(ip);
        }
    }
    // The lowest priority value whose targets have an address wins (RFC 2782: use the lowest
    // priority you can reach; the others are backups).
    for group in by_priority(records) {
        // The group's other targets are asked for, a few at a time.
        let mut missing: BTreeMap<String, Name> = BTreeMap::new();
        for r in &group {
            let k = key(&r.target);
            if !addresses.contains_key(&k) {
                missing.entry(k).or_insert_with(|| r.target.clone());
            }
        }
        let name = &name;
        let resolved: Vec<(String, Vec<IpAddr>)> = stream::iter(missing)
            .map(|(k, target)| async move {
                Ok::<_, Error>((k, addresses_of(inner, name, target).await?))
            })
            .buffered(TARGET_LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        addresses.extend(resolved);
        let instances = build(service, &group, &addresses);
        if !instances.is_empty() {
            return Ok(instances);
        }
    }
    Ok(Vec::new())
}

/// The addresses of an SRV target: its A records, else its AAAA records (none when it has
/// neither, or when the server refuses to resolve it: Consul without recursors answers REFUSED
/// for a service registered with a host name outside its domain). A question that gets no
/// answer at all fails the whole look-up: the server is unreachable, and half an answer would
/// pass for the whole set.
async fn addresses_of(inner: &Inner, srv_name: &Name, target: Name) -> Result<Vec<IpAddr>, Error> {
    for rtype in [RecordType::A, RecordType::AAAA] {
        let operation = format!("{rtype} {target} (target of {srv_name})");
        match ask(inner, &operation, target.clone(), rtype).await? {
            Answer::Records(answer) => {
                // Whatever the owner: a recursive server may have followed a CNAME.
                let ips: Vec<IpAddr> = answer.answers().iter().filter_map(ip_of).collect();
                if !ips.is_empty() {
                    return Ok(ips);
                }
            }
            Answer::Nothing => {}
            Answer::Refused { code, .. } => {
                tracing::debug!(%target, %code, srv = %srv_name, "the server does not resolve this SRV target; its records are left out");
                return Ok(Vec::new());
            }
        }
    }
    Ok(Vec::new())
}

fn ip_of(record: &Record) -> Option<IpAddr> {
    match record.data() {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

/// The records grouped by priority value, lowest first, without those RFC 2782 says name no
/// server ("." as the target; here also port 0, which no client can connect to).
pub(crate) fn by_priority(records: Vec<Srv>) -> Vec<Vec<Srv>> {
    let mut groups: BTreeMap<u16, Vec<Srv>> = BTreeMap::new();
    for r in records {
        if r.target.is_root() || r.port == 0 {
            tracing::debug!(target = %r.target, port = r.port, "SRV record names no server; skipped");
            continue;
        }
        groups.entry(r.priority).or_default().push(r);
    }
    groups.into_values().collect()
}

/// The instances the records describe, given their targets' addresses: one per record, at the
/// target's lowest IPv4 address (else its lowest IPv6 address), id `host:port`, weight the SRV
/// weight (0 counts as 1). Records that name the same address and port are one instance whose
/// weight is their sum (capped at [`Weight::MAX`]). Targets without an address are skipped.
pub(crate) fn build(
    service: &ServiceName,
    records: &[Srv],
    addresses: &BTreeMap<String, Vec<IpAddr>>,
) -> Vec<ServiceInstance> {
    let mut by_id: BTreeMap<String, (IpAddr, u16, u32)> = BTreeMap::new();
    for r in records {
        let Some(ip) = addresses.get(&key(&r.target)).and_then(|ips| pick(ips)) else {
            tracing::debug!(target = %r.target, "SRV target has no address; skipped");
            continue;
        };
        let id = authority(ip, r.port);
        let weight = u32::from(r.weight.max(1));
        let entry = by_id.entry(id).or_insert((ip, r.port, 0));
        entry.2 = entry.2.saturating_add(weight).min(Weight::MAX);
    }
    by_id
        .into_iter()
        .filter_map(|(id, (ip, port, weight))| {
            match ServiceInstance::builder(service.as_str(), &id)
                .host(ip.to_string())
                .port(port)
                .weight(weight)
                .build()
            {
                Ok(instance) => Some(instance),
                Err(e) => {
                    // Every part was checked above; an instance that still fails is left out
                    // rather than failing the whole answer.
                    tracing::warn!(%id, error = %e, "SRV record does not make an instance; skipped");
                    None
                }
            }
        })
        .collect()
}

/// The address an instance gets: the lowest IPv4 address, else the lowest IPv6 address, so
/// that the choice does not change with the order of the records.
fn pick(ips: &[IpAddr]) -> Option<IpAddr> {
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).min();
    v4.or_else(|| ips.iter().min()).copied()
}

/// `ip:port`, IPv6 in brackets.
pub(crate) fn authority(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Names compare without case and without the final dot.
fn key(name: &Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// What the server said to one question.
enum Answer {
    /// Records (of some type).
    Records(DnsResponse),
    /// The name does not exist or has no records of the type (NXDOMAIN, or NOERROR without
    /// answers).
    Nothing,
    /// An error code (SERVFAIL, REFUSED, ...), and the error it makes for the caller.
    Refused { code: ResponseCode, error: Error },
}

/// Asks one question within the query timeout. `Err`: no answer (unreachable, timed out,
/// unreadable).
async fn ask(
    inner: &Inner,
    operation: &str,
    name: Name,
    rtype: RecordType,
) -> Result<Answer, Error> {
    let question = inner
        .client
        .lookup(Query::query(name, rtype), inner.request)
        .first_answer();
    match tokio::time::timeout(inner.query_timeout, question).await {
        Err(_) => Err(timed_out(inner, operation)),
        Ok(Ok(answer)) => Ok(Answer::Records(answer)),
        Ok(Err(e)) => classify(inner, operation, e),
    }
}

fn timed_out(inner: &Inner, operation: &str) -> Error {
    Error::unavailable(
        BACKEND,
        operation,
        format!(
            "no answer from {} over {} within {:?}; check that the DNS server runs there and \
             that the port is open for {} (or raise DnsBuilder::query_timeout)",
            inner.servers, inner.protocol, inner.query_timeout, inner.protocol
        ),
    )
}

/// What a failed question means here.
fn classify(inner: &Inner, operation: &str, e: ProtoError) -> Result<Answer, Error> {
    let servers = &inner.servers;
    let cause: Option<waypost_core::Cause> = Some(Arc::new(e.clone()));
    let unavailable = |message: String| Error::Unavailable {
        backend: BACKEND,
        operation: operation.to_owned(),
        message,
        source: cause.clone(),
    };
    match e.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => {
            let code = *response_code;
            let error = match code {
                ResponseCode::NXDomain | ResponseCode::NoError => return Ok(Answer::Nothing),
                ResponseCode::ServFail => unavailable(format!(
                    "{servers} answered SERVFAIL: the server cannot answer for the domain {:?} \
                     now (a Consul agent without a cluster leader answers so; check the \
                     server's log)",
                    inner.template.domain()
                )),
                ResponseCode::Refused => unavailable(format!(
                    "{servers} answered REFUSED: check that it serves the domain {:?} and \
                     accepts queries from this host",
                    inner.template.domain()
                )),
                code => Error::protocol(BACKEND, operation, format!("{servers} answered {code}")),
            };
            Ok(Answer::Refused { code, error })
        }
        ProtoErrorKind::Timeout => Err(timed_out(inner, operation)),
        ProtoErrorKind::Io(io) => Err(unavailable(format!(
            "cannot talk to {servers} over {}: {io}; check that the DNS server runs at that \
             address and port",
            inner.protocol
        ))),
        ProtoErrorKind::NoConnections | ProtoErrorKind::Busy => Err(unavailable(format!(
            "no connection to {servers} over {}: {e}; check that the DNS server runs at that \
             address and port",
            inner.protocol
        ))),
        _ if e.is_io() => Err(unavailable(format!(
            "cannot talk to {servers} over {}: {e}",
            inner.protocol
        ))),
        // Hickory reports a connection the server closed, and a truncated answer that could not
        // be asked again, as messages.
        ProtoErrorKind::Message(_) | ProtoErrorKind::Msg(_) => Err(unavailable(format!(
            "no usable answer from {servers} over {}: {e}",
            inner.protocol
        ))),
        _ => Err(Error::protocol(
            BACKEND,
            operation,
            format!("{servers} gave an answer that cannot be read: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port,
            target: Name::from_ascii(target).unwrap(),
        }
    }

    fn service() -> ServiceName {
        "users".parse().unwrap()
    }

    #[test]
    fn one_instance_per_record_at_the_target_address() {
        let records = vec![
            srv(1, 5, 8080, "b.node.dc1.consul."),
            srv(1, 0, 8081, "a.node.dc1.consul."),
            srv(1, 2, 9000, "v6.example."),
        ];
        let mut addresses = BTreeMap::new();
        addresses.insert(
            "b.node.dc1.consul".to_owned(),
            vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        );
        addresses.insert(
            "a.node.dc1.consul".to_owned(),
            vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
        );
        addresses.insert(
            "v6.example".to_owned(),
            vec![
                IpAddr::V6("fd00::2".parse().unwrap()),
                IpAddr::V6("fd00::1".parse().unwrap()),
            ],
        );
        let got = build(&service(), &records, &addresses);
        let shown: Vec<(String, String, u16, u32)> = got
            .iter()
            .map(|i| {
                (
                    i.id().to_string(),
                    i.host().to_owned(),
                    i.port(),
                    i.weight().get(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("10.0.0.1:8081".into(), "10.0.0.1".into(), 8081, 1),
                ("10.0.0.2:8080".into(), "10.0.0.2".into(), 8080, 5),
                ("[fd00::1]:9000".into(), "fd00::1".into(), 9000, 2),
            ]
        );
        assert!(got.iter().all(|i| i.service().as_str() == "users"
            && i.tags().is_empty()
            && i.metadata().is_empty()
            && i.zone().is_none()));
        assert_eq!(got[2].authority(), "[fd00::1]:9000");
    }

    #[test]
    fn records_for_one_address_add_up() {
        let records = vec![
            srv(1, 3, 80, "x.example."),
            srv(1, 4, 80, "X.Example"),
            srv(1, 65535, 81, "x.example."),
        ];
        let mut addresses = BTreeMap::new();
        addresses.insert(
            "x.example".to_owned(),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        let got = build(&service(), &records, &addresses);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id().as_str(), "127.0.0.1:80");
        assert_eq!(got[0].weight().get(), 7);
        assert_eq!(got[1].weight().get(), 65535);
        let many: Vec<Srv> = (0..20).map(|_| srv(1, 65535, 80, "x.example.")).collect();
        let got = build(&service(), &many, &addresses);
        assert_eq!(got[0].weight().get(), Weight::MAX);
    }

    #[test]
    fn targets_without_address_are_left_out() {
        let records = vec![
            srv(1, 1, 80, "gone.example."),
            srv(1, 1, 81, "here.example."),
        ];
        let mut addresses = BTreeMap::new();
        addresses.insert("gone.example".to_owned(), vec![]);
        addresses.insert(
            "here.example".to_owned(),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        let got = build(&service(), &records, &addresses);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].port(), 81);
    }

    #[test]
    fn records_are_grouped_by_priority_without_the_no_server_ones() {
        let groups = by_priority(vec![
            srv(20, 1, 80, "backup.example."),
            srv(10, 1, 80, "a.example."),
            srv(10, 1, 81, "b.example."),
            srv(5, 1, 80, "."),
            srv(5, 1, 0, "zero.example."),
        ]);
        let targets: Vec<Vec<String>> = groups
            .iter()
            .map(|g| g.iter().map(|r| r.target.to_ascii()).collect())
            .collect();
        assert_eq!(
            targets,
            vec![
                vec!["a.example.".to_owned(), "b.example.".to_owned()],
                vec!["backup.example.".to_owned()],
            ]
        );
        assert!(by_priority(vec![srv(1, 1, 80, ".")]).is_empty());
    }
}

//! The few agent and health endpoints Waypost uses, with every bad answer turned into a typed
//! [`Error`].

use std::sync::OnceLock;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use tokio::sync::SemaphorePermit;
use tracing::warn;
use waypost_core::{Error, ServiceInstance, ServiceName};

use crate::wire::{BadAnswer, HealthEntries, ServiceRegistration};
use crate::BACKEND;
use waypost_core::Backoff;

/// How much of a bad answer's body goes into an error message.
const SNIPPET_MAX: usize = 200;

/// A configured connection to one agent.
pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: Url,
    /// Marked sensitive: never printed.
    pub(crate) token: Option<HeaderValue>,
    pub(crate) datacenter: Option<String>,
    pub(crate) request_timeout: Duration,
    pub(crate) default_host: Option<String>,
    pub(crate) detected_host: OnceLock<String>,
    pub(crate) backoff: (Duration, Duration),
    /// Permits for ordinary (not blocking) requests in flight: see
    /// [`ORDINARY_REQUESTS`](crate::ORDINARY_REQUESTS).
    pub(crate) ordinary: tokio::sync::Semaphore,
}

/// How long a request may wait for its answer.
#[derive(Clone, Copy, Debug)]
enum Wait {
    /// An ordinary request: the request timeout, and a permit of
    /// [`ORDINARY_REQUESTS`](crate::ORDINARY_REQUESTS).
    Ordinary,
    /// A blocking query that waits up to this long for a change: its own connection, beside
    /// the ordinary requests.
    Blocking(Duration),
}

/// What a discovery query asks for.
#[derive(Clone, Debug)]
pub(crate) struct HealthQuery {
    pub passing_only: bool,
    pub tags: Vec<String>,
    pub stale: bool,
    pub cached: bool,
}

/// A health answer: the valid instances, sorted by id, and the index to block on next.
#[derive(Debug)]
pub(crate) struct HealthAnswer {
    pub instances: Vec<ServiceInstance>,
    pub index: Option<u64>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Api {
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff.0, self.backoff.1)
    }

    /// The host registered for registrations that name none: the configured default, else
    /// [`waypost_core::local_ipv4`].
    pub(crate) fn default_host(&self) -> &str {
        if let Some(h) = &self.default_host {
            return h;
        }
        self.detected_host
            .get_or_init(|| waypost_core::local_ipv4().to_string())
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Each segment is percent-encoded: instance ids may hold '?', '#', '%'.
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request; the answer's status and headers, its body still to come, and the
    /// permit an ordinary request holds until its body is read.
    async fn start(
        &self,
        operation: &str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        wait: Wait,
    ) -> Result<(reqwest::Response, Option<SemaphorePermit<'_>>), Error> {
        let (timeout, permit) = match wait {
            // The semaphore is never closed, so a permit always comes.
            Wait::Ordinary => (self.request_timeout, self.ordinary.acquire().await.ok()),
            // The server adds up to wait/16 of jitter: a timeout of exactly `wait` would fail
            // every idle watch.
            Wait::Blocking(wait) => (wait * 17 / 16 + self.request_timeout, None),
        };
        let mut req = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token.clone());
        }
        if let Some(body) = body {
            req = req.header("Content-Type", "application/json").body(body);
        }
        let resp = req.send().await.map_err(|e| transport(operation, e))?;
        Ok((resp, permit))
    }

    /// Sends a request and reads its whole answer.
    async fn send(
        &self,
        operation: &str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        wait: Wait,
    ) -> Result<Answer, Error> {
        let (resp, _permit) = self.start(operation, method, url, body, wait).await?;
        read_answer(operation, resp).await
    }

    /// `GET` of one of the datacenter-wide lists the shared watch follows (`path`), blocking
    /// when `index` is above 0: the answer's index and its body.
    pub(crate) async fn list(
        &self,
        path: &[&str],
        stale: bool,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<u64>, Vec<u8>), Error> {
        let op = format!("GET /{}", path.join("/"));
        let mut url = self.url(path);
        let mut how = Wait::Ordinary;
        {
            let mut qp = url.query_pairs_mut();
            if let Some(dc) = &self.datacenter {
                qp.append_pair("dc", dc);
            }
            if stale {
                qp.append_key_only("stale");
            }
            if index > 0 {
                qp.append_pair("index", &index.to_string());
                qp.append_pair("wait", &crate::wire::go_duration(wait));
                how = Wait::Blocking(wait);
            }
        }
        let a = self.send(&op, Method::GET, url, None, how).await?;
        ok_or_error(&op, &a)?;
        let index = a
            .headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok((index, a.body))
    }

    /// `PUT /v1/agent/service/register`.
    pub(crate) async fn register(&self, reg: &ServiceRegistration) -> Result<(), Error> {
        let op = format!("register {} of {}", reg.id, reg.name);
        let body = serde_json::to_vec(reg)
            .map_err(|e| Error::protocol(BACKEND, &op, format!("cannot encode: {e}")))?;
        let url = self.url(&["v1", "agent", "service", "register"]);
        let a = self
            .send(&op, Method::PUT, url, Some(body), Wait::Ordinary)
            .await?;
        ok_or_error(&op, &a)
    }

    /// `PUT /v1/agent/check/pass/<check>`. A check the agent does not know (it restarted and
    /// forgot the service) is [`Error::NotFound`]: Consul says 404 or, in older versions, 500
    /// ("does not have associated TTL").
    pub(crate) async fn pass(&self, check_id: &str) -> Result<(), Error> {
        let op = format!("heartbeat {check_id}");
        let url = self.url(&["v1", "agent", "check", "pass", check_id]);
        let a = self
            .send(&op, Method::PUT, url, None, Wait::Ordinary)
            .await?;
        if a.status == StatusCode::NOT_FOUND || a.status == StatusCode::INTERNAL_SERVER_ERROR {
            return Err(Error::NotFound {
                backend: BACKEND,
                what: format!("check {check_id} ({})", snippet(&a.body)),
            });
        }
        ok_or_error(&op, &a)
    }

    /// `GET /v1/agent/service/<id>`: whether the agent still knows the service.
    pub(crate) async fn has_service(&self, id: &str) -> Result<bool, Error> {
        let op = format!("look up service {id}");
        let url = self.url(&["v1", "agent", "service", id]);
        let a = self
            .send(&op, Method::GET, url, None, Wait::Ordinary)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        ok_or_error(&op, &a).map(|()| true)
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown service counts as deregistered.
    pub(crate) async fn deregister(&self, id: &str) -> Result<(), Error> {
        let op = format!("deregister {id}");
        let url = self.url(&["v1", "agent", "service", "deregister", id]);
        let a = self
            .send(&op, Method::PUT, url, None, Wait::Ordinary)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        ok_or_error(&op, &a)
    }

    /// `GET /v1/health/service/<name>`, blocking when `index` is above 0.
    pub(crate) async fn health(
        &self,
        service: &ServiceName,
        q: &HealthQuery,
        index: u64,
        wait: Duration,
    ) -> Result<HealthAnswer, Error> {
        let op = format!("GET /v1/health/service/{service}");
        let mut url = self.url(&["v1", "health", "service", service.as_str()]);
        let mut how = Wait::Ordinary;
        {
            let mut qp = url.query_pairs_mut();
            if q.passing_only {
                qp.append_pair("passing", "true");
            }
            for tag in &q.tags {
                qp.append_pair("tag", tag);
            }
            if let Some(dc) = &self.datacenter {
                qp.append_pair("dc", dc);
            }
            if q.stale {
                qp.append_key_only("stale");
            }
            if q.cached {
                qp.append_key_only("cached");
            }
            if index > 0 {
                qp.append_pair("index", &index.to_string());
                qp.append_pair("wait", &crate::wire::go_duration(wait));
                how = Wait::Blocking(wait);
            }
        }
        // The permit, if any, is held until the body is read.
        let (mut resp, _permit) = self.start(&op, Method::GET, url, None, how).await?;
        if !resp.status().is_success() {
            let a = read_answer(&op, resp).await?;
            return Err(status_error(&op, a.status, &a.body));
        }
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bad = |e: BadAnswer, headers: &HeaderMap| {
            Error::protocol(
                BACKEND,
                &op,
                format!(
                    "expected a JSON array of health entries, got {} ({}): {}",
                    content_type(headers),
                    e.reason,
                    snippet(&e.head)
                ),
            )
        };
        // Read as it arrives: 10,000 instances are about 10 MB of JSON (20 MB from a `-dev`
        // agent, which indents), neither held whole nor read only after the last byte.
        let mut entries = HealthEntries::new(service);
        while let Some(chunk) = resp.chunk().await.map_err(|e| unreadable(&op, e))? {
            entries.feed(&chunk).map_err(|e| bad(e, resp.headers()))?;
        }
        let instances = settle(
            service,
            entries.finish().map_err(|e| bad(e, resp.headers()))?,
            &q.tags,
        );
        Ok(HealthAnswer { instances, index })
    }
}

/// `instances` (of one answer) sorted by id, one per id (the healthiest of duplicates), each
/// carrying every tag of `tags`.
fn settle(
    service: &ServiceName,
    mut instances: Vec<ServiceInstance>,
    tags: &[String],
) -> Vec<ServiceInstance> {
    // By id, and of one id the healthiest first (the one kept below): with
    // `passing_only(false)` a critical copy on a dead node must not hide a passing one.
    instances.sort_by(|a, b| a.id().cmp(b.id()).then_with(|| a.health().cmp(&b.health())));
    instances.dedup_by(|b, a| {
        let dup = a.id() == b.id();
        if dup {
            warn!(service = %service, id = %a.id(), "the same instance id on two nodes; keeping the healthiest");
        }
        dup
    });
    if !tags.is_empty() {
        // Old agents honour only one `tag` parameter: check them all here.
        instances.retain(|i| tags.iter().all(|t| i.has_tag(t)));
    }
    instances
}

fn transport(operation: &str, e: reqwest::Error) -> Error {
    let what = if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the connection failed"
    };
    Error::Unavailable {
        backend: BACKEND,
        operation: operation.to_owned(),
        message: format!("{what}: {e}"),
        source: Some(std::sync::Arc::new(e)),
    }
}

/// The whole answer at once: registrations, heartbeats, errors, the shared watch's lists.
async fn read_answer(operation: &str, mut resp: reqwest::Response) -> Result<Answer, Error> {
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let body = resp
        .bytes()
        .await
        .map_err(|e| unreadable(operation, e))?
        // Takes over the buffer the body was collected into, without a copy.
        .into();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A body that could not be read to its end.
fn unreadable(operation: &str, e: reqwest::Error) -> Error {
    if e.is_timeout() {
        transport(operation, e)
    } else {
        Error::protocol(
            BACKEND,
            operation,
            format!("the answer's body was cut off or unreadable ({e}); retried"),
        )
    }
}

fn ok_or_error(operation: &str, a: &Answer) -> Result<(), Error> {
    if a.status.is_success() {
        Ok(())
    } else {
        Err(status_error(operation, a.status, &a.body))
    }
}

/// The error an answer with a status other than success stands for.
fn status_error(operation: &str, status: StatusCode, body: &[u8]) -> Error {
    let body = snippet(body);
    match status {
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Error::PermissionDenied {
            backend: BACKEND,
            operation: operation.to_owned(),
            message: format!(
                "HTTP {status}: {body}; set CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE or .token()"
            ),
        },
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            Error::unavailable(BACKEND, operation, format!("HTTP {status}: {body}"))
        }
        // The agent answered, but could not reach the servers it forwards to (its own, or
        // another datacenter's for `?dc=`): an outage behind the agent, not a protocol fault.
        StatusCode::INTERNAL_SERVER_ERROR if unreachable_behind_agent(&body) => Error::unavailable(
            BACKEND,
            operation,
            format!(
                "HTTP {status}: {body}; the agent answered but could not reach the Consul servers \
                 (of its datacenter, or of the one asked for with ?dc=)"
            ),
        ),
        _ => Error::protocol(BACKEND, operation, format!("HTTP {status}: {body}")),
    }
}

/// Whether a 500's body is Consul saying that it could not reach its servers (what 1.8's
/// agents answer when the servers, or a remote datacenter asked for with `?dc=`, are gone).
/// The messages come from Go's and yamux's connection errors and are not a closed set: one
/// not listed stays a `Protocol` error, which watches retry all the same.
/// "No path to datacenter" is not among them: it is also the answer for a datacenter name
/// that does not exist, a mistake rather than an outage.
fn unreachable_behind_agent(body: &str) -> bool {
    const RPC: &str = "rpc error making call: ";
    // Failures of the connection a forwarded RPC travels on, not answers of a server.
    const TRANSPORT: [&str; 8] = [
        "EOF",
        "stream closed",
        "session shutdown",
        "broken pipe",
        "connection refused",
        "connection reset",
        "use of closed network connection",
        "i/o timeout",
    ];
    body.contains("rpc error getting client")
        || body.contains("No known Consul servers")
        || body.contains("No cluster leader")
        || body
            .find(RPC)
            .is_some_and(|at| TRANSPORT.iter().any(|t| body[at + RPC.len()..].contains(t)))
}

fn content_type(h: &HeaderMap) -> String {
    h.get("Content-Type")
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || "no content type".to_owned(),
            |v| format!("content type {v}"),
        )
}

/// The start of a body, printable and short, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(SNIPPET_MAX)
        .collect();
    if text.chars().count() > SNIPPET_MAX {
        out.push('…');
    }
    let out = out.trim().to_owned();
    if out.is_empty() {
        "(empty body)".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_short_and_printable() {
        assert_eq!(snippet(b""), "(empty body)");
        assert_eq!(snippet(b"a\nb"), "a b");
        let long = "x".repeat(1000);
        assert_eq!(snippet(long.as_bytes()).chars().count(), SNIPPET_MAX + 1);
    }

    #[test]
    fn statuses_map_to_typed_errors() {
        let answer = |status: u16| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: b"ACL not found".to_vec(),
        };
        assert!(ok_or_error("op", &answer(200)).is_ok());
        let denied = ok_or_error("register x", &answer(403)).unwrap_err();
        assert!(matches!(denied, Error::PermissionDenied { .. }));
        assert!(denied.to_string().contains("register x"));
        assert!(matches!(
            ok_or_error("op", &answer(500)),
            Err(Error::Protocol { .. })
        ));
        assert!(matches!(
            ok_or_error("op", &answer(503)),
            Err(Error::Unavailable { .. })
        ));
        // What an agent answers when its servers, or a remote datacenter, cannot be reached.
        for body in [
            "rpc error getting client: failed to get conn: dial tcp 127.0.0.1:1: connect: connection refused",
            "rpc error making call: EOF",
            "rpc error making call: write tcp 127.0.0.1:1->127.0.0.1:2: write: broken pipe",
            "rpc error making call: session shutdown",
            "No cluster leader",
        ] {
            let a = Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers: HeaderMap::new(),
                body: body.as_bytes().to_vec(),
            };
            let err = ok_or_error("GET /v1/health/service/x", &a).unwrap_err();
            assert!(matches!(err, Error::Unavailable { .. }), "{body}: {err}");
            assert!(err.to_string().contains("could not reach"), "{err}");
        }
        // A server's own answer carried back by the RPC is not an outage.
        let a = Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            body: b"rpc error making call: invalid service name".to_vec(),
        };
        assert!(matches!(ok_or_error("op", &a), Err(Error::Protocol { .. })));
    }

    fn instances_of(s: &ServiceName, entries: &[serde_json::Value]) -> Vec<ServiceInstance> {
        let body = serde_json::to_vec(entries).unwrap();
        let mut reader = HealthEntries::new(s);
        reader.feed(&body).unwrap();
        settle(s, reader.finish().unwrap(), &[])
    }

    #[test]
    fn of_duplicate_ids_the_healthiest_is_kept() {
        let entry = |host: &str, status: &str| {
            serde_json::json!({
                "Node": {"Address": host},
                "Service": {"ID": "a", "Service": "s", "Port": 1},
                "Checks": [{"CheckID": "serfHealth", "ServiceID": "", "Status": status}],
            })
        };
        let s = ServiceName::new("s").unwrap();
        for order in [
            vec![entry("10.0.0.1", "critical"), entry("10.0.0.2", "passing")],
            vec![entry("10.0.0.2", "passing"), entry("10.0.0.1", "critical")],
        ] {
            let got = instances_of(&s, &order);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].host(), "10.0.0.2");
            assert_eq!(got[0].health(), waypost_core::Health::Passing);
        }
        let got = instances_of(
            &s,
            &[entry("10.0.0.1", "critical"), entry("10.0.0.2", "warning")],
        );
        assert_eq!(got[0].health(), waypost_core::Health::Warning);
    }

    #[test]
    fn path_segments_are_escaped() {
        let api = crate::Consul::builder().build().unwrap();
        let url = api
            .api()
            .url(&["v1", "agent", "check", "pass", "service:a?b#c%d"]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8500/v1/agent/check/pass/service:a%3Fb%23c%25d"
        );
    }
}

//! Building a request and sending it: pick, send, record the outcome, retry elsewhere.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use waypost_core::{InstanceId, PickContext, PickGuard, ServiceInstance};

use super::error::{explain_tls, GaveUp, HttpError, TransportError};
use super::response::Response;
use super::{HashKey, Hedge, HttpClient};
use crate::retry::{Next, Race};
use crate::SCHEME_METADATA;

/// One request to the service, built from [`HttpClient::get`] and friends and sent with
/// [`send`](Self::send).
///
/// ```
/// # use waypost::http::HttpClient;
/// # use waypost::strategies::RoundRobin;
/// # use waypost::{Balancer, ServiceInstance, WatchEvent};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let port = listener.local_addr()?.port();
/// # let app = axum::Router::new().route("/users", axum::routing::post(|body: String| async move { body }));
/// # tokio::spawn(async move { axum::serve(listener, app).await });
/// # let balancer = Balancer::new(RoundRobin::new());
/// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("users", "u1").host("127.0.0.1").port(port).build()?]));
/// let client = HttpClient::new(balancer)?;
/// let response = client
///     .post("/users")
///     .header("x-request-id", "42")
///     .json(&serde_json::json!({"name": "ada"}))
///     .idempotent(true) // this endpoint upserts: safe to repeat on another instance
///     .send()
///     .await?;
/// assert!(response.status().is_success());
/// assert_eq!(response.text().await?, r#"{"name":"ada"}"#);
/// # Ok(())
/// # }
/// ```
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    client: HttpClient,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Option<Bytes>,
    idempotent: Option<bool>,
    key: Option<Vec<u8>>,
    timeout: Option<Duration>,
    error: Option<String>,
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &self.headers)
            .field("body_len", &self.body.as_ref().map(Bytes::len))
            .field("idempotent", &self.is_idempotent())
            .finish()
    }
}

/// Methods that RFC 9110 defines as idempotent: repeating them has the effect of sending once.
fn method_is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The URL of `path` at `instance` (IPv6 hosts bracketed): `https` when `https` is set or the
/// instance's metadata says `scheme=https`.
pub(crate) fn url_for(
    instance: &ServiceInstance,
    path: &str,
    https: bool,
) -> Result<reqwest::Url, String> {
    let tls = https
        || instance
            .metadata()
            .get(SCHEME_METADATA)
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}{}", instance.authority(), path);
    reqwest::Url::parse(&url).map_err(|e| format!("{url:?} is not a valid URL: {e}"))
}

impl RequestBuilder {
    pub(crate) fn new(client: HttpClient, method: Method, path: String) -> Self {
        let error = (!path.starts_with('/')).then(|| {
            format!(
                "the path must start with '/' (it is appended to http(s)://host:port), got {path:?}"
            )
        });
        RequestBuilder {
            client,
            method,
            path,
            headers: HeaderMap::new(),
            body: None,
            idempotent: None,
            key: None,
            timeout: None,
            error,
        }
    }

    /// Adds a header. An invalid name or value makes [`send`](Self::send) fail with
    /// [`HttpError::InvalidRequest`] before anything is sent.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        K::Error: fmt::Display,
        V: TryInto<HeaderValue>,
        V::Error: fmt::Display,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            (Err(e), _) => self.fail(format!("bad header name: {e}")),
            (_, Err(e)) => self.fail(format!("bad header value: {e}")),
        }
        self
    }

    /// Sets the body. Kept in memory, so that a retry can send it again.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.body = Some(body.into());
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(e) => self.fail(format!("the JSON body would not serialize: {e}")),
        }
        self
    }

    /// Declares whether repeating the request is safe, overriding the method's default (GET,
    /// HEAD, PUT, DELETE, OPTIONS and TRACE are; POST and PATCH are not). Only idempotent
    /// requests are retried after they were sent.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = Some(idempotent);
        self
    }

    /// The hash key for hashing strategies, overriding the client's
    /// [`HashKey`](super::HashKey) setting.
    pub fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.key = Some(key.as_ref().to_vec());
        self
    }

    /// The overall time limit of this call, retries included (overrides the client's
    /// request timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn fail(&mut self, reason: String) {
        self.error.get_or_insert(reason);
    }

    fn is_idempotent(&self) -> bool {
        self.idempotent
            .unwrap_or_else(|| method_is_idempotent(&self.method))
    }

    /// The hash key this request routes by, if any.
    fn routing_key(&self) -> Option<&[u8]> {
        if let Some(k) = &self.key {
            return Some(k);
        }
        match &self.client.inner.hash_key {
            Some(HashKey::Path) => Some(
                self.path
                    .split_once('?')
                    .map_or(self.path.as_str(), |(p, _)| p)
                    .as_bytes(),
            ),
            Some(HashKey::Header(name)) => self.headers.get(name).map(HeaderValue::as_bytes),
            None => None,
        }
    }

    /// Sends the request to an instance the balancer picks, retrying on another instance (and
    /// hedging, if the client hedges) as the [module docs](super) describe. An HTTP answer of
    /// any status is `Ok`; see [`Response::error_for_status`].
    pub async fn send(self) -> Result<Response, HttpError> {
        if let Some(reason) = self.error.clone() {
            return Err(HttpError::InvalidRequest {
                method: self.method,
                path: self.path,
                reason,
            });
        }
        let inner = &self.client.inner;
        let mut ctx = PickContext::new();
        if let Some(key) = self.routing_key() {
            ctx = ctx.with_key(key);
        }
        if let Some(zone) = &inner.zone {
            ctx = ctx.with_zone(zone);
        }
        let idempotent = self.is_idempotent();
        let deadline = self
            .timeout
            .or(inner.request_timeout)
            .map(|t| Instant::now() + t);
        inner.retry.request();
        let hedge = inner.hedge.as_ref().filter(|_| idempotent);
        let hedge_delay = hedge.map(Hedge::delay);
        let hedge_from = |now: Instant| hedge_delay.map(|d| now + d);

        let mut tried: Vec<InstanceId> = Vec::new();
        let mut race = Race::new();
        let first = self.pick(&ctx, &tried)?;
        tried.push(first.instance().id().clone());
        let (started, exchange) = self.attempt(first, deadline)?;
        race.push(started, exchange);
        let mut attempts: u32 = 1;
        let mut next_hedge = hedge_from(Instant::now());
        loop {
            let hedge_at = next_hedge.filter(|_| attempts < inner.retry.max_attempts);
            match race.next(hedge_at).await {
                Next::Ended(started, result) => {
                    let Attempt {
                        guard,
                        instance,
                        tier,
                        limit,
                        hedge: hedged,
                    } = started;
                    let failure = match result {
                        Ok(response) if !response.status().is_server_error() => {
                            let mut guard = guard;
                            guard.responded();
                            if let Some(h) = hedge {
                                h.observe(guard.elapsed());
                            }
                            if hedged {
                                inner.retry.hedge_won();
                            }
                            // The attempts still out are dropped with the race: their
                            // connections close and their guards count them as cancelled.
                            // This one stays in flight until its body is read.
                            let response = self.response(response, instance, tier, attempts);
                            return Ok(response.with_call(guard));
                        }
                        Ok(response) => {
                            if let Some(h) = hedge {
                                h.observe(guard.elapsed());
                            }
                            Failure::Status(response)
                        }
                        Err(e) => Failure::from(TransportError::new(e)),
                    };
                    guard.failure();
                    let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
                    match inner
                        .retry
                        .decide(attempts, failure.sent(), idempotent, out_of_time)
                    {
                        None => {
                            tracing::debug!(method = %self.method, path = %self.path,
                                instance = %instance.id(), attempt = attempts,
                                "retrying on another instance");
                            match self.pick(&ctx, &tried) {
                                Ok(guard) => {
                                    tried.push(guard.instance().id().clone());
                                    let (started, exchange) = self.attempt(guard, deadline)?;
                                    race.push(started, exchange);
                                    attempts += 1;
                                    // The retry is the newest attempt: a hedge waits for it.
                                    next_hedge = hedge_from(Instant::now());
                                }
                                Err(e) if race.is_empty() => return Err(e),
                                // The instances went away, but a hedge is still out.
                                Err(_) => {}
                            }
                        }
                        Some(gave_up) if race.is_empty() => {
                            let last = Last {
                                instance,
                                tier,
                                limit,
                                attempts,
                                gave_up,
                            };
                            return self.give_up(failure, last);
                        }
                        // Another attempt is still out and may yet answer.
                        Some(_) => {}
                    }
                }
                Next::Hedge => {
                    next_hedge = None;
                    // Only to an instance not tried yet: a hedge to one already waited on
                    // would only add load.
                    match self.pick(&ctx, &tried) {
                        Ok(guard)
                            if !tried.contains(guard.instance().id())
                                && inner.retry.hedge(attempts, deadline) =>
                        {
                            tracing::debug!(method = %self.method, path = %self.path,
                                instance = %guard.instance().id(), attempt = attempts + 1,
                                "hedging on another instance");
                            tried.push(guard.instance().id().clone());
                            let (mut started, exchange) = self.attempt(guard, deadline)?;
                            started.hedge = true;
                            race.push(started, exchange);
                            attempts += 1;
                            next_hedge = hedge_from(Instant::now());
                        }
                        // Only tried instances fit (the untried ones are filtered out or
                        // ejected): no hedge; an unused guard counts as cancelled.
                        _ => {}
                    }
                }
            }
        }
    }

    /// An instance for the next attempt: the balancer's pick, avoiding `tried`.
    fn pick(&self, ctx: &PickContext<'_>, tried: &[InstanceId]) -> Result<PickGuard, HttpError> {
        let balancer = &self.client.inner.balancer;
        let picked = if tried.is_empty() {
            balancer.pick_with(ctx)
        } else {
            balancer.pick_excluding(ctx, tried)
        };
        picked.map_err(|source| HttpError::NoInstance {
            method: self.method.clone(),
            path: self.path.clone(),
            source,
        })
    }

    /// An attempt at the instance of `guard`, within the per-try timeout and what is left of
    /// the overall one. Not started until polled.
    fn attempt(
        &self,
        guard: PickGuard,
        deadline: Option<Instant>,
    ) -> Result<(Attempt, impl Future<Output = Exchanged> + Send + 'static), HttpError> {
        let inner = &self.client.inner;
        let instance = guard.instance().clone();
        let url = url_for(&instance, &self.path, inner.https).map_err(|reason| {
            HttpError::InvalidRequest {
                method: self.method.clone(),
                path: self.path.clone(),
                reason,
            }
        })?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (inner.per_try_timeout, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut request = inner
            .http
            .request(self.method.clone(), url)
            .headers(self.headers.clone());
        if let Some(body) = &self.body {
            request = request.body(body.clone());
        }
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        let attempt = Attempt {
            tier: guard.tier(),
            guard,
            instance,
            limit,
            hedge: false,
        };
        Ok((attempt, request.send()))
    }

    /// The outcome of a call whose last attempt failed and will not be retried: a 5xx answer
    /// is still an answer, anything else an error.
    fn give_up(&self, failure: Failure, last: Last) -> Result<Response, HttpError> {
        let (method, path) = (self.method.clone(), self.path.clone());
        let Last {
            instance,
            tier,
            limit,
            attempts,
            gave_up,
        } = last;
        let (id, authority) = (instance.id().clone(), instance.authority());
        match failure {
            Failure::Status(response) => Ok(self.response(response, instance, tier, attempts)),
            Failure::Connect(source) => Err(HttpError::Connect {
                method,
                path,
                instance: id,
                authority,
                attempts,
                gave_up,
                source,
            }),
            Failure::Tls { reason, source } => Err(HttpError::Tls {
                method,
                path,
                instance: id,
                authority,
                attempts,
                gave_up,
                reason,
                source,
            }),
            Failure::Timeout(source) => Err(HttpError::Timeout {
                method,
                path,
                instance: id,
                authority,
                after: limit.unwrap_or_default(),
                attempts,
                gave_up,
                source,
            }),
            Failure::Transport(source) => Err(HttpError::Transport {
                method,
                path,
                instance: id,
                authority,
                attempts,
                gave_up,
                source,
            }),
        }
    }

    fn response(
        &self,
        inner: reqwest::Response,
        instance: ServiceInstance,
        tier: usize,
        attempts: u32,
    ) -> Response {
        Response::new(
            inner,
            instance,
            tier,
            self.method.clone(),
            self.path.clone(),
            attempts,
        )
    }
}

/// How an exchange with an instance ended.
type Exchanged = Result<reqwest::Response, reqwest::Error>;

/// One attempt out, beside its exchange with its instance: its pick guard, which counts it in
/// flight until the attempt ends (dropped unfinished, it counts as cancelled).
struct Attempt {
    guard: PickGuard,
    instance: ServiceInstance,
    tier: usize,
    /// Its time limit.
    limit: Option<Duration>,
    /// Whether it is a hedge.
    hedge: bool,
}

/// The last attempt of a call that gives up, and why it does.
struct Last {
    instance: ServiceInstance,
    tier: usize,
    limit: Option<Duration>,
    attempts: u32,
    gave_up: GaveUp,
}

/// How one attempt failed.
enum Failure {
    /// A 5xx answer.
    Status(reqwest::Response),
    /// No connection: nothing was sent.
    Connect(TransportError),
    /// TLS failed: in the handshake (nothing was sent), or by an alert after it.
    Tls {
        reason: String,
        source: TransportError,
    },
    /// The attempt's time limit ran out.
    Timeout(TransportError),
    /// The connection broke during the exchange.
    Transport(TransportError),
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        if let Some(tls) = e.tls() {
            Failure::Tls {
                reason: explain_tls(tls),
                source: e,
            }
        } else if e.is_connect() {
            Failure::Connect(e)
        } else if e.is_timeout() {
            Failure::Timeout(e)
        } else {
            Failure::Transport(e)
        }
    }
}

impl Failure {
    /// Whether the request may have reached the instance: only a failure to connect (a TLS
    /// handshake included) proves that it did not.
    fn sent(&self) -> bool {
        match self {
            Failure::Connect(_) => false,
            Failure::Tls { source, .. } => !source.is_connect(),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(method_is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH] {
            assert!(!method_is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn urls_bracket_ipv6_and_keep_the_query() {
        let v6 = ServiceInstance::builder("s", "a")
            .host("::1")
            .port(8080)
            .build()
            .unwrap();
        assert_eq!(
            url_for(&v6, "/users?x=1", false).unwrap().as_str(),
            "http://[::1]:8080/users?x=1"
        );
        let v4 = ServiceInstance::builder("s", "b")
            .host("10.0.0.1")
            .port(80)
            .build()
            .unwrap();
        assert_eq!(
            url_for(&v4, "/", false).unwrap().as_str(),
            "http://10.0.0.1/"
        );
    }

    #[test]
    fn the_scheme_comes_from_the_metadata_or_the_client() {
        let tls = ServiceInstance::builder("s", "a")
            .host("10.0.0.1")
            .port(8443)
            .meta(SCHEME_METADATA, "HTTPS")
            .build()
            .unwrap();
        assert_eq!(
            url_for(&tls, "/x", false).unwrap().as_str(),
            "https://10.0.0.1:8443/x"
        );
        let plain = ServiceInstance::builder("s", "b")
            .host("10.0.0.2")
            .port(8080)
            .meta(SCHEME_METADATA, "http")
            .build()
            .unwrap();
        assert_eq!(
            url_for(&plain, "/x", false).unwrap().as_str(),
            "http://10.0.0.2:8080/x"
        );
        // The client's https setting holds for every instance.
        assert_eq!(
            url_for(&plain, "/x", true).unwrap().as_str(),
            "https://10.0.0.2:8080/x"
        );
    }
}

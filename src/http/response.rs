//! An answer, with the instance that gave it.

use std::fmt;
use std::future::Future;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use waypost_core::{PickGuard, ServiceInstance};

use super::error::{HttpError, TransportError};

/// The answer to a request, with the instance that gave it and the attempts it took.
///
/// ```
/// # use waypost::http::HttpClient;
/// # use waypost::strategies::RoundRobin;
/// # use waypost::{Balancer, ServiceInstance, WatchEvent};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let port = listener.local_addr()?.port();
/// # let app = axum::Router::new().route("/users/{id}", axum::routing::get(|| async { axum::Json(serde_json::json!({"id": 7})) }));
/// # tokio::spawn(async move { axum::serve(listener, app).await });
/// # let balancer = Balancer::new(RoundRobin::new());
/// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("users", "u1").host("127.0.0.1").port(port).build()?]));
/// # let client = HttpClient::new(balancer)?;
/// let response = client.get("/users/7").send().await?;
/// assert_eq!(response.status(), 200);
/// assert_eq!(response.instance().id().as_str(), "u1");
/// assert_eq!(response.attempts(), 1);
/// let user: serde_json::Value = response.json().await?;
/// assert_eq!(user["id"], 7);
///
/// let missing = client.get("/nowhere").send().await?;
/// assert_eq!(missing.status(), 404); // an answer, not an error...
/// assert!(missing.error_for_status().is_err()); // ...until asked for one
/// # Ok(())
/// # }
/// ```
pub struct Response {
    inner: reqwest::Response,
    instance: ServiceInstance,
    tier: usize,
    method: Method,
    path: String,
    attempts: u32,
    /// The call, in flight until the body is read (or the response dropped); `None` once its
    /// outcome was recorded (a 5xx answer returned after the retries gave up).
    call: Option<PickGuard>,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status())
            .field("instance", self.instance.id())
            .field("tier", &self.tier)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Response {
    pub(crate) fn new(
        inner: reqwest::Response,
        instance: ServiceInstance,
        tier: usize,
        method: Method,
        path: String,
        attempts: u32,
    ) -> Self {
        Response {
            inner,
            instance,
            tier,
            method,
            path,
            attempts,
            call: None,
        }
    }

    /// Keeps `call` in flight until the body is read: its outcome is the body's.
    pub(crate) fn with_call(mut self, call: PickGuard) -> Self {
        self.call = Some(call);
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        self.inner.headers()
    }

    /// The instance that answered.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// The balancer's tier that answered: an index into
    /// [`Balancer::tiers`](crate::Balancer::tiers), 0 without failover tiers.
    pub fn tier(&self) -> usize {
        self.tier
    }

    /// Attempts it took, the first one included: more than 1 after retries, and after hedges
    /// (each [hedge](super::Hedge) is an attempt, whether it answered first or not).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// `Err(HttpError::Status)` for a 4xx or 5xx answer, else the response itself.
    pub fn error_for_status(self) -> Result<Self, HttpError> {
        let status = self.status();
        if status.is_client_error() || status.is_server_error() {
            Err(HttpError::Status {
                method: self.method,
                path: self.path,
                instance: self.instance.id().clone(),
                status,
                attempts: self.attempts,
            })
        } else {
            Ok(self)
        }
    }

    /// The body as text.
    ///
    /// The call counts as in flight until the body is read: a body that breaks off (the
    /// connection lost, a timeout) is a failure of the instance, like an error answer. The
    /// latency recorded is the time to the response's head. A response dropped unread is a
    /// success.
    pub async fn text(self) -> Result<String, HttpError> {
        self.read(reqwest::Response::text).await
    }

    /// The body as bytes (the call in flight until then, as for [`text`](Self::text)).
    pub async fn bytes(self) -> Result<Bytes, HttpError> {
        self.read(reqwest::Response::bytes).await
    }

    /// The body decoded from JSON (the call in flight until then, as for
    /// [`text`](Self::text); a body that does not decode is the caller's type's concern, not
    /// a failure of the instance).
    pub async fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, HttpError> {
        self.read(reqwest::Response::json::<T>).await
    }

    /// The body's next chunk, `None` at its end: for a body too large to hold at once, or one
    /// that streams on. The call stays in flight until the end (or until the response is
    /// dropped), and a body that breaks off is a failure of the instance, as for
    /// [`text`](Self::text).
    ///
    /// ```
    /// # use waypost::http::HttpClient;
    /// # use waypost::strategies::RoundRobin;
    /// # use waypost::{Balancer, ServiceInstance, WatchEvent};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let port = listener.local_addr()?.port();
    /// # let app = axum::Router::new().route("/log", axum::routing::get(|| async { "line 1\nline 2\n" }));
    /// # tokio::spawn(async move { axum::serve(listener, app).await });
    /// # let balancer = Balancer::new(RoundRobin::new());
    /// # balancer.apply(WatchEvent::Snapshot(vec![ServiceInstance::builder("logs", "l1").host("127.0.0.1").port(port).build()?]));
    /// # let client = HttpClient::new(balancer.clone())?;
    /// let mut response = client.get("/log").send().await?;
    /// let state = balancer.endpoints()[0].clone();
    /// let mut body = Vec::new();
    /// while let Some(chunk) = response.chunk().await? {
    ///     body.extend_from_slice(&chunk);
    /// }
    /// assert_eq!(body, b"line 1\nline 2\n");
    /// assert_eq!((state.state().in_flight(), state.state().successes()), (0, 1));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        let next = self.inner.chunk().await;
        if !matches!(next, Ok(Some(_))) {
            end(self.call.take(), &next);
        }
        next.map_err(|source| {
            body_error(
                self.method.clone(),
                self.path.clone(),
                &self.instance,
                source,
            )
        })
    }

    /// The underlying `reqwest` response: one of the two reqwest types that are part of this
    /// API on purpose (see [`waypost::http::reqwest`](super::reqwest)). The call ends here, as
    /// a success: what the body does afterwards is not counted (to stream the body and have
    /// it counted, read it with [`chunk`](Self::chunk)).
    pub fn into_inner(self) -> reqwest::Response {
        self.inner
    }

    /// Reads the body with `read`, records the call's outcome by it, and turns its error
    /// into the client's.
    async fn read<T, F>(mut self, read: impl FnOnce(reqwest::Response) -> F) -> Result<T, HttpError>
    where
        F: Future<Output = Result<T, reqwest::Error>>,
    {
        let call = self.call.take();
        let body = read(self.inner).await;
        end(call, &body);
        body.map_err(|source| body_error(self.method, self.path, &self.instance, source))
    }
}

/// The client's error for a body that could not be read (or decoded).
fn body_error(
    method: Method,
    path: String,
    instance: &ServiceInstance,
    source: reqwest::Error,
) -> HttpError {
    HttpError::Body {
        method,
        path,
        instance: instance.id().clone(),
        source: TransportError::new(source),
    }
}

/// Records the outcome of a call by its body: a failure if the body broke off, a success if
/// it was read (even if it is no JSON of the caller's type).
fn end<T>(call: Option<PickGuard>, body: &Result<T, reqwest::Error>) {
    if let Some(call) = call {
        match body {
            Err(e) if !is_json(e) => call.failure(),
            _ => call.success(),
        }
    }
}

/// Whether `error` is the JSON decoder's (reqwest calls a broken body a decode error too).
fn is_json(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.is::<serde_json::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

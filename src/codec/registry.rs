//! Confluent Schema Registry client: the writer schema of a schema id, fetched over HTTP(S) and
//! cached.
//!
//! An edge module: it does network I/O and returns schema text, nothing more. Parsing the text
//! and adding it to a [`SchemaStore`](super::avro::SchemaStore) is the caller's job, and so is
//! deciding what a record with an unresolvable id becomes (dead letter or retry later).
//!
//! Caching: a registry never changes the schema behind an id, so a fetched schema is kept for the
//! life of the process. An id the registry does not know is remembered for
//! [`RegistryConfig::negative_cache`], so a burst of records carrying a bad id costs one request,
//! not one per record. Concurrent lookups of the same uncached id share one fetch.
//!
//! Failures are sorted once, here: connection errors, timeouts, 5xx, 408 and 429 are transient
//! and retried with exponential backoff; any other answer is final. Only
//! [`RegistryError::Unavailable`] is worth retrying later ([`RegistryError::is_transient`]).
//!
//! Not supported: schema references (the text of a schema that imports named types from other
//! subjects is returned as is, and will not parse on its own), and `Retry-After` headers.
//!
//! HTTP goes through hyper-util's client with hyper-tls, i.e. the OpenSSL that rdkafka already
//! links; the `http` types and the body stream come from axum's re-exports, which the crate
//! links for its own endpoints. reqwest would do the same job with some 40 more crates, most of
//! them URL and IDNA tables.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{ACCEPT, AUTHORIZATION, USER_AGENT};
use axum::http::{HeaderValue, Request, StatusCode, Uri};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use tracing::warn;

/// The `Accept` header of every request: the registry's own media type first.
pub const ACCEPT_MEDIA_TYPES: &str = "application/vnd.schemaregistry.v1+json, application/json";
/// Longest wait between two attempts, however many retries are configured.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest a "not found" id is remembered, whatever is configured.
pub const MAX_NEGATIVE_CACHE: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest response body read; a bigger one is a [`RegistryError::BadResponse`].
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// The registry's `error_code` for an unknown schema id.
const SCHEMA_NOT_FOUND: u32 = 40403;
/// The `schemaType` of Avro schemas (the registry omits the field for them).
const AVRO: &str = "AVRO";
/// Longest server message kept in an error.
const MAX_MESSAGE_CHARS: usize = 200;
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const USER_AGENT_VALUE: &str = concat!("lifecycle-scorer/", env!("CARGO_PKG_VERSION"));

/// Results of this module.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a schema could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry does not know the id (HTTP 404 with `error_code` 40403).
    #[error("schema id {id} is not in the registry")]
    NotFound {
        /// The schema id.
        id: u32,
    },
    /// The id names a schema of another type (Protobuf, JSON Schema).
    #[error("schema id {id} is a {schema_type} schema, not Avro")]
    NotAvro {
        /// The schema id.
        id: u32,
        /// The registry's `schemaType`.
        schema_type: String,
    },
    /// A final refusal: 401/403 (credentials), a 404 that is not the registry's "schema not
    /// found" (wrong URL), another 4xx, or a redirect. Not retried.
    #[error("registry refused schema id {id} with HTTP {status}: {message}")]
    Rejected {
        /// The schema id.
        id: u32,
        /// The HTTP status code.
        status: u16,
        /// The registry's `message`, or the start of the body.
        message: String,
    },
    /// Every attempt failed transiently: connection error, timeout, 5xx, 408 or 429.
    #[error("registry unavailable for schema id {id} (attempts: {attempts}): {last_error}")]
    Unavailable {
        /// The schema id.
        id: u32,
        /// Attempts made: the configured retries plus one.
        attempts: u32,
        /// What went wrong the last time.
        last_error: String,
    },
    /// A successful status with a body that is not the documented JSON.
    #[error("unexpected registry response for schema id {id}: {detail}")]
    BadResponse {
        /// The schema id.
        id: u32,
        /// What was wrong with it.
        detail: String,
    },
    /// The client cannot be built: bad URL, half-given credentials, TLS setup failure.
    #[error("invalid schema registry settings: {0}")]
    Config(String),
}

impl RegistryError {
    /// Whether the same lookup may succeed later without any change: true only for
    /// [`RegistryError::Unavailable`].
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// Where the registry is and how to talk to it.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Base URL, `http://` or `https://`, optionally with a path prefix; a trailing slash is
    /// ignored. Credentials go in `username` and `password`, not here.
    pub url: String,
    /// Basic-auth user (the API key on Confluent Cloud). Set with `password` or not at all.
    pub username: Option<String>,
    /// Basic-auth password (the API secret on Confluent Cloud). Never printed.
    pub password: Option<String>,
    /// Bound on one request, from connecting to the last byte of the body.
    pub timeout: Duration,
    /// Extra attempts after a transient failure.
    pub retries: u32,
    /// Wait before the first retry, doubled for each one after, at most [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// How long an unknown id is answered from memory, at most [`MAX_NEGATIVE_CACHE`]; zero
    /// asks the registry every time.
    pub negative_cache: Duration,
}

impl RegistryConfig {
    /// Settings for the registry at `url`: no credentials, 5 s timeout, 3 retries from 200 ms,
    /// unknown ids remembered for 30 s.
    pub fn new(url: impl Into<String>) -> Self {
        RegistryConfig {
            url: url.into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_millis(200),
            negative_cache: Duration::from_secs(30),
        }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &redacted(self.password.as_deref()))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("negative_cache", &self.negative_cache)
            .finish()
    }
}

/// A schema registry client with its cache. Clones share the connection pool and the cache, so
/// one client (or one `Arc` of it) serves every partition task.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

/// One fetch of one id, awaited by every caller that asked for that id while it ran.
type SharedFetch = Shared<BoxFuture<'static, Result<Arc<str>>>>;

struct Inner {
    http: Client<HttpsConnector<HttpConnector>, String>,
    /// The base URL without its trailing slash (checked to hold no credentials).
    base_url: String,
    /// Kept for `Debug` only.
    username: Option<String>,
    /// `Basic <base64>`, marked sensitive so the `http` crate never prints it.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    negative_cache: Duration,
    /// Shared by all tasks. A `std` mutex, locked only to read or update the maps and never
    /// across an `.await`; waiting for a fetch happens on the [`SharedFetch`] instead.
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Fetched schemas, kept forever (ids are immutable).
    found: HashMap<u32, Arc<str>>,
    /// Unknown ids and until when to keep answering "not found" without asking.
    missing: HashMap<u32, Instant>,
    /// Fetches under way. An entry is removed, under the same lock that records the outcome,
    /// when its fetch ends, so a caller either joins the fetch or sees its result.
    in_flight: HashMap<u32, SharedFetch>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let (found, missing) = {
            let cache = inner.lock_cache();
            (cache.found.len(), cache.missing.len())
        };
        f.debug_struct("RegistryClient")
            .field("url", &inner.base_url)
            .field("username", &inner.username)
            .field("password", &redacted(inner.authorization.as_ref()))
            .field("timeout", &inner.timeout)
            .field("retries", &inner.retries)
            .field("backoff", &inner.backoff)
            .field("negative_cache", &inner.negative_cache)
            .field("cached_schemas", &found)
            .field("cached_not_found", &missing)
            .finish()
    }
}

impl RegistryClient {
    /// Checks `config` and builds the client. No request is made.
    pub fn new(config: RegistryConfig) -> Result<Self> {
        if config.timeout.is_zero() {
            return Err(RegistryError::Config(
                "the registry timeout must be positive".to_owned(),
            ));
        }
        let base_url = checked_base_url(&config.url)?;
        let authorization = match (&config.username, &config.password) {
            (None, None) => None,
            (Some(username), Some(password)) => Some(basic_authorization(username, password)?),
            _ => {
                return Err(RegistryError::Config(
                    "set both the registry username and password, or neither".to_owned(),
                ))
            }
        };
        if authorization.is_some() && base_url.starts_with("http://") {
            warn!(url = %base_url, "schema registry credentials will be sent over plain http");
        }

        // hyper-tls's own constructor panics when OpenSSL cannot be set up; building the TLS
        // connector here turns that into an error (the crate's documented way to do so).
        let tls = hyper_tls::native_tls::TlsConnector::new()
            .map_err(|error| RegistryError::Config(format!("cannot set up TLS: {error}")))?;
        let mut connector = HttpConnector::new();
        connector.enforce_http(false); // https URLs reach the TLS layer above
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(HttpsConnector::from((connector, tls.into())));

        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                base_url,
                username: config.username,
                authorization,
                timeout: config.timeout,
                retries: config.retries,
                backoff: config.backoff.min(MAX_BACKOFF),
                negative_cache: config.negative_cache.min(MAX_NEGATIVE_CACHE),
                cache: Mutex::new(Cache::default()),
            }),
        })
    }

    /// The text of schema `id`, from `GET {url}/schemas/ids/{id}`.
    ///
    /// Found schemas are cached for good, unknown ids for the configured window; other
    /// failures are not cached. Callers asking for the same uncached id at the same time share
    /// one fetch and get the same answer.
    pub async fn schema(&self, id: u32) -> Result<Arc<str>> {
        let fetch = {
            let mut cache = self.inner.lock_cache();
            if let Some(text) = cache.found.get(&id) {
                return Ok(Arc::clone(text));
            }
            if let Some(&until) = cache.missing.get(&id) {
                if Instant::now() < until {
                    return Err(RegistryError::NotFound { id });
                }
                cache.missing.remove(&id);
            }
            let inner = &self.inner;
            cache
                .in_flight
                .entry(id)
                .or_insert_with(|| Arc::clone(inner).fetch_and_remember(id).boxed().shared())
                .clone()
        };
        fetch.await
    }
}

/// How one attempt failed.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt; the text says what happened.
    Transient(String),
    /// Final.
    Permanent(RegistryError),
}

impl Inner {
    /// The cache, even if a panicking thread held it: every update leaves it consistent.
    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches `id`, records the outcome and ends the shared fetch, under one lock.
    async fn fetch_and_remember(self: Arc<Self>, id: u32) -> Result<Arc<str>> {
        let result = self.fetch(id).await;
        let mut cache = self.lock_cache();
        cache.in_flight.remove(&id);
        match &result {
            Ok(text) => {
                cache.found.insert(id, Arc::clone(text));
            }
            Err(RegistryError::NotFound { .. }) if !self.negative_cache.is_zero() => {
                let now = Instant::now();
                // Expired entries go here rather than on a timer: this runs once per
                // registry round trip at most, so the scan is cheap.
                cache.missing.retain(|_, until| *until > now);
                cache.missing.insert(id, now + self.negative_cache);
            }
            Err(_) => {}
        }
        result
    }

    /// Attempts until success, a final answer, or the retries are spent.
    async fn fetch(&self, id: u32) -> Result<Arc<str>> {
        let mut delay = self.backoff;
        let mut attempt: u32 = 1;
        loop {
            let last_error = match self.attempt(id).await {
                Ok(text) => return Ok(text),
                Err(Failure::Permanent(error)) => return Err(error),
                Err(Failure::Transient(last_error)) => last_error,
            };
            if attempt > self.retries {
                return Err(RegistryError::Unavailable {
                    id,
                    attempts: attempt,
                    last_error,
                });
            }
            warn!(
                id,
                attempt,
                error = %last_error,
                retry_in_ms = delay.as_millis(),
                "schema registry request failed, retrying"
            );
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    /// One request, bounded by the timeout from connecting to the end of the body.
    async fn attempt(&self, id: u32) -> Result<Arc<str>, Failure> {
        let request = self.request(id).map_err(Failure::Permanent)?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|error| Failure::Transient(error_chain(&error)))?;
            let status = response.status();
            let body = read_body(id, Body::new(response.into_body())).await?;
            Ok::<_, Failure>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Failure::Transient(format!("no response within {} ms", self.timeout.as_millis())))??;
        interpret(id, status, &body)
    }

    fn request(&self, id: u32) -> Result<Request<String>> {
        let uri: Uri = format!("{}/schemas/ids/{id}", self.base_url)
            .parse()
            .map_err(|error| RegistryError::Config(format!("cannot build the lookup URL: {error}")))?;
        let mut request = Request::get(uri)
            .header(ACCEPT, HeaderValue::from_static(ACCEPT_MEDIA_TYPES))
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        request
            .body(String::new())
            .map_err(|error| RegistryError::Config(format!("cannot build the lookup request: {error}")))
    }
}

/// Reads the whole body, up to [`MAX_RESPONSE_BYTES`].
async fn read_body(id: u32, body: Body) -> Result<Vec<u8>, Failure> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| Failure::Transient(error_chain(&error)))?;
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Failure::Permanent(RegistryError::BadResponse {
                id,
                detail: format!("response larger than {MAX_RESPONSE_BYTES} bytes"),
            }));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The success body of `GET /schemas/ids/{id}`; other fields (`references`, ...) are ignored.
#[derive(Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

/// The registry's error body.
#[derive(Deserialize)]
struct ErrorResponse {
    error_code: Option<u32>,
    message: Option<String>,
}

/// Sorts one answer into a schema, a final error, or a transient failure.
fn interpret(id: u32, status: StatusCode, body: &[u8]) -> Result<Arc<str>, Failure> {
    if status.is_success() {
        let response: SchemaResponse = serde_json::from_slice(body).map_err(|error| {
            Failure::Permanent(RegistryError::BadResponse {
                id,
                detail: format!("HTTP {status} with a body that is not a schema: {error}"),
            })
        })?;
        return match response.schema_type {
            Some(schema_type) if !schema_type.eq_ignore_ascii_case(AVRO) => {
                Err(Failure::Permanent(RegistryError::NotAvro { id, schema_type }))
            }
            _ => Ok(Arc::from(response.schema)),
        };
    }
    let reported: Option<ErrorResponse> = serde_json::from_slice(body).ok();
    let error_code = reported.as_ref().and_then(|error| error.error_code);
    if status == StatusCode::NOT_FOUND && error_code == Some(SCHEMA_NOT_FOUND) {
        return Err(Failure::Permanent(RegistryError::NotFound { id }));
    }
    let message = match reported.and_then(|error| error.message) {
        Some(message) => excerpt(&message),
        None => excerpt(&String::from_utf8_lossy(body)),
    };
    let transient =
        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT;
    if transient {
        Err(Failure::Transient(format!("HTTP {status}: {message}")))
    } else {
        Err(Failure::Permanent(RegistryError::Rejected {
            id,
            status: status.as_u16(),
            message,
        }))
    }
}

/// The base URL without trailing slashes, if it is an http(s) URL without credentials or query.
/// Errors never quote the URL, which may hold a password.
fn checked_base_url(url: &str) -> Result<String> {
    let config_error = |problem: &str| RegistryError::Config(format!("the registry URL {problem}"));
    let trimmed = url.trim().trim_end_matches('/');
    let uri: Uri = trimmed.parse().map_err(|_| config_error("is not a valid URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(config_error("must start with http:// or https://"));
    }
    match uri.authority() {
        None => return Err(config_error("has no host")),
        Some(authority) if authority.as_str().contains('@') => {
            return Err(config_error(
                "must not hold credentials; set the registry username and password instead",
            ))
        }
        Some(_) => {}
    }
    if uri.query().is_some() {
        return Err(config_error("must not have a query"));
    }
    Ok(trimmed.to_owned())
}

/// The `Authorization` value for HTTP basic auth (RFC 7617), marked sensitive.
fn basic_authorization(username: &str, password: &str) -> Result<HeaderValue> {
    if username.contains(':') {
        return Err(RegistryError::Config(
            "the registry username must not contain ':'".to_owned(),
        ));
    }
    let credentials = base64(format!("{username}:{password}").as_bytes());
    let mut value = HeaderValue::try_from(format!("Basic {credentials}"))
        .map_err(|_| RegistryError::Config("the registry credentials are not a valid header".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Standard base64 with padding (RFC 4648 section 4). Written out because it is needed for
/// one header, once per process.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte_at = |index: usize| u32::from(chunk.get(index).copied().unwrap_or(0));
        let group = byte_at(0) << 16 | byte_at(1) << 8 | byte_at(2);
        // A chunk of n bytes fills n + 1 sextets; `=` pads the rest.
        for sextet in 0..4 {
            if sextet <= chunk.len() {
                let index = (group >> (18 - 6 * sextet)) & 0x3f;
                text.push(char::from(ALPHABET[index as usize]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// An error and its sources, `outer: inner: ...` (hyper's own messages are terse). A source
/// whose text is already there is skipped: OpenSSL errors repeat their cause in their message.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `text` trimmed and cut to [`MAX_MESSAGE_CHARS`] characters.
fn excerpt(text: &str) -> String {
    let trimmed = text.trim();
    match trimmed.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}...", &trimmed[..end]),
        None => trimmed.to_owned(),
    }
}

/// What `Debug` shows for a secret.
fn redacted<T>(secret: Option<T>) -> Option<&'static str> {
    secret.map(|_| "<redacted>")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::Path;
    use axum::http::HeaderMap;
    use axum::routing::get;
    use axum::Router;

    use super::*;

    /// What the fake registry saw.
    #[derive(Default)]
    struct Seen {
        requests: AtomicUsize,
        /// The id and headers of each request, in arrival order.
        calls: Mutex<Vec<(u32, HeaderMap)>>,
    }

    impl Seen {
        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn header(&self, call: usize, name: &str) -> Option<String> {
            let calls = self.calls.lock().unwrap();
            calls[call].1.get(name).map(|value| value.to_str().unwrap().to_owned())
        }
    }

    /// A fake registry on a free local port: `GET /schemas/ids/{id}` waits `delay`, then answers
    /// `respond(request_number, id)` (numbers start at 1). Returns its base URL.
    async fn fake_registry_with_delay<F>(delay: Duration, respond: F) -> (String, Arc<Seen>)
    where
        F: Fn(usize, u32) -> (StatusCode, String) + Clone + Send + Sync + 'static,
    {
        let seen = Arc::new(Seen::default());
        let handler_seen = Arc::clone(&seen);
        let app = Router::new().route(
            "/schemas/ids/{id}",
            get(move |Path(id): Path<u32>, headers: HeaderMap| {
                let respond = respond.clone();
                let seen = Arc::clone(&handler_seen);
                async move {
                    let number = seen.requests.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.calls.lock().unwrap().push((id, headers));
                    tokio::time::sleep(delay).await;
                    respond(number, id)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    async fn fake_registry<F>(respond: F) -> (String, Arc<Seen>)
    where
        F: Fn(usize, u32) -> (StatusCode, String) + Clone + Send + Sync + 'static,
    {
        fake_registry_with_delay(Duration::ZERO, respond).await
    }

    /// Fast settings for tests: 2 retries from 10 ms, 1 s timeout.
    fn config(url: &str) -> RegistryConfig {
        RegistryConfig {
            timeout: Duration::from_secs(1),
            retries: 2,
            backoff: Duration::from_millis(10),
            ..RegistryConfig::new(url)
        }
    }

    fn client(config: RegistryConfig) -> RegistryClient {
        RegistryClient::new(config).unwrap()
    }

    /// A schema for `id`, so a test can tell which id was answered.
    fn schema_of(id: u32) -> String {
        format!(r#"{{"type":"record","name":"Event{id}","fields":[{{"name":"at","type":"long"}}]}}"#)
    }

    fn ok_body(id: u32) -> (StatusCode, String) {
        (
            StatusCode::OK,
            serde_json::json!({ "schema": schema_of(id) }).to_string(),
        )
    }

    fn not_found_body() -> (StatusCode, String) {
        (
            StatusCode::NOT_FOUND,
            r#"{"error_code":40403,"message":"Schema not found"}"#.to_owned(),
        )
    }

    #[tokio::test]
    async fn returns_the_schema_text_with_the_documented_request() {
        let (url, seen) = fake_registry(|_, id| ok_body(id)).await;
        // A trailing slash must not turn into `//schemas`, which the fake would answer with 404.
        let registry = client(config(&format!("{url}/")));

        let text = registry.schema(42).await.unwrap();

        assert_eq!(&*text, schema_of(42));
        assert_eq!(seen.requests(), 1);
        assert_eq!(seen.calls.lock().unwrap()[0].0, 42);
        assert_eq!(seen.header(0, "accept").as_deref(), Some(ACCEPT_MEDIA_TYPES));
        assert_eq!(seen.header(0, "authorization"), None);
    }

    #[tokio::test]
    async fn a_second_lookup_is_served_from_the_cache() {
        let (url, seen) = fake_registry(|_, id| {
            let body = serde_json::json!({ "schema": schema_of(id), "schemaType": "AVRO" });
            (StatusCode::OK, body.to_string())
        })
        .await;
        let registry = client(config(&url));

        let first = registry.schema(7).await.unwrap();
        let second = registry.clone().schema(7).await.unwrap();
        assert_eq!(seen.requests(), 1);
        assert_eq!(first, second);

        assert_eq!(&*registry.schema(8).await.unwrap(), schema_of(8));
        assert_eq!(seen.requests(), 2);
    }

    #[tokio::test]
    async fn an_unknown_id_is_not_found_and_remembered_for_the_negative_cache_window() {
        let (url, seen) = fake_registry(|_, _| not_found_body()).await;
        let registry = client(RegistryConfig {
            negative_cache: Duration::from_millis(300),
            ..config(&url)
        });

        assert_eq!(registry.schema(9).await, Err(RegistryError::NotFound { id: 9 }));
        assert_eq!(registry.schema(9).await, Err(RegistryError::NotFound { id: 9 }));
        assert_eq!(seen.requests(), 1, "the second lookup is answered from memory");

        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(registry.schema(9).await, Err(RegistryError::NotFound { id: 9 }));
        assert_eq!(seen.requests(), 2, "after the window the registry is asked again");
        assert!(!RegistryError::NotFound { id: 9 }.is_transient());
    }

    #[tokio::test]
    async fn a_server_error_then_success_succeeds_after_a_retry() {
        let (url, seen) = fake_registry(|number, id| match number {
            1 => (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error_code":50001,"message":"Error in the backend data store"}"#.to_owned(),
            ),
            _ => ok_body(id),
        })
        .await;
        let registry = client(config(&url));

        assert_eq!(&*registry.schema(3).await.unwrap(), schema_of(3));
        assert_eq!(seen.requests(), 2);
    }

    #[tokio::test]
    async fn a_registry_that_stays_unavailable_is_given_up_after_every_retry() {
        let (url, seen) = fake_registry(|_, _| (StatusCode::SERVICE_UNAVAILABLE, "overloaded".to_owned())).await;
        let registry = client(RegistryConfig {
            retries: 3,
            ..config(&url)
        });

        let error = registry.schema(5).await.unwrap_err();

        match &error {
            RegistryError::Unavailable {
                id,
                attempts,
                last_error,
            } => {
                assert_eq!((*id, *attempts), (5, 4));
                assert_eq!(last_error, "HTTP 503 Service Unavailable: overloaded");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(error.is_transient());
        assert_eq!(seen.requests(), 4);

        // Transient failures are not cached: the next lookup asks again.
        assert!(registry.schema(5).await.unwrap_err().is_transient());
        assert_eq!(seen.requests(), 8);
    }

    #[tokio::test]
    async fn a_registry_slower_than_the_timeout_is_unavailable_quickly() {
        let (url, seen) = fake_registry_with_delay(Duration::from_secs(10), |_, id| ok_body(id)).await;
        let registry = client(RegistryConfig {
            timeout: Duration::from_millis(100),
            retries: 1,
            ..config(&url)
        });

        let started = Instant::now();
        let error = registry.schema(11).await.unwrap_err();
        let elapsed = started.elapsed();

        assert_eq!(
            error,
            RegistryError::Unavailable {
                id: 11,
                attempts: 2,
                last_error: "no response within 100 ms".to_owned(),
            }
        );
        assert!(elapsed < Duration::from_millis(800), "took {elapsed:?}");
        assert_eq!(seen.requests(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener); // nothing listens there any more: connections are refused

        let error = client(RegistryConfig {
            retries: 1,
            ..config(&url)
        })
        .schema(1)
        .await
        .unwrap_err();

        match error {
            RegistryError::Unavailable {
                attempts, last_error, ..
            } => {
                assert_eq!(attempts, 2);
                assert!(last_error.to_lowercase().contains("connect"), "{last_error}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn unauthorized_is_rejected_without_a_retry() {
        let (url, seen) = fake_registry(|_, _| {
            (
                StatusCode::UNAUTHORIZED,
                r#"{"error_code":401,"message":"Unauthorized"}"#.to_owned(),
            )
        })
        .await;
        let registry = client(RegistryConfig {
            retries: 3,
            ..config(&url)
        });

        let error = registry.schema(2).await.unwrap_err();

        assert_eq!(
            error,
            RegistryError::Rejected {
                id: 2,
                status: 401,
                message: "Unauthorized".to_owned(),
            }
        );
        assert!(!error.is_transient());
        assert_eq!(seen.requests(), 1);
    }

    #[tokio::test]
    async fn basic_auth_credentials_are_sent() {
        let (url, seen) = fake_registry(|_, id| ok_body(id)).await;
        let registry = client(RegistryConfig {
            username: Some("key".to_owned()),
            password: Some("secret".to_owned()),
            ..config(&url)
        });

        assert_eq!(&*registry.schema(4).await.unwrap(), schema_of(4));
        // base64("key:secret"), computed independently.
        assert_eq!(
            seen.header(0, "authorization").as_deref(),
            Some("Basic a2V5OnNlY3JldA==")
        );
    }

    #[tokio::test]
    async fn a_protobuf_schema_is_not_avro() {
        let (url, seen) = fake_registry(|_, _| {
            let body = serde_json::json!({ "schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF" });
            (StatusCode::OK, body.to_string())
        })
        .await;
        let registry = client(config(&url));

        assert_eq!(
            registry.schema(6).await,
            Err(RegistryError::NotAvro {
                id: 6,
                schema_type: "PROTOBUF".to_owned(),
            })
        );
        assert_eq!(seen.requests(), 1);
    }

    #[tokio::test]
    async fn a_malformed_body_is_a_bad_response() {
        let (url, seen) = fake_registry(|_, _| (StatusCode::OK, "<html>registry</html>".to_owned())).await;
        let registry = client(config(&url));

        let error = registry.schema(10).await.unwrap_err();

        match &error {
            RegistryError::BadResponse { id, detail } => {
                assert_eq!(*id, 10);
                assert!(detail.contains("not a schema"), "{detail}");
            }
            other => panic!("expected BadResponse, got {other:?}"),
        }
        assert!(!error.is_transient());
        assert_eq!(seen.requests(), 1);
    }

    #[tokio::test]
    async fn concurrent_lookups_of_an_uncached_id_share_one_request() {
        let (url, seen) = fake_registry_with_delay(Duration::from_millis(100), |_, id| ok_body(id)).await;
        let registry = client(config(&url));

        let lookups = (0..8).map(|_| registry.schema(12));
        let results = futures_util::future::join_all(lookups).await;

        assert_eq!(results.len(), 8);
        for result in results {
            assert_eq!(&*result.unwrap(), schema_of(12));
        }
        assert_eq!(seen.requests(), 1);
    }

    #[test]
    fn a_404_that_is_not_schema_not_found_is_rejected() {
        match interpret(1, StatusCode::NOT_FOUND, b"<h1>Not Found</h1>") {
            Err(Failure::Permanent(RegistryError::Rejected { status, message, .. })) => {
                assert_eq!(status, 404);
                assert_eq!(message, "<h1>Not Found</h1>");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(matches!(
            interpret(1, StatusCode::TOO_MANY_REQUESTS, b""),
            Err(Failure::Transient(_))
        ));
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let config = RegistryConfig {
            username: Some("api-key".to_owned()),
            password: Some("hunter2-secret".to_owned()),
            ..RegistryConfig::new("https://registry.example:8081/")
        };
        let registry = client(config.clone());

        for text in [format!("{config:?}"), format!("{registry:?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("api-key"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
        assert!(format!("{registry:?}").contains("url: \"https://registry.example:8081\""));
    }

    #[test]
    fn bad_settings_are_config_errors() {
        let rejected = |config: RegistryConfig| match RegistryClient::new(config) {
            Err(RegistryError::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        };

        rejected(RegistryConfig::new("ftp://registry:8081"));
        rejected(RegistryConfig::new("registry:8081"));
        rejected(RegistryConfig::new("http://registry:8081?x=1"));
        let message = rejected(RegistryConfig::new("https://key:hunter2@registry:8081"));
        assert!(!message.contains("hunter2"), "{message}");
        rejected(RegistryConfig {
            username: Some("key".to_owned()),
            ..RegistryConfig::new("http://registry:8081")
        });
        rejected(RegistryConfig {
            username: Some("a:b".to_owned()),
            password: Some("c".to_owned()),
            ..RegistryConfig::new("http://registry:8081")
        });
        rejected(RegistryConfig {
            timeout: Duration::ZERO,
            ..RegistryConfig::new("http://registry:8081")
        });
    }
}

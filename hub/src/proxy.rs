//! One request through the hub: who asks, what for, the cloud or the
//! cache.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::metrics::{HubMetrics, Refusal};
use super::request::{self, ResourceRequest, Verb};
use super::store::{self, ListRecord, Store};
use netd_kube::KubeClient;

/// Errors of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the hub sends.
pub type HubBody = UnsyncBoxBody<Bytes, BoxError>;

/// The largest request body forwarded (a Pod with big annotations is far
/// smaller; kube-apiserver's own limit is 3 MiB per object).
const MAX_REQUEST_BODY: usize = 16 << 20;
/// The largest get or list response read into the cache.
const MAX_RESPONSE_BODY: usize = 256 << 20;
/// Time for a get or list response's body once its head arrived.
const BODY_TIMEOUT: Duration = netd_kube::REQUEST_TIMEOUT;
/// An offline watch without `timeoutSeconds` stays open this long.
const DEFAULT_OFFLINE_WATCH: Duration = Duration::from_secs(300);

/// Headers not forwarded in either direction: hop-by-hop ones, and
/// credentials or identities of the local client (the hub acts as the
/// node, with the node's certificate, and nothing else).
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
];

/// The shared state of the hub's request handling.
pub struct Hub {
    /// This node's name.
    pub node: String,
    /// The identity clients must have: `system:node:<node>`.
    pub identity: String,
    /// The upstream client, as the node.
    pub client: KubeClient,
    /// The cache; `None` with `--cache=false` (never used).
    pub store: Option<Store>,
    /// `true` while the cache is used (the node is autonomous, or
    /// `--cache=true`); `false`: pass-through. See [`super::autonomy`].
    pub caching: watch::Sender<bool>,
    /// Watch scopes sent back to list (410) since the cache was last
    /// turned on: each at most once, so a scope the cache cannot record
    /// never loops.
    pub relisted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Counters.
    pub metrics: Arc<HubMetrics>,
    /// `true` while the cloud answers.
    pub reachable: watch::Sender<bool>,
    /// Wakes the health probe (an upstream request just failed).
    pub probe_now: Notify,
    /// Time for kube-apiserver to send a response head.
    pub upstream_timeout: Duration,
}

/// Why an upstream request got no usable answer.
#[derive(Debug)]
struct Unreachable(String);

fn full(bytes: impl Into<Bytes>) -> HubBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A `Status` response as kube-apiserver sends it.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<HubBody> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<HubBody> {
    let mut response = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = code;
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let name_str = name.as_str();
        if DROPPED_HEADERS.contains(&name_str) || name_str.starts_with("impersonate-") {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// `kind` and `apiVersion` on an object from a list's items (the API
/// server leaves them out there).
fn with_type(mut object: Value, kind: &str, api_version: &str) -> Value {
    if let Some(map) = object.as_object_mut() {
        map.entry("kind").or_insert_with(|| Value::String(kind.to_string()));
        map.entry("apiVersion").or_insert_with(|| Value::String(api_version.to_string()));
    }
    object
}

impl Hub {
    /// The cloud is reachable (as far as the hub knows).
    fn is_reachable(&self) -> bool {
        *self.reachable.borrow()
    }

    /// Sets the cloud's reachability (gauge, watchers, log on change).
    pub fn set_reachable(&self, reachable: bool, why: &str) {
        let before = self.metrics.set_cloud_reachable(reachable);
        if before != reachable {
            if reachable {
                tracing::info!("the cloud is reachable again: reads go to kube-apiserver");
            } else {
                tracing::warn!(why, "the cloud is unreachable: reads are answered from the cache");
            }
        }
        self.reachable.send_if_modified(|current| std::mem::replace(current, reachable) != reachable);
    }

    /// The cache is in use now.
    fn is_caching(&self) -> bool {
        self.store.is_some() && *self.caching.borrow()
    }

    /// Turns the cache on (autonomous) or off (pass-through): gauge, log,
    /// and every open watch through the hub ends, so its client watches
    /// again in the new mode. Returns whether it changed.
    pub fn set_caching(&self, on: bool, why: &str) -> bool {
        let on = on && self.store.is_some();
        self.metrics.set_autonomous(on);
        let changed = self.caching.send_if_modified(|current| std::mem::replace(current, on) != on);
        if changed && on {
            self.relisted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        }
        if changed {
            if on {
                tracing::info!(why, "autonomous: the hub caches and answers from its cache while the cloud is away");
            } else {
                tracing::info!(why, "not autonomous: the hub is a plain pass-through");
            }
        }
        changed
    }

    fn upstream_failed(&self, why: &str) {
        self.metrics.upstream_error();
        self.set_reachable(false, why);
        self.probe_now.notify_one();
    }

    /// Answers one request from a client whose certificate's common name
    /// is `peer` (`None`: no certificate).
    pub async fn handle(self: Arc<Self>, peer: Option<Arc<str>>, request: Request<Incoming>) -> Response<HubBody> {
        self.metrics.request();
        match peer.as_deref() {
            None => {
                self.metrics.refused(Refusal::NoCertificate);
                return status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    "the hub serves only this node's kubelet: present its client certificate",
                );
            }
            Some(name) if name != self.identity => {
                self.metrics.refused(Refusal::WrongIdentity);
                tracing::info!(client = name, "refused a client that is not this node");
                return status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("the hub serves only {}, not {name}", self.identity),
                );
            }
            Some(_) => {}
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("reading the request body: {error}"),
                )
            }
        };
        let path = parts.uri.path().to_string();
        let parsed = match request::parse(&parts.method, &path, parts.uri.query()) {
            Ok(parsed) => parsed,
            Err(error) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &error.to_string()),
        };
        if let Some(r) = &parsed {
            if r.key.resource == "pods"
                && r.key.group.is_empty()
                && matches!(r.verb, Verb::List | Verb::Watch)
                && r.query.fields.required("spec.nodeName") != Some(self.node.as_str())
            {
                self.metrics.refused(Refusal::OtherNodesData);
                return status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "the hub serves only this node's pods: list them with fieldSelector=spec.nodeName={}",
                        self.node
                    ),
                );
            }
        }
        let Some(store) = self.store.clone().filter(|_| self.is_caching()) else {
            return self.forward(&parts, body).await;
        };
        match parsed {
            Some(r) if r.is_cached_read() => self.cached_read(&store, r, &parts).await,
            None if parts.method == Method::GET && request::is_discovery(&path) => {
                self.discovery(&store, &path, &parts).await
            }
            _ => self.forward(&parts, body).await,
        }
    }

    /// The upstream request: `parts` and `body`, as the node; `json`
    /// asks for JSON whatever the client accepts (the kubelet asks for
    /// protobuf first; the hub reads and caches JSON, and client-go decodes
    /// by the response's content type).
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        json: bool,
    ) -> Result<Response<kube::client::Body>, Unreachable> {
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::new(kube::client::Body::from(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() =
            path_and_query.parse().map_err(|e| Unreachable(format!("the request URI {path_and_query}: {e}")))?;
        copy_headers(&parts.headers, request.headers_mut());
        if json {
            request.headers_mut().insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
            request.headers_mut().remove(http::header::ACCEPT_ENCODING);
        }
        let what = format!("{} {}", parts.method, parts.uri.path());
        match tokio::time::timeout(self.upstream_timeout, self.client.client().send(request)).await {
            Err(_) => Err(Unreachable(format!("{what}: no answer within {:?}", self.upstream_timeout))),
            Ok(Err(error)) => Err(Unreachable(format!("{what}: {}", netd_kube::error_chain(&error)))),
            Ok(Ok(response)) if response.status().is_server_error() => {
                Err(Unreachable(format!("{what}: HTTP {}", response.status())))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// A request the hub does not cache: forwarded, streamed back; 503
    /// when the cloud cannot be reached.
    async fn forward(&self, parts: &http::request::Parts, body: Bytes) -> Response<HubBody> {
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::new(kube::client::Body::from(body));
        *request.method_mut() = parts.method.clone();
        match path_and_query.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(error) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &error.to_string()),
        }
        copy_headers(&parts.headers, request.headers_mut());
        let is_watch = parts.uri.query().is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
        let client = self.client.client();
        let sent = client.send(request);
        let outcome = if is_watch || !self.is_reachable() {
            // Watches and requests while offline: the head within the
            // timeout; others have it too (a write is never cut by the
            // hub once it went out).
            tokio::time::timeout(self.upstream_timeout, sent).await
        } else {
            tokio::time::timeout(self.upstream_timeout.max(BODY_TIMEOUT), sent).await
        };
        let response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let why = format!("{} {}: {}", parts.method, parts.uri.path(), netd_kube::error_chain(&error));
                self.upstream_failed(&why);
                return offline_write(&why);
            }
            Err(_) => {
                let why = format!("{} {}: no answer in time", parts.method, parts.uri.path());
                self.upstream_failed(&why);
                return offline_write(&why);
            }
        };
        let (head, body) = response.into_parts();
        let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
        // A pass-through watch ends when the hub starts caching, so that
        // its client watches again through the cache.
        let body = if is_watch && self.store.is_some() { until_caching(body, &self.caching) } else { body };
        let mut out = Response::new(body);
        *out.status_mut() = head.status;
        copy_headers(&head.headers, out.headers_mut());
        out
    }

    async fn discovery(&self, store: &Store, path: &str, parts: &http::request::Parts) -> Response<HubBody> {
        if self.is_reachable() {
            match self.send(parts, Bytes::new(), false).await {
                Ok(response) => {
                    let (head, body) = response.into_parts();
                    let bytes = match read_body(body).await {
                        Ok(bytes) => bytes,
                        Err(error) => return status_response(StatusCode::BAD_GATEWAY, "InternalError", &error),
                    };
                    if head.status == StatusCode::OK && is_json(&head.headers) {
                        let (store, path, copy) = (store.clone(), path.to_string(), bytes.clone());
                        self.write_cache(move || store.put_raw(&path, &copy)).await;
                    }
                    let mut out = Response::new(full(bytes));
                    *out.status_mut() = head.status;
                    copy_headers(&head.headers, out.headers_mut());
                    return out;
                }
                Err(Unreachable(why)) => self.upstream_failed(&why),
            }
        }
        let (store, owned) = (store.clone(), path.to_string());
        match blocking(move || store.get_raw(&owned)).await.flatten() {
            Some(bytes) => {
                self.metrics.served_offline();
                let mut out = Response::new(full(bytes));
                out.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                out
            }
            None => offline_miss(path),
        }
    }

    async fn write_cache(&self, write: impl FnOnce() -> Result<(), store::StoreError> + Send + 'static) {
        // An answer that was on its way when autonomy went off: the cache
        // was (or is about to be) removed; do not start it again.
        if !self.is_caching() {
            return;
        }
        match blocking(write).await {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                self.metrics.write_failure();
                tracing::warn!(%error, "cache write failed: the response is still sent, the cache keeps what it had");
            }
            None => self.metrics.write_failure(),
        }
    }

    /// A watch of a scope no list recorded in the cache, the first time
    /// since the cache was turned on. The client (a reflector that listed
    /// while the hub was a pass-through, or before the cache was emptied)
    /// would otherwise only ever watch from its `resourceVersion`, and
    /// objects that do not change would never reach the cache: 410 Expired
    /// makes it list again, through the hub, which records the scope.
    async fn needs_relist(&self, store: &Store, r: &ResourceRequest) -> bool {
        if r.verb != Verb::Watch || !r.query.fields.fields_supported() {
            return false;
        }
        let (store, request) = (store.clone(), r.clone());
        let covered =
            blocking(move || store.list_records(&request.key).iter().any(|record| record.covers(&request))).await;
        if covered.unwrap_or(true) {
            return false;
        }
        let scope = format!(
            "{}|{}|{}|{}",
            r.key,
            r.namespace.as_deref().unwrap_or(""),
            r.query.fields.canonical(),
            r.query.labels.canonical()
        );
        self.relisted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(scope)
    }

    async fn cached_read(&self, store: &Store, r: ResourceRequest, parts: &http::request::Parts) -> Response<HubBody> {
        let resource = r.key.to_string();
        if self.is_reachable() && self.needs_relist(store, &r).await {
            tracing::info!(resource, "a watch of a scope the cache never listed: asked to list again (410)");
            return status_response(
                StatusCode::GONE,
                "Expired",
                "the hub's cache has no list of this scope yet: list again (through the hub) so that it can be \
                 answered while the cloud is away",
            );
        }
        if self.is_reachable() {
            let wants_table = parts
                .headers
                .get_all(http::header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("as=Table")));
            match self.send(parts, Bytes::new(), !wants_table).await {
                Ok(response) => {
                    self.metrics.miss(&resource);
                    if wants_table {
                        let (head, body) = response.into_parts();
                        let mut out = Response::new(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
                        *out.status_mut() = head.status;
                        copy_headers(&head.headers, out.headers_mut());
                        return out;
                    }
                    return match r.verb {
                        Verb::Watch => self.online_watch(store, r, response),
                        _ => self.online_read(store, r, response).await,
                    };
                }
                Err(Unreachable(why)) => self.upstream_failed(&why),
            }
        }
        self.offline_read(store, r).await
    }

    async fn online_read(
        &self,
        store: &Store,
        r: ResourceRequest,
        response: Response<kube::client::Body>,
    ) -> Response<HubBody> {
        let (head, body) = response.into_parts();
        let bytes = match read_body(body).await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.upstream_failed(&error);
                return self.offline_read(store, r).await;
            }
        };
        let mut out = Response::new(full(bytes.clone()));
        *out.status_mut() = head.status;
        copy_headers(&head.headers, out.headers_mut());
        if head.status == StatusCode::NOT_FOUND && r.verb == Verb::Get {
            // Authoritative: the object is gone.
            if let Some(name) = r.name.clone() {
                let (store, key, ns) = (store.clone(), r.key.clone(), r.namespace.clone());
                self.write_cache(move || store.delete_object(&key, ns.as_deref(), &name)).await;
            }
            return out;
        }
        if head.status != StatusCode::OK || !is_json(&head.headers) {
            return out;
        }
        let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
            tracing::warn!(resource = %r.key, "kube-apiserver's answer is not JSON: not cached");
            return out;
        };
        match r.verb {
            Verb::Get => {
                if !self.own_object(&r, &value) {
                    self.metrics.refused(Refusal::OtherNodesData);
                    return status_response(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        &format!("the hub serves only pods bound to {}", self.node),
                    );
                }
                let object = value;
                let (store, key) = (store.clone(), r.key.clone());
                self.write_cache(move || store.put_object(&key, &object)).await;
            }
            Verb::List => {
                let list_kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
                let kind = list_kind.strip_suffix("List").unwrap_or(&list_kind).to_string();
                let api_version = r.key.api_version();
                let items: Vec<Value> = value
                    .get("items")
                    .and_then(Value::as_array)
                    .map(|items| items.iter().map(|i| with_type(i.clone(), &kind, &api_version)).collect())
                    .unwrap_or_default();
                let items: Vec<Value> = items.into_iter().filter(|i| self.own_object(&r, i)).collect();
                let more = value.pointer("/metadata/continue").and_then(Value::as_str).is_some_and(|c| !c.is_empty());
                let rv = value.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("").to_string();
                let complete = !more && r.query.continue_token.is_none() && r.query.fields.fields_supported();
                let store = store.clone();
                if complete {
                    let record = ListRecord::of(&r, &list_kind, &rv);
                    self.write_cache(move || store.replace_scope(&r, &items, &record)).await;
                } else {
                    let key = r.key.clone();
                    self.write_cache(move || store.merge_items(&key, &items)).await;
                }
            }
            _ => {}
        }
        out
    }

    /// False for a pod not bound to this node.
    fn own_object(&self, r: &ResourceRequest, object: &Value) -> bool {
        r.key.resource != "pods"
            || !r.key.group.is_empty()
            || object.pointer("/spec/nodeName").and_then(Value::as_str) == Some(self.node.as_str())
    }

    /// A watch from the cloud, streamed to the client as it comes, its
    /// events applied to the cache in order.
    fn online_watch(
        &self,
        store: &Store,
        r: ResourceRequest,
        response: Response<kube::client::Body>,
    ) -> Response<HubBody> {
        let (head, mut body) = response.into_parts();
        if head.status != StatusCode::OK {
            let mut out = Response::new(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            *out.status_mut() = head.status;
            copy_headers(&head.headers, out.headers_mut());
            return out;
        }
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(64);
        let (store, metrics, node) = (store.clone(), self.metrics.clone(), self.node.clone());
        let mut caching = self.caching.subscribe();
        tokio::spawn(async move {
            let mut events = EventSplitter::default();
            loop {
                let frame = tokio::select! {
                    frame = body.frame() => frame,
                    () = tx.closed() => break,
                    // Autonomy went off: the client watches again, through.
                    _ = caching.wait_for(|on| !*on) => break,
                };
                let data = match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                    // A broken stream ends the client's watch cleanly: it
                    // watches again from its last resourceVersion (through
                    // the cache when the cloud is gone).
                    Some(Err(_)) | None => break,
                };
                if tx.send(Ok(Frame::data(data.clone()))).await.is_err() {
                    break;
                }
                let ready = events.push(&data);
                if ready.is_empty() {
                    continue;
                }
                let (store, key, node) = (store.clone(), r.key.clone(), node.clone());
                let applied = blocking(move || apply_events(&store, &key, &node, ready)).await;
                if let Some(failures) = applied {
                    for _ in 0..failures {
                        metrics.write_failure();
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let mut out = Response::new(StreamBody::new(stream).boxed_unsync());
        *out.status_mut() = head.status;
        copy_headers(&head.headers, out.headers_mut());
        out
    }

    async fn offline_read(&self, store: &Store, r: ResourceRequest) -> Response<HubBody> {
        let resource = r.key.to_string();
        let answer = match r.verb {
            Verb::Get => {
                let (store, key, ns, name) = (store.clone(), r.key.clone(), r.namespace.clone(), r.name.clone());
                let object =
                    blocking(move || name.and_then(|n| store.get_object(&key, ns.as_deref(), &n))).await.flatten();
                object.map(|o| json_response(StatusCode::OK, &o))
            }
            Verb::List => {
                let store = store.clone();
                let request = r.clone();
                blocking(move || offline_list(&store, &request))
                    .await
                    .flatten()
                    .map(|l| json_response(StatusCode::OK, &l))
            }
            Verb::Watch => {
                if r.query.send_initial_events {
                    // Nothing to send the initial events from consistently:
                    // refused, so that the client falls back to list+watch.
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the cloud is unreachable: the hub answers list then watch, not sendInitialEvents",
                    );
                }
                let (store2, key) = (store.clone(), r.key.clone());
                let records = blocking(move || store2.list_records(&key)).await.unwrap_or_default();
                if records.iter().any(|record| record.covers(&r)) && r.query.fields.fields_supported() {
                    Some(self.offline_watch(&r))
                } else {
                    None
                }
            }
            Verb::Other => None,
        };
        match answer {
            Some(response) => {
                self.metrics.hit(&resource);
                self.metrics.served_offline();
                response
            }
            None => {
                self.metrics.miss(&resource);
                offline_miss(&format!("{} {}", verb_name(r.verb), r.key))
            }
        }
    }

    /// An offline watch: accepted, nothing sent (the list the client just
    /// got from the cache is the whole state), ended when its
    /// `timeoutSeconds` pass or the cloud is back, so that the client
    /// watches again, then from the cloud (which replays what happened
    /// meanwhile, or answers 410 Gone and the client lists again).
    fn offline_watch(&self, r: &ResourceRequest) -> Response<HubBody> {
        let limit = r.query.timeout_seconds.map_or(DEFAULT_OFFLINE_WATCH, Duration::from_secs);
        let (mut reachable, mut caching) = (self.reachable.subscribe(), self.caching.subscribe());
        let ended = async move {
            tokio::select! {
                () = tokio::time::sleep(limit) => {}
                _ = reachable.wait_for(|up| *up) => {}
                _ = caching.wait_for(|on| !*on) => {}
            }
        };
        use futures_util::StreamExt as _;
        let stream =
            futures_util::stream::once(ended).filter_map(|()| async { None::<Result<Frame<Bytes>, BoxError>> });
        let mut out = Response::new(StreamBody::new(stream).boxed_unsync());
        out.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        out
    }
}

fn verb_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Other => "request",
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn offline_write(why: &str) -> Response<HubBody> {
    status_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        &format!("the cloud is unreachable, the hub cannot forward this ({why}); retry later"),
    )
}

fn offline_miss(what: &str) -> Response<HubBody> {
    status_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        &format!("the cloud is unreachable and the hub's cache cannot answer {what}; retry later"),
    )
}

async fn read_body(body: kube::client::Body) -> Result<Bytes, String> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_RESPONSE_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => Err(format!("reading kube-apiserver's answer: {error}")),
        Err(_) => Err(format!("kube-apiserver's answer took more than {BODY_TIMEOUT:?}")),
    }
}

/// `body`, ended when `caching` turns on (or the hub goes away).
fn until_caching(body: HubBody, caching: &watch::Sender<bool>) -> HubBody {
    let state = (body, caching.subscribe());
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let (mut body, mut caching) = state?;
        // Also when it turned on between the request and its answer.
        if *caching.borrow_and_update() {
            return None;
        }
        loop {
            tokio::select! {
                frame = body.frame() => return frame.map(|frame| (frame, Some((body, caching)))),
                changed = caching.changed() => {
                    if changed.is_err() || *caching.borrow_and_update() {
                        return None;
                    }
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Runs blocking cache work off the runtime's threads; `None` if it
/// panicked.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(work).await.ok()
}

/// The list `r` asks for, from the cache: only when a list the cloud
/// answered covers its scope, and its field selector can be evaluated.
fn offline_list(store: &Store, r: &ResourceRequest) -> Option<Value> {
    if !r.query.fields.fields_supported() {
        return None;
    }
    let records = store.list_records(&r.key);
    let covering: Vec<&ListRecord> = records.iter().filter(|record| record.covers(r)).collect();
    let kind = covering.first()?.kind.clone();
    let objects: Vec<Value> =
        store.objects(&r.key, r.namespace.as_deref()).into_iter().filter(|o| r.scope_matches(o)).collect();
    let newest_object = objects.iter().filter_map(store::resource_version).max();
    let newest_list = covering.iter().filter_map(|record| record.resource_version.parse::<u64>().ok()).max();
    let rv = newest_object.max(newest_list).map(|rv| rv.to_string()).unwrap_or_default();
    let items: Vec<Value> = objects
        .into_iter()
        .map(|mut o| {
            if let Some(map) = o.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            o
        })
        .collect();
    Some(json!({
        "kind": kind,
        "apiVersion": r.key.api_version(),
        "metadata": { "resourceVersion": rv },
        "items": items,
    }))
}

/// Splits a watch stream (JSON objects one after another) into events.
#[derive(Default)]
struct EventSplitter {
    buffer: Vec<u8>,
    broken: bool,
}

impl EventSplitter {
    /// Adds bytes; returns the events now complete.
    fn push(&mut self, data: &[u8]) -> Vec<Value> {
        if self.broken {
            return Vec::new();
        }
        self.buffer.extend_from_slice(data);
        let mut events = Vec::new();
        let mut consumed = 0;
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        loop {
            match stream.next() {
                Some(Ok(event)) => {
                    consumed = stream.byte_offset();
                    events.push(event);
                }
                Some(Err(error)) if error.is_eof() => break,
                Some(Err(error)) => {
                    tracing::warn!(%error, "a watch stream that is not JSON: its events are not cached");
                    self.broken = true;
                    self.buffer.clear();
                    return events;
                }
                None => {
                    consumed = self.buffer.len();
                    break;
                }
            }
        }
        self.buffer.drain(..consumed);
        events
    }
}

/// Applies watch events to the cache; returns how many writes failed.
fn apply_events(store: &Store, key: &request::ResourceKey, node: &str, events: Vec<Value>) -> usize {
    let mut failures = 0;
    for event in events {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let Some(object) = event.get("object") else { continue };
        if key.resource == "pods"
            && key.group.is_empty()
            && object.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node)
            && kind != "DELETED"
        {
            continue;
        }
        let result = match kind {
            "ADDED" | "MODIFIED" => store.put_object(key, object),
            "DELETED" => match store::object_id(object) {
                (namespace, Some(name)) => store.delete_object(key, namespace, name),
                _ => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(error) = result {
            failures += 1;
            tracing::warn!(%error, "cache write of a watch event failed: the event is still sent");
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn watch_events_are_split_across_chunk_boundaries() {
        let mut splitter = EventSplitter::default();
        let a = br#"{"type":"ADDED","object":{"metadata":{"name":"a"}}}"#;
        let b = br#"{"type":"DELETED","object":{"metadata":{"name":"b"}}}"#;
        let mut all = a.to_vec();
        all.push(b'\n');
        all.extend_from_slice(b);
        all.push(b'\n');
        let (first, second) = all.split_at(a.len() + 10);
        assert_eq!(splitter.push(first).len(), 1);
        let rest = splitter.push(second);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0]["type"], "DELETED");
        assert!(splitter.push(b"").is_empty());
    }
}

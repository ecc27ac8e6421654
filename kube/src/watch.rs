//! The one list+watch machinery: `kube_runtime::watcher` folded into
//! [`WatchEvent`]s, with the "fresh list after any error" rule netd's
//! consumers rely on, and a backoff for those that retry by themselves.
//!
//! The watcher lists in pages of 100 with a consistent read (no
//! `resourceVersion=0`: the API server's cache may be behind, and a list
//! after a reconnect must be the truth), watches from the list's
//! `resourceVersion` with bookmarks, renews the watch from the last seen
//! version when the server ends it (`timeoutSeconds`), treats a watch
//! silent for longer than its timeout plus 5 s as a dead connection, and
//! relists after `410 Gone`. On top of that, [`ListWatch`] drops the
//! watcher after any error, so the next event is always a complete
//! [`WatchEvent::Listed`]: whatever happened while the API server was out
//! of reach shows up in that list.

use std::fmt::Debug;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use kube::runtime::watcher;
use kube::Api;
use serde::de::DeserializeOwned;
use sync_wrapper::SyncWrapper;
use tokio::time::Instant;

use super::{error_chain, KubeClient, KubeError};

/// First retry delay of [`ListWatch::next`]; it doubles up to
/// [`BACKOFF_MAX`], as the daemon's registry loop does.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay of [`ListWatch::next`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Default `timeoutSeconds` of a watch; it is renewed transparently.
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// Page size of lists: each page is read whole (text, then objects), so
/// smaller pages keep the peak of a 1 000-node list low; 10 round trips
/// for 1 000 nodes cost milliseconds.
const PAGE_SIZE: u32 = 100;

/// What a watch saw.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<K> {
    /// Every object, from a complete list: replaces what was known. The
    /// first event, and the first after any error.
    Listed(Vec<K>),
    /// An object appeared or changed.
    Applied(K),
    /// An object was deleted (the last state the server had of it).
    Deleted(K),
}

/// Exponential backoff: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt, counting this failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = BACKOFF_MIN.saturating_mul(1u32 << self.failures.min(10)).min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// A success: the next failure waits [`BACKOFF_MIN`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The watcher's stream. It is `Send` but not `Sync`; [`SyncWrapper`]
/// makes a `ListWatch` (and what holds it, like the registry) `Sync` by
/// allowing access only through `&mut`, which is all it needs.
type EventStream<K> = SyncWrapper<BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>>;

/// A list+watch of one kind of object (`K` is usually an
/// [`Object`](super::object::Object)).
///
/// Cancel-safe: everything in flight (the watcher, a list being
/// collected, a pending retry) lives in `self`, so dropping a `next` or
/// `try_next` future (a `select!`) loses nothing.
pub struct ListWatch<K: 'static> {
    client: KubeClient,
    /// Makes the API handle on the runtime (the kube-rs client is made
    /// there): all namespaces, or the one in `namespace`.
    api: fn(kube::Client, Option<&str>) -> Api<K>,
    namespace: Option<String>,
    fields: Option<String>,
    labels: Option<String>,
    timeout: Duration,
    what: String,
    stream: Option<EventStream<K>>,
    /// Objects of the list in progress.
    listing: Option<Vec<K>>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl<K: Debug> Debug for ListWatch<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListWatch").field("what", &self.what).field("active", &self.stream.is_some()).finish()
    }
}

/// The watcher settings netd uses: consistent paginated lists, bookmarks,
/// `timeout` as the watch's `timeoutSeconds` (at least 1 s), and the field
/// selector if any.
fn watch_config(timeout: Duration, fields: Option<&str>, labels: Option<&str>) -> watcher::Config {
    let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
    let mut config =
        watcher::Config::default().timeout(secs).page_size(PAGE_SIZE).list_semantic(watcher::ListSemantic::MostRecent);
    if let Some(selector) = fields {
        config = config.fields(selector);
    }
    if let Some(selector) = labels {
        config = config.labels(selector);
    }
    config
}

impl<K> ListWatch<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Eq + std::hash::Hash + Send + Sync,
{
    /// A list+watch, on `client`, of the objects of kind `K` (in all
    /// namespaces) that match the field selector
    /// `fields` (e.g. `spec.nodeName=edge-1`; `None`: all), with watches of
    /// [`DEFAULT_WATCH_TIMEOUT`]; `what` names the kind in errors and logs
    /// (e.g. `"node"`). Nothing is contacted until the first event is asked
    /// for.
    pub fn new(client: &KubeClient, fields: Option<String>, what: impl Into<String>) -> Self {
        Self {
            client: client.clone(),
            api: |client, _| Api::all(client),
            namespace: None,
            fields,
            labels: None,
            timeout: DEFAULT_WATCH_TIMEOUT,
            what: what.into(),
            stream: None,
            listing: None,
            backoff: Backoff::default(),
            retry_at: None,
        }
    }

    /// [`ListWatch::new`] for the objects of one namespace only: what a
    /// component allowed to read one namespace (a Role, not a ClusterRole)
    /// can watch, and the only way to watch one namespace's object by name
    /// (`metadata.name=…` alone would match that name in every namespace).
    pub fn namespaced(
        client: &KubeClient,
        namespace: impl Into<String>,
        fields: Option<String>,
        what: impl Into<String>,
    ) -> Self
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Self {
            api: |client, namespace| match namespace {
                Some(namespace) => Api::namespaced(client, namespace),
                None => Api::all(client),
            },
            namespace: Some(namespace.into()),
            ..Self::new(client, fields, what)
        }
    }

    /// Watches only the objects matching the label selector `selector`
    /// (e.g. `app=netd`), from the next (re)start on.
    pub fn with_labels(mut self, selector: impl Into<String>) -> Self {
        self.labels = Some(selector.into());
        self.restart();
        self
    }

    /// Sets the `timeoutSeconds` of watches (at least one second) from the
    /// next (re)start on; a watch silent for longer than this plus 5 s
    /// counts as a dead connection.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_secs(1));
        self.restart();
    }

    /// Forgets the watch: the next event is a fresh [`WatchEvent::Listed`].
    pub fn restart(&mut self) {
        self.stream = None;
        self.listing = None;
    }

    /// The next event. An error ends this watch: the next call lists again
    /// (and its first event is [`WatchEvent::Listed`]).
    pub async fn try_next(&mut self) -> Result<WatchEvent<K>, KubeError> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream.get_mut(),
                None => {
                    let config = watch_config(self.timeout, self.fields.as_deref(), self.labels.as_deref());
                    let api = (self.api)(self.client.client(), self.namespace.as_deref());
                    self.stream.insert(SyncWrapper::new(watcher(api, config).boxed())).get_mut()
                }
            };
            let event = match stream.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => {
                    self.restart();
                    return Err(watch_error(&self.what, error));
                }
                None => {
                    // The watcher's stream does not end by itself.
                    self.restart();
                    return Err(KubeError::Unreachable(format!("{} watch ended", self.what)));
                }
            };
            match event {
                watcher::Event::Init => self.listing = Some(Vec::new()),
                watcher::Event::InitApply(object) => self.listing.get_or_insert_with(Vec::new).push(object),
                watcher::Event::InitDone => return Ok(WatchEvent::Listed(self.listing.take().unwrap_or_default())),
                watcher::Event::Apply(object) => return Ok(WatchEvent::Applied(object)),
                watcher::Event::Delete(object) => return Ok(WatchEvent::Deleted(object)),
            }
        }
    }

    /// The next event, retrying errors with [`Backoff`] (each logged as a
    /// warning); never fails. While the API server is unreachable this
    /// yields nothing; once it answers, a complete [`WatchEvent::Listed`].
    pub async fn next(&mut self) -> WatchEvent<K> {
        loop {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            match self.try_next().await {
                Ok(event) => {
                    self.backoff.reset();
                    return event;
                }
                Err(error) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(watch = %self.what, %error, retry_in_ms = delay.as_millis() as u64, "watch failed; listing again after the delay");
                    self.retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }
}

/// A watcher error as a [`KubeError`]: every one is transient except a
/// refusal (401/403…), which the caller reports as such.
fn watch_error(what: &str, error: watcher::Error) -> KubeError {
    match error {
        watcher::Error::InitialListFailed(e) => KubeError::from_client(&format!("listing {what}s"), e),
        watcher::Error::WatchStartFailed(e) => KubeError::from_client(&format!("watching {what}s"), e),
        watcher::Error::WatchError(status) if status.code == 410 => KubeError::Unreachable(format!(
            "{what} watch: resource version expired (410 Gone: {}); the next event is a full list",
            status.message
        )),
        watcher::Error::WatchError(status) => {
            KubeError::Unreachable(format!("{what} watch error {}: {}", status.code, status.message))
        }
        watcher::Error::WatchFailed(e) => KubeError::Unreachable(format!("{what} watch broke: {}", error_chain(&e))),
        watcher::Error::NoResourceVersion => {
            KubeError::Unreachable(format!("{what} list or watch event without metadata.resourceVersion"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| backoff.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn watch_errors_say_what_happened() {
        let gone = kube::core::Status::failure("too old resource version: 5 (9)", "Expired").with_code(410);
        let err = watch_error("node", watcher::Error::WatchError(gone.boxed()));
        assert!(err.is_transient() && err.to_string().contains("410 Gone"), "{err}");
        let refused = kube::core::Status::failure("Unauthorized", "Unauthorized").with_code(401);
        let err = watch_error("pod", watcher::Error::InitialListFailed(kube::Error::Api(refused.boxed())));
        assert_eq!(err.to_string(), "listing pods: HTTP 401 Unauthorized: Unauthorized");
    }
}

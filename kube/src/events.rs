//! core/v1 Events, as Kubernetes' own recorders write them: what
//! `kubectl describe` shows under an object.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};

use super::{call, KubeClient, KubeError};

/// The object an Event is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Regarding {
    /// e.g. `v1`, `apps/v1`.
    pub api_version: String,
    /// e.g. `ConfigMap`, `DaemonSet`.
    pub kind: String,
    /// Its namespace (the Event's too).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID, when known.
    pub uid: Option<String>,
    /// The resourceVersion the Event is about, when it matters.
    pub resource_version: Option<String>,
}

/// Who reports: the component and the node it runs on.
#[derive(Debug, Clone, Copy)]
pub struct Reporter<'a> {
    /// e.g. `netd-controller`.
    pub component: &'a str,
    /// The node (or replica) reporting.
    pub host: &'a str,
}

/// An Event of `type_` (`Normal` or `Warning`) about `regarding`.
pub fn event(regarding: &Regarding, reporter: Reporter<'_>, type_: &str, reason: &str, message: &str) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    // Kubernetes' own recorders name Events `<object>.<nanoseconds, hex>`.
    let name = format!("{}.{:x}", regarding.name, now.as_nanosecond());
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(regarding.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(regarding.api_version.clone()),
            kind: Some(regarding.kind.clone()),
            namespace: Some(regarding.namespace.clone()),
            name: Some(regarding.name.clone()),
            uid: regarding.uid.clone(),
            resource_version: regarding.resource_version.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some(type_.to_string()),
        source: Some(EventSource {
            component: Some(reporter.component.to_string()),
            host: Some(reporter.host.to_string()),
        }),
        reporting_component: Some(reporter.component.to_string()),
        reporting_instance: Some(reporter.host.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    }
}

/// Creates `event` in its namespace.
pub async fn post(client: &KubeClient, event: &Event) -> Result<(), KubeError> {
    let namespace = event.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.client(), &namespace);
    let what = format!(
        "posting Event {} on {namespace}/{}",
        event.reason.as_deref().unwrap_or(""),
        event.involved_object.name.as_deref().unwrap_or("")
    );
    call(&what, api.create(&PostParams::default(), event)).await.map(|_| ())
}

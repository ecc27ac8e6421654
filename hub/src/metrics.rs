//! The hub's counters and gauges, rendered in Prometheus' text format on
//! the metrics port.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// No client certificate.
    NoCertificate,
    /// A certificate the cluster CA did not issue (the TLS handshake fails).
    UntrustedCertificate,
    /// A certificate of another identity than this node's.
    WrongIdentity,
    /// A request for another node's data (its pods).
    OtherNodesData,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UntrustedCertificate => "untrusted_certificate",
            Self::WrongIdentity => "wrong_identity",
            Self::OtherNodesData => "other_nodes_data",
        }
    }
}

/// Everything the hub counts; shared by its tasks.
#[derive(Debug, Default)]
pub struct HubMetrics {
    hits: Mutex<BTreeMap<String, u64>>,
    misses: Mutex<BTreeMap<String, u64>>,
    refused: Mutex<BTreeMap<Refusal, u64>>,
    cloud_reachable: AtomicBool,
    autonomous: AtomicBool,
    served_offline: AtomicU64,
    corrupt_files: AtomicU64,
    write_failures: AtomicU64,
    requests: AtomicU64,
    upstream_errors: AtomicU64,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *map.lock().unwrap_or_else(PoisonError::into_inner).entry(key.to_string()).or_default() += 1;
}

impl HubMetrics {
    /// A cacheable read answered from the cache.
    pub fn hit(&self, resource: &str) {
        bump(&self.hits, resource);
    }

    /// A cacheable read the cache did not answer (it went to the cloud, or
    /// the cache did not have it).
    pub fn miss(&self, resource: &str) {
        bump(&self.misses, resource);
    }

    /// Hits so far for `resource`.
    pub fn hits(&self, resource: &str) -> u64 {
        self.hits.lock().unwrap_or_else(PoisonError::into_inner).get(resource).copied().unwrap_or(0)
    }

    /// Misses so far for `resource`.
    pub fn misses(&self, resource: &str) -> u64 {
        self.misses.lock().unwrap_or_else(PoisonError::into_inner).get(resource).copied().unwrap_or(0)
    }

    /// A refused client or request.
    pub fn refused(&self, why: Refusal) {
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner).entry(why).or_default() += 1;
    }

    /// Refusals so far, all reasons.
    pub fn refused_total(&self) -> u64 {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner).values().sum()
    }

    /// Sets the "cloud reachable" gauge; returns its previous value.
    pub fn set_cloud_reachable(&self, reachable: bool) -> bool {
        self.cloud_reachable.swap(reachable, Ordering::AcqRel)
    }

    /// The "cloud reachable" gauge.
    pub fn cloud_reachable(&self) -> bool {
        self.cloud_reachable.load(Ordering::Acquire)
    }

    /// Sets the "autonomous" gauge: the hub caches and answers offline.
    pub fn set_autonomous(&self, autonomous: bool) {
        self.autonomous.store(autonomous, Ordering::Release);
    }

    /// The "autonomous" gauge.
    pub fn autonomous(&self) -> bool {
        self.autonomous.load(Ordering::Acquire)
    }

    /// A request answered from the cache because the cloud was unreachable.
    pub fn served_offline(&self) {
        self.served_offline.fetch_add(1, Ordering::Relaxed);
    }

    /// A corrupt cache file skipped.
    pub fn corrupt_file(&self) {
        self.corrupt_files.fetch_add(1, Ordering::Relaxed);
    }

    /// Corrupt cache files skipped so far.
    pub fn corrupt_files(&self) -> u64 {
        self.corrupt_files.load(Ordering::Relaxed)
    }

    /// A cache write that failed (disk full, …).
    pub fn write_failure(&self) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A request received.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request the cloud did not answer (connection error, timeout, 5xx).
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition, with the cache's object count and file bytes.
    pub fn render(self: &Arc<Self>, objects: u64, bytes: u64) -> String {
        netd_metrics::render(Scrape { metrics: self.clone(), objects, bytes })
    }
}

/// One scrape: the counters and the cache's size, measured for it (a walk
/// of the cache directory, done off the runtime threads by the caller).
#[derive(Debug)]
struct Scrape {
    metrics: Arc<HubMetrics>,
    objects: u64,
    bytes: u64,
}

impl netd_metrics::Collector for Scrape {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        let mut out = netd_metrics::Families::new(encoder);
        let by_resource =
            |map: &Mutex<BTreeMap<String, u64>>| map.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let hits = by_resource(&m.hits);
        out.counters(
            "netd_hub_cache_hits_total",
            "Cacheable reads answered from the cache.",
            hits.iter().map(|(resource, n)| ([("resource", resource.as_str())], *n)),
        )?;
        let misses = by_resource(&m.misses);
        out.counters(
            "netd_hub_cache_misses_total",
            "Cacheable reads not answered from the cache (sent to the cloud, or not cached).",
            misses.iter().map(|(resource, n)| ([("resource", resource.as_str())], *n)),
        )?;
        out.gauge("netd_hub_cached_objects", "Objects in the cache.", self.objects)?;
        out.gauge("netd_hub_cached_bytes", "Bytes of the cache's object files.", self.bytes)?;
        out.gauge(
            "netd_hub_cloud_reachable",
            "1 when kube-apiserver answers the health probe.",
            u64::from(m.cloud_reachable()),
        )?;
        out.gauge(
            "netd_hub_autonomous",
            "1 when the hub caches and answers from its cache offline (the node is autonomous, or --cache=true); \
             0 when it is a pass-through.",
            u64::from(m.autonomous()),
        )?;
        out.counter(
            "netd_hub_requests_served_offline_total",
            "Requests answered from the cache while the cloud was unreachable.",
            m.served_offline.load(Ordering::Relaxed),
        )?;
        out.counter(
            "netd_hub_corrupt_files_skipped_total",
            "Cache files found corrupt or truncated, skipped and never served.",
            m.corrupt_files(),
        )?;
        out.counter(
            "netd_hub_cache_write_failures_total",
            "Cache writes that failed (the response was still sent).",
            m.write_failures.load(Ordering::Relaxed),
        )?;
        out.counter("netd_hub_requests_total", "Requests received.", m.requests.load(Ordering::Relaxed))?;
        out.counter(
            "netd_hub_upstream_errors_total",
            "Requests kube-apiserver did not answer (connection error, timeout, 5xx).",
            m.upstream_errors.load(Ordering::Relaxed),
        )?;
        let refused = m.refused.lock().unwrap_or_else(PoisonError::into_inner).clone();
        out.counters(
            "netd_hub_refused_total",
            "Clients and requests refused.",
            refused.iter().map(|(why, n)| ([("reason", why.label())], *n)),
        )
    }
}

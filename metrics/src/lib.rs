//! netd's metrics: every `/metrics` endpoint encodes through
//! [`prometheus_client`] (Prometheus' text format 0.0.4, what every
//! Prometheus since 2.0 scrapes), and the `http` feature serves them on hyper.
//!
//! Components keep their counters where the hot path can bump them (plain
//! atomics, snapshots of kernel maps) and implement [`Collector`]: at scrape
//! time they write their families through [`Families`], which states the
//! name a user queries (`netd_reconciles_total`), its help text and type
//! once, so names, labels and escaping come out the same everywhere.
//!
//! ```
//! use netd_metrics::{Collector, DescriptorEncoder, Families};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! #[derive(Debug, Default)]
//! struct Jobs { done: AtomicU64 }
//!
//! impl Collector for Jobs {
//!     fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
//!         let mut out = Families::new(encoder);
//!         out.counter("jobs_done_total", "Jobs done.", self.done.load(Ordering::Relaxed))?;
//!         out.counters("jobs_failed_total", "Jobs failed, by reason.", [([("reason", "disk")], 2)])
//!     }
//! }
//!
//! let jobs = std::sync::Arc::new(Jobs::default());
//! jobs.done.fetch_add(3, Ordering::Relaxed);
//! let text = netd_metrics::render(jobs);
//! let expected = [
//!     "# HELP jobs_done_total Jobs done.",
//!     "# TYPE jobs_done_total counter",
//!     "jobs_done_total 3",
//!     "# HELP jobs_failed_total Jobs failed, by reason.",
//!     "# TYPE jobs_failed_total counter",
//!     "jobs_failed_total{reason=\"disk\"} 2",
//! ];
//! assert_eq!(text.lines().collect::<Vec<_>>(), expected);
//! ```

use std::fmt;
use std::sync::Arc;

pub use prometheus_client;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{EncodeGaugeValue, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

#[cfg(feature = "http")]
mod server;
#[cfg(feature = "http")]
pub use server::serve_text;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Writes metric families for a [`Collector`], one call per family.
///
/// Counter names are given as users query them, ending in `_total`; the
/// library adds that suffix itself, so it is taken off before the name is
/// handed over (a counter without it is a programming error, caught in
/// debug builds).
#[derive(Debug)]
pub struct Families<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl<'a> Families<'a> {
    /// Writes into the encoder a scrape hands to [`Collector::encode`].
    pub fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Self { encoder }
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let mut family = self.encoder.encode_descriptor(counter_base(name), help, None, MetricType::Counter)?;
        family.encode_counter::<NoLabelSet, _, u64>(&value, None)
    }

    /// A gauge without labels (integers or `f64`).
    pub fn gauge(&mut self, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
        self.encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
    }

    /// A counter family: one sample per label set (`[("reason", "port")]`).
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family = self.encoder.encode_descriptor(counter_base(name), help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            family.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        Ok(())
    }

    /// A gauge family: one sample per label set.
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let mut family = self.encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            family.encode_family(&labels)?.encode_gauge(&value)?;
        }
        Ok(())
    }
}

fn counter_base(name: &str) -> &str {
    debug_assert!(name.ends_with("_total"), "counter {name} must end in _total");
    name.strip_suffix("_total").unwrap_or(name)
}

/// The registry's metrics in Prometheus' text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String fails only if a collector reports an error;
    // what was written before it is still worth serving.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// One collector's metrics, in the text format [`encode`] writes.
pub fn render(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    encode(&registry)
}

/// A collector that writes what `encode` reads from a value the process
/// shares (a router, a set of atomics inside a larger struct), so the value
/// needs no [`Collector`] impl of its own.
pub fn from_fn<T: Send + Sync + 'static>(
    shared: Arc<T>,
    encode: fn(&T, &mut Families<'_>) -> fmt::Result,
) -> impl Collector {
    FromFn { shared, encode }
}

struct FromFn<T> {
    shared: Arc<T>,
    encode: fn(&T, &mut Families<'_>) -> fmt::Result,
}

impl<T> fmt::Debug for FromFn<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").field("shared", &std::any::type_name::<T>()).finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Collector for FromFn<T> {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.encode)(&self.shared, &mut Families::new(encoder))
    }
}

//! Metrics: counters and fixed-bucket histograms made of the project's own atomics (recording never
//! locks or allocates), exposed by `/metrics` through `prometheus-client`'s text encoder.
//!
//! Why `prometheus-client` (the Prometheus project's own Rust client) and not `metrics` with its
//! exporter: its [`Collector`] trait lets a scrape read our atomics directly, so the request path
//! stays one `fetch_add` per counter with no registry lookup, no label map and no allocation, and the
//! per-core issue can shard these atomics later without touching the exposition. `metrics` routes
//! every increment through a global recorder keyed by name and labels, which is a lookup (or a
//! handle to keep) per call site. The encoder writes the OpenMetrics text format: counters are
//! declared without their `_total` suffix (`# TYPE turnstile_reservations counter`) and their
//! samples keep it (`turnstile_reservations_total 42`), so every sample name is what it was, and
//! the body ends with `# EOF`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds. Values are recorded in the unit of the bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound (not cumulative), plus one for +Inf.
    counts: Box<[AtomicU64]>,
    /// Sum of recorded values, in millionths of the unit (integer, so an atomic can hold it).
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// Bounds for request and commit latencies, in seconds.
pub const LATENCY_BOUNDS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bounds for batch sizes, in records.
pub const BATCH_BOUNDS_RECORDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

impl Histogram {
    /// An empty histogram with these bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn record(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Buckets (upper bound, count in it, not cumulative; `f64::MAX` stands for +Inf), sum and
    /// count, as read now.
    fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(self.counts.iter())
            .map(|(bound, count)| (*bound, count.load(Ordering::Relaxed)))
            .collect();
        buckets.push((
            f64::MAX,
            self.counts[self.bounds.len()].load(Ordering::Relaxed),
        ));
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, sum, count)
    }

    /// Writes this histogram as the metric `name`.
    pub fn encode(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
    ) -> Result<(), std::fmt::Error> {
        let (buckets, sum, count) = self.snapshot();
        encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Writes one counter; `name` without the `_total` its sample gets.
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

/// Writes one gauge.
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// Renders collectors as the OpenMetrics text format (what `/metrics` answers).
pub fn render(collector: impl Collector) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; a collector's own error would leave a partial body.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(%error, "could not encode the metrics");
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Requests of one route: counts per status code and a latency histogram.
#[derive(Debug)]
pub struct RouteMetrics {
    /// The route as matched (`/v1/checkout`, `/v1/products/{sku}`, ...).
    pub route: &'static str,
    /// Requests per status code 100..=599.
    by_status: Box<[AtomicU64]>,
    /// Time from the request to the answer, in seconds.
    pub latency: Histogram,
}

impl RouteMetrics {
    fn new(route: &'static str) -> Self {
        Self {
            route,
            by_status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }

    /// Records one request.
    pub fn record(&self, status: u16, seconds: f64) {
        if (100..600).contains(&status) {
            self.by_status[usize::from(status - 100)].fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(seconds);
    }
}

/// Every metric of the server.
#[derive(Debug)]
pub struct Metrics {
    routes: Vec<RouteMetrics>,
    /// Checkouts whose stock was reserved.
    pub reservations: AtomicU64,
    /// Checkouts refused for lack of stock.
    pub rejections_out_of_stock: AtomicU64,
    /// Checkouts refused because a SKU or cart was unknown.
    pub rejections_not_found: AtomicU64,
    /// Answers replayed from an idempotency key.
    pub replays: AtomicU64,
    /// Holds released by the sweeper after their deadline.
    pub holds_expired: AtomicU64,
    /// Time of one authorisation at the gateway, in seconds.
    pub gateway_authorize_seconds: Histogram,
    /// Authorisations by outcome: approved, pending, declined, failed (timeout or unreachable).
    pub gateway_outcomes: [AtomicU64; 4],
    /// Captures journaled.
    pub payments_captured: AtomicU64,
    /// Voids done.
    pub payments_voided: AtomicU64,
    /// Refunds journaled.
    pub payments_refunded: AtomicU64,
    /// Captures the gateway refused for paid orders (a person must look).
    pub payments_failed: AtomicU64,
    /// What the reconciler finished: pending payments decided, orphan authorisations voided,
    /// captures or voids owed that no one had asked for.
    pub reconciler_actions: AtomicU64,
    /// Scans for orphan authorisations completed (the gateway listed, each one handled).
    pub reconciler_scans: AtomicU64,
}

/// The outcomes of [`Metrics::gateway_outcomes`], in order.
pub const GATEWAY_OUTCOMES: [&str; 4] = ["approved", "pending", "declined", "failed"];

/// The label for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

impl Metrics {
    /// Metrics for these routes (plus one for unmatched requests).
    pub fn new(routes: &[&'static str]) -> Self {
        let mut all: Vec<RouteMetrics> = routes.iter().map(|r| RouteMetrics::new(r)).collect();
        all.push(RouteMetrics::new(UNMATCHED_ROUTE));
        Self {
            routes: all,
            reservations: AtomicU64::new(0),
            rejections_out_of_stock: AtomicU64::new(0),
            rejections_not_found: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            holds_expired: AtomicU64::new(0),
            gateway_authorize_seconds: Histogram::new(LATENCY_BOUNDS_SECONDS),
            gateway_outcomes: Default::default(),
            payments_captured: AtomicU64::new(0),
            payments_voided: AtomicU64::new(0),
            payments_refunded: AtomicU64::new(0),
            payments_failed: AtomicU64::new(0),
            reconciler_actions: AtomicU64::new(0),
            reconciler_scans: AtomicU64::new(0),
        }
    }

    /// The metrics of a route (the unmatched one if unknown).
    pub fn route(&self, route: &str) -> &RouteMetrics {
        self.routes
            .iter()
            .find(|r| r.route == route)
            .unwrap_or_else(|| &self.routes[self.routes.len() - 1])
    }

    /// Writes the HTTP and engine metrics.
    pub fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        {
            let mut family = encoder.encode_descriptor(
                "turnstile_http_requests",
                "HTTP requests by route and status.",
                None,
                MetricType::Counter,
            )?;
            for route in &self.routes {
                for (status, count) in (100u16..).zip(route.by_status.iter()) {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        let labels = ([("route", route.route)], [("status", status)]);
                        family
                            .encode_family(&labels)?
                            .encode_counter::<NoLabelSet, u64, u64>(&count, None)?;
                    }
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "turnstile_http_request_duration_seconds",
                "Time to answer, by route.",
                None,
                MetricType::Histogram,
            )?;
            for route in &self.routes {
                if route.latency.count() > 0 {
                    let (buckets, sum, count) = route.latency.snapshot();
                    let labels = [("route", route.route)];
                    family
                        .encode_family(&labels)?
                        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
                }
            }
        }
        for (name, help, value) in [
            (
                "turnstile_reservations",
                "Checkouts whose stock was reserved.",
                &self.reservations,
            ),
            (
                "turnstile_rejections_out_of_stock",
                "Checkouts refused for lack of stock.",
                &self.rejections_out_of_stock,
            ),
            (
                "turnstile_rejections_not_found",
                "Checkouts refused for an unknown SKU or cart.",
                &self.rejections_not_found,
            ),
            (
                "turnstile_idempotent_replays",
                "Answers replayed under an idempotency key.",
                &self.replays,
            ),
            (
                "turnstile_holds_expired",
                "Holds released by the sweeper after their deadline.",
                &self.holds_expired,
            ),
            (
                "turnstile_payments_captured",
                "Captures done after their order was journaled.",
                &self.payments_captured,
            ),
            (
                "turnstile_payments_voided",
                "Authorisations voided (orders released or never journaled).",
                &self.payments_voided,
            ),
            (
                "turnstile_payments_refunded",
                "Captured payments refunded (orders cancelled).",
                &self.payments_refunded,
            ),
            (
                "turnstile_payments_capture_refused",
                "Captures the gateway refused for paid orders (a person must look).",
                &self.payments_failed,
            ),
            (
                "turnstile_reconciler_actions",
                "Payments the reconciler finished.",
                &self.reconciler_actions,
            ),
            (
                "turnstile_reconciler_scans",
                "Scans for orphan authorisations completed.",
                &self.reconciler_scans,
            ),
        ] {
            encode_counter(encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "turnstile_gateway_authorizations",
                "Authorisations by outcome.",
                None,
                MetricType::Counter,
            )?;
            for (outcome, count) in GATEWAY_OUTCOMES.iter().zip(&self.gateway_outcomes) {
                family
                    .encode_family(&[("outcome", *outcome)])?
                    .encode_counter::<NoLabelSet, u64, u64>(&count.load(Ordering::Relaxed), None)?;
            }
        }
        self.gateway_authorize_seconds.encode(
            encoder,
            "turnstile_gateway_authorize_seconds",
            "Time of one authorisation at the payment gateway.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct One(Histogram, Metrics);

    impl Collector for One {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            self.0.encode(&mut encoder, "x", "a histogram")?;
            self.1.encode(&mut encoder)
        }
    }

    #[test]
    fn histograms_and_counters_keep_their_sample_names() {
        let histogram = Histogram::new(&[1.0, 2.0]);
        histogram.record(0.5);
        histogram.record(1.5);
        histogram.record(9.0);
        let metrics = Metrics::new(&["/v1/checkout"]);
        metrics.route("/v1/checkout").record(201, 0.002);
        metrics.reservations.fetch_add(3, Ordering::Relaxed);
        let out = render(One(histogram, metrics));
        for line in [
            "x_bucket{le=\"1.0\"} 1\n",
            "x_bucket{le=\"2.0\"} 2\n",
            "x_bucket{le=\"+Inf\"} 3\n",
            "x_count 3\n",
            "x_sum 11.0\n",
            "turnstile_http_requests_total{route=\"/v1/checkout\",status=\"201\"} 1\n",
            "turnstile_http_request_duration_seconds_bucket{le=\"0.0025\",route=\"/v1/checkout\"} 1\n",
            "# TYPE turnstile_reservations counter\n",
            "turnstile_reservations_total 3\n",
            "# EOF\n",
        ] {
            assert!(out.contains(line), "no {line:?} in:\n{out}");
        }
    }
}

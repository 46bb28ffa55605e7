//! Metrics: counters and fixed-bucket histograms made of the project's own atomics (recording never
//! locks or allocates), exposed by `/metrics` through `prometheus-client`'s text encoder.
//!
//! Why `prometheus-client` (the Prometheus project's own Rust client) and not `metrics` with its
//! exporter: its [`Collector`] trait lets a scrape read our atomics directly, so the request path
//! stays one `fetch_add` per counter with no registry lookup, no label map and no allocation, and the
//! atomics are sharded per core (`sync::PerCore`) without touching the exposition. `metrics` routes
//! every increment through a global recorder keyed by name and labels, which is a lookup (or a
//! handle to keep) per call site. The encoder writes the OpenMetrics text format: counters are
//! declared without their `_total` suffix (`# TYPE turnstile_reservations counter`) and their
//! samples keep it (`turnstile_reservations_total 42`), so every sample name is what it was, and
//! the body ends with `# EOF`.

use crate::sync::PerCore;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering};

/// A counter with one copy per core slot: [`Counter::add`] touches the caller's core's copy only.
#[derive(Debug, Default)]
pub struct Counter(PerCore<AtomicU64>);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.local().fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over every core.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One core's copy of a histogram.
#[derive(Debug)]
struct HistogramSlot {
    /// One count per bound (not cumulative), plus one for +Inf.
    counts: Box<[AtomicU64]>,
    /// Sum of recorded values, in millionths of the unit (integer, so an atomic can hold it).
    sum_micro: AtomicU64,
}

/// A histogram with fixed upper bounds, one copy per core slot. Values are recorded in the unit of
/// the bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    slots: PerCore<HistogramSlot>,
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
            slots: PerCore::new_with(|| HistogramSlot {
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_micro: AtomicU64::new(0),
            }),
        }
    }

    /// Records one value.
    pub fn record(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        let slot = self.slots.local();
        slot.counts[bucket].fetch_add(1, Ordering::Relaxed);
        slot.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|slot| slot.counts.iter())
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Buckets (upper bound, count in it, not cumulative; `f64::MAX` stands for +Inf), sum and
    /// count, as read now.
    fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut counts = vec![0u64; self.bounds.len() + 1];
        let mut sum_micro = 0u64;
        for slot in self.slots.iter() {
            for (total, count) in counts.iter_mut().zip(slot.counts.iter()) {
                *total += count.load(Ordering::Relaxed);
            }
            sum_micro = sum_micro.wrapping_add(slot.sum_micro.load(Ordering::Relaxed));
        }
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(counts)
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (buckets, sum_micro as f64 / 1e6, count)
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
    /// Requests per status code 100..=599, one array per core slot.
    by_status: PerCore<Box<[AtomicU64]>>,
    /// Time from the request to the answer, in seconds.
    pub latency: Histogram,
}

impl RouteMetrics {
    fn new(route: &'static str) -> Self {
        Self {
            route,
            by_status: PerCore::new_with(|| (0..500).map(|_| AtomicU64::new(0)).collect()),
            latency: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }

    /// Records one request.
    pub fn record(&self, status: u16, seconds: f64) {
        if (100..600).contains(&status) {
            self.by_status.local()[usize::from(status - 100)].fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(seconds);
    }
}

/// Every metric of the server.
#[derive(Debug)]
pub struct Metrics {
    routes: Vec<RouteMetrics>,
    /// Checkouts whose stock was reserved.
    pub reservations: Counter,
    /// Checkouts refused for lack of stock.
    pub rejections_out_of_stock: Counter,
    /// Checkouts refused because a SKU or cart was unknown.
    pub rejections_not_found: Counter,
    /// Checkouts refused for a product's limit per customer.
    pub rejections_customer_limit: Counter,
    /// Answers replayed from an idempotency key.
    pub replays: Counter,
    /// Holds released by the sweeper after their deadline.
    pub holds_expired: Counter,
    /// Time of one authorisation at the gateway, in seconds.
    pub gateway_authorize_seconds: Histogram,
    /// Authorisations by outcome: approved, pending, declined, failed (timeout or unreachable).
    pub gateway_outcomes: [Counter; 4],
    /// Captures journaled.
    pub payments_captured: Counter,
    /// Voids done.
    pub payments_voided: Counter,
    /// Refunds journaled.
    pub payments_refunded: Counter,
    /// Paid orders whose capture the gateway refused for good, once per order and run (a person
    /// must look; not retried).
    pub payments_capture_refused: Counter,
    /// What the reconciler finished: pending payments decided, orphan authorisations voided,
    /// captures or voids owed that no one had asked for.
    pub reconciler_actions: Counter,
    /// Scans for orphan authorisations completed (the gateway listed, each one handled).
    pub reconciler_scans: Counter,
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
            reservations: Counter::default(),
            rejections_out_of_stock: Counter::default(),
            rejections_not_found: Counter::default(),
            rejections_customer_limit: Counter::default(),
            replays: Counter::default(),
            holds_expired: Counter::default(),
            gateway_authorize_seconds: Histogram::new(LATENCY_BOUNDS_SECONDS),
            gateway_outcomes: Default::default(),
            payments_captured: Counter::default(),
            payments_voided: Counter::default(),
            payments_refunded: Counter::default(),
            payments_capture_refused: Counter::default(),
            reconciler_actions: Counter::default(),
            reconciler_scans: Counter::default(),
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
                let mut by_status = vec![0u64; 500];
                for slot in route.by_status.iter() {
                    for (total, count) in by_status.iter_mut().zip(slot.iter()) {
                        *total += count.load(Ordering::Relaxed);
                    }
                }
                for (status, count) in (100u16..).zip(by_status) {
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
                "turnstile_rejections_customer_limit",
                "Checkouts refused for a product's limit per customer.",
                &self.rejections_customer_limit,
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
                "Paid orders whose capture the gateway refused for good, once per order and run (not retried: a person must look, GET /v1/admin/payments).",
                &self.payments_capture_refused,
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
            encode_counter(encoder, name, help, value.get())?;
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
                    .encode_counter::<NoLabelSet, u64, u64>(&count.get(), None)?;
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

    #[test]
    fn counters_and_histograms_written_from_many_threads_sum_exactly() {
        let counter = Counter::default();
        let histogram = Histogram::new(LATENCY_BOUNDS_SECONDS);
        let route = RouteMetrics::new("/x");
        let (threads, adds) = (8usize, 20_000u64);
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let (counter, histogram, route) = (&counter, &histogram, &route);
                scope.spawn(move || {
                    // Half the threads share slots, as a runtime's extra threads do.
                    if thread % 2 == 0 {
                        crate::sync::set_thread_slot(thread / 2);
                    }
                    for n in 0..adds {
                        counter.add(1);
                        histogram.record(0.001);
                        route.record(if n % 2 == 0 { 201 } else { 409 }, 0.0002);
                    }
                });
            }
        });
        let total = threads as u64 * adds;
        assert_eq!(counter.get(), total);
        assert_eq!(histogram.count(), total);
        let (buckets, sum, count) = histogram.snapshot();
        assert_eq!(count, total);
        assert_eq!(
            buckets.iter().find(|(b, _)| *b == 0.001).map(|(_, n)| *n),
            Some(total)
        );
        assert!((sum - total as f64 * 0.001).abs() < 1e-6 * total as f64);
        assert_eq!(route.latency.count(), total);
        let by_status = |status: usize| -> u64 {
            route
                .by_status
                .iter()
                .map(|slot| slot[status - 100].load(Ordering::Relaxed))
                .sum()
        };
        assert_eq!(by_status(201) + by_status(409), total);
        assert_eq!(by_status(201), total / 2);
    }

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
        metrics.reservations.add(3);
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

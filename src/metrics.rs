//! Prometheus metrics without a registry crate: counters and fixed-bucket histograms made of
//! atomics (recording never locks), rendered as the Prometheus text format by `/metrics`.

use std::fmt::Write;
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

    /// Appends this histogram in the text format, under `name` with extra `labels` (`k="v",...`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

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
}

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
        }
    }

    /// The metrics of a route (the unmatched one if unknown).
    pub fn route(&self, route: &str) -> &RouteMetrics {
        self.routes
            .iter()
            .find(|r| r.route == route)
            .unwrap_or_else(|| &self.routes[self.routes.len() - 1])
    }

    /// Renders the HTTP and engine metrics.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP turnstile_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE turnstile_http_requests_total counter\n");
        for route in &self.routes {
            for (i, count) in route.by_status.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "turnstile_http_requests_total{{route=\"{}\",status=\"{}\"}} {count}",
                        route.route,
                        i + 100
                    );
                }
            }
        }
        out.push_str("# HELP turnstile_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE turnstile_http_request_duration_seconds histogram\n");
        for route in &self.routes {
            if route.latency.count() > 0 {
                route.latency.render(
                    out,
                    "turnstile_http_request_duration_seconds",
                    &format!("route=\"{}\"", route.route),
                );
            }
        }
        let counters = [
            (
                "turnstile_reservations_total",
                "Checkouts whose stock was reserved.",
                &self.reservations,
            ),
            (
                "turnstile_rejections_out_of_stock_total",
                "Checkouts refused for lack of stock.",
                &self.rejections_out_of_stock,
            ),
            (
                "turnstile_rejections_not_found_total",
                "Checkouts refused for an unknown SKU or cart.",
                &self.rejections_not_found,
            ),
            (
                "turnstile_idempotent_replays_total",
                "Answers replayed under an idempotency key.",
                &self.replays,
            ),
            (
                "turnstile_holds_expired_total",
                "Holds released by the sweeper after their deadline.",
                &self.holds_expired,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let histogram = Histogram::new(&[1.0, 2.0]);
        histogram.record(0.5);
        histogram.record(1.5);
        histogram.record(9.0);
        let mut out = String::new();
        histogram.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 11\n"), "{out}");
    }
}

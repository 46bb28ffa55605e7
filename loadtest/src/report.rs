//! The final report: text for a terminal, JSON for machines, Markdown for READMEs, and SVG plots
//! (latency by percentile, throughput over time).

use crate::run::Recording;
use crate::scenario::Verification;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write;

/// Latency figures of one outcome, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct OutcomeStats {
    pub outcome: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl OutcomeStats {
    fn of(outcome: &str, histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Self {
            outcome: outcome.to_owned(),
            count: histogram.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: histogram.max() as f64 / 1000.0,
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub scenario: String,
    pub model: String,
    pub connections: usize,
    pub duration_s: f64,
    pub sent: u64,
    pub errors: u64,
    pub throughput_rps: f64,
    pub all: OutcomeStats,
    pub by_outcome: Vec<OutcomeStats>,
    pub per_second: Vec<u64>,
    /// (percentile, ms) points of the latency curve, for plots.
    pub percentiles: Vec<(f64, f64)>,
    pub verification: Verification,
}

impl Report {
    pub fn new(
        target: &str,
        scenario: &str,
        model: &str,
        connections: usize,
        recording: &Recording,
        verification: Verification,
    ) -> Self {
        let seconds = recording.elapsed.as_secs_f64().max(1e-9);
        let percentiles = [
            0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
        ]
        .iter()
        .map(|&p| {
            (
                p,
                recording.latency_all.value_at_percentile(p) as f64 / 1000.0,
            )
        })
        .collect();
        Self {
            target: target.to_owned(),
            scenario: scenario.to_owned(),
            model: model.to_owned(),
            connections,
            duration_s: seconds,
            sent: recording.sent,
            errors: recording
                .latency_by_outcome
                .get("error")
                .map_or(0, Histogram::len),
            throughput_rps: recording.sent as f64 / seconds,
            all: OutcomeStats::of("all", &recording.latency_all),
            by_outcome: recording
                .latency_by_outcome
                .iter()
                .map(|(outcome, histogram)| OutcomeStats::of(outcome, histogram))
                .collect(),
            per_second: recording.per_second.clone(),
            percentiles,
            verification,
        }
    }

    pub fn passed(&self) -> bool {
        self.verification.violations.is_empty()
    }

    fn rows(&self) -> Vec<&OutcomeStats> {
        std::iter::once(&self.all)
            .chain(self.by_outcome.iter())
            .collect()
    }

    /// Plain text for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} on {} ({}, {} connections): {} requests in {:.2} s = {:.0} req/s, {} errors",
            self.scenario,
            self.target,
            self.model,
            self.connections,
            self.sent,
            self.duration_s,
            self.throughput_rps,
            self.errors
        );
        let _ = writeln!(
            out,
            "{:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "outcome", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for row in self.rows() {
            let _ = writeln!(
                out,
                "{:>8} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                row.outcome, row.count, row.p50_ms, row.p90_ms, row.p99_ms, row.p999_ms, row.max_ms
            );
        }
        for line in &self.verification.checked {
            let _ = writeln!(out, "checked: {line}");
        }
        if self.passed() {
            let _ = writeln!(out, "invariants: all hold");
        } else {
            for violation in &self.verification.violations {
                let _ = writeln!(out, "VIOLATED: {violation}");
            }
        }
        out
    }

    /// Markdown, for READMEs and notes.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "**{}** on **{}** ({}, {} connections): {} requests in {:.2} s, **{:.0} req/s**, {} errors\n",
            self.scenario, self.target, self.model, self.connections, self.sent, self.duration_s, self.throughput_rps, self.errors
        );
        out.push_str("| outcome | count | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for row in self.rows() {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                row.outcome, row.count, row.p50_ms, row.p90_ms, row.p99_ms, row.p999_ms, row.max_ms
            );
        }
        let verdict = if self.passed() {
            "all invariants hold".to_owned()
        } else {
            format!(
                "{} invariant(s) VIOLATED",
                self.verification.violations.len()
            )
        };
        let _ = writeln!(out, "\nInvariants: {verdict}.");
        out
    }

    /// JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// An SVG plot of latency by percentile (log-scaled "nines" on x).
    pub fn latency_svg(&self) -> String {
        let points: Vec<(f64, f64)> = self
            .percentiles
            .iter()
            .filter(|(p, _)| *p < 100.0)
            .map(|&(p, ms)| (-(1.0 - p / 100.0).max(1e-5).log10(), ms))
            .collect();
        let y_max = points.iter().map(|p| p.1).fold(0.001, f64::max) * 1.1;
        let x_max = 4.0;
        let (w, h, left, bottom) = (640.0, 360.0, 60.0, 40.0);
        let x = |v: f64| left + v / x_max * (w - left - 20.0);
        let y = |v: f64| h - bottom - v / y_max * (h - bottom - 20.0);
        let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"16\">{} on {}: latency by percentile (ms)</text>",
            left, self.scenario, self.target
        );
        for (nines, label) in [
            (0.0, "0%"),
            (1.0, "90%"),
            (2.0, "99%"),
            (3.0, "99.9%"),
            (4.0, "99.99%"),
        ] {
            let _ = writeln!(svg, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"20\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\">{label}</text>", x(nines), h - bottom, h - bottom + 16.0);
        }
        for i in 0..=4 {
            let v = y_max * i as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>",
                left - 6.0,
                y(v) + 4.0
            );
        }
        let path: Vec<String> = points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        svg.push_str("</svg>\n");
        svg
    }

    /// An SVG plot of answers per second over the run.
    pub fn throughput_svg(&self) -> String {
        let (w, h, left, bottom) = (640.0, 300.0, 70.0, 30.0);
        let n = self.per_second.len().max(1) as f64;
        let y_max = self.per_second.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
        let x = |i: f64| left + i / n * (w - left - 20.0);
        let y = |v: f64| h - bottom - v / y_max * (h - bottom - 20.0);
        let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
        let _ = writeln!(
            svg,
            "<text x=\"{left}\" y=\"16\">{} on {}: answers per second</text>",
            self.scenario, self.target
        );
        for i in 0..=4 {
            let v = y_max * i as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>",
                left - 6.0,
                y(v) + 4.0
            );
        }
        let path: Vec<String> = self
            .per_second
            .iter()
            .enumerate()
            .map(|(i, &count)| format!("{:.1},{:.1}", x(i as f64 + 0.5), y(count as f64)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"#2471a3\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        svg.push_str("</svg>\n");
        svg
    }
}

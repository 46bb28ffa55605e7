//! Driving load: the open model (requests sent on schedule whether or not earlier ones finished,
//! latency measured from the intended send time, as wrk2 does) and the closed model (N connections
//! each sending as soon as its previous answer arrived). Both are bounded in time and in count.

use crate::client::{Answer, Connection, Job};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Model {
    /// A constant arrival rate (requests per second), whatever the answers do.
    Open { rate: f64 },
    /// An arrival rate going from `from` to `to` over the run: linearly (`steps == 0`) or in
    /// `steps` equal steps. Open model too.
    Ramp { from: f64, to: f64, steps: u32 },
    /// Each connection sends its next request when its previous one was answered.
    Closed,
}

impl Model {
    /// When request `index` is due, in seconds from the start (`None`: closed model).
    fn due(self, index: u64, duration: f64) -> Option<f64> {
        let i = index as f64;
        match self {
            Model::Closed => None,
            Model::Open { rate } => Some(i / rate),
            Model::Ramp { from, to, steps: 0 } => {
                let slope = (to - from) / duration;
                if slope.abs() < 1e-12 {
                    Some(i / from)
                } else {
                    // i = from·t + slope·t²/2, solved for t.
                    Some((-from + (from * from + 2.0 * slope * i).max(0.0).sqrt()) / slope)
                }
            }
            Model::Ramp { from, to, steps } => {
                let step_seconds = duration / f64::from(steps);
                let mut before = 0.0;
                for step in 0..steps {
                    let rate = if steps == 1 {
                        from
                    } else {
                        from + (to - from) * f64::from(step) / f64::from(steps - 1)
                    };
                    let in_step = rate * step_seconds;
                    if i < before + in_step {
                        return Some(f64::from(step) * step_seconds + (i - before) / rate);
                    }
                    before += in_step;
                }
                Some(duration)
            }
        }
    }

    /// How many requests the schedule holds over `duration` seconds.
    fn arrivals(self, duration: f64) -> u64 {
        match self {
            Model::Closed => u64::MAX,
            Model::Open { rate } => (duration * rate) as u64,
            Model::Ramp { from, to, steps: 0 } => (duration * (from + to) / 2.0) as u64,
            Model::Ramp { from, to, steps } => (0..steps)
                .map(|step| {
                    let rate = if steps == 1 {
                        from
                    } else {
                        from + (to - from) * f64::from(step) / f64::from(steps - 1)
                    };
                    rate * duration / f64::from(steps)
                })
                .sum::<f64>() as u64,
        }
    }
}

/// One run's bounds.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub addr: SocketAddr,
    pub model: Model,
    /// Keep-alive connections (the closed model's concurrency; the open model's pool).
    pub connections: usize,
    pub duration: Duration,
    /// The most requests sent, whatever the duration.
    pub requests_max: u64,
    /// Print a progress line every second (only when standard error is a terminal).
    pub progress: bool,
    /// HTTP/2 (h2c, prior knowledge) instead of HTTP/1.1.
    pub http2: bool,
}

/// What one request got: its index, status (0: no answer) and body.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub index: u64,
    pub status: u16,
    pub replayed: bool,
    pub body: hyper::body::Bytes,
}

/// Everything a run measured.
pub struct Recording {
    /// Latency histograms in microseconds, by outcome label (`201`, `409`, `error`, ...).
    pub latency_by_outcome: BTreeMap<String, Histogram<u64>>,
    /// All answers together.
    pub latency_all: Histogram<u64>,
    /// Answers per second of the run.
    pub per_second: Vec<u64>,
    /// Every request's outcome, by index.
    pub outcomes: Vec<Outcome>,
    /// Wall time from the first intended send to the last answer.
    pub elapsed: Duration,
    pub sent: u64,
}

/// A coarse latency histogram of atomics (4 buckets per doubling from 1 µs), for the live
/// progress line: workers record without locking, the reporter reads a p99 so far.
struct LiveLatency {
    buckets: Vec<AtomicU64>,
}

impl LiveLatency {
    const BUCKETS: usize = 4 * 40;

    fn new() -> Self {
        Self {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bucket(micros: u64) -> usize {
        ((micros.max(1) as f64).log2() * 4.0) as usize
    }

    fn record(&self, micros: u64) {
        let bucket = Self::bucket(micros).min(Self::BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound of the bucket holding the 99th percentile, in milliseconds.
    fn p99_ms(&self) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if total > 0 && seen * 100 >= total * 99 {
                return 2f64.powf((bucket + 1) as f64 / 4.0) / 1000.0;
            }
        }
        0.0
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Label of an outcome for the per-outcome histograms.
pub fn label(status: u16) -> String {
    if status == 0 {
        "error".to_owned()
    } else {
        status.to_string()
    }
}

struct Worker {
    latency_by_outcome: BTreeMap<String, Histogram<u64>>,
    latency_all: Histogram<u64>,
    per_second: Vec<u64>,
    outcomes: Vec<Outcome>,
}

/// Runs `job(i)` for i = 0, 1, ... under `config`'s model and bounds.
pub async fn run<F>(config: &RunConfig, request: F) -> Recording
where
    F: Fn(u64) -> Job + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let live = Arc::new(LiveLatency::new());
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + config.duration;
    let hard_stop = deadline + config.duration + Duration::from_secs(10);
    let total = config
        .model
        .arrivals(config.duration.as_secs_f64())
        .min(config.requests_max);
    let progress = config.progress && std::io::stderr().is_terminal();
    let reporter = progress.then(|| {
        let (done, errors, live) = (Arc::clone(&done), Arc::clone(&errors), Arc::clone(&live));
        tokio::spawn(async move {
            let mut last = 0;
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let now = done.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>8} answers  {:>8}/s  errors {:>6}  p99 so far {:>8.2} ms   ",
                    now,
                    now - last,
                    errors.load(Ordering::Relaxed),
                    live.p99_ms()
                );
                last = now;
            }
        })
    });
    let workers: Vec<_> = (0..config.connections)
        .map(|_| {
            let (request, next, done, errors, live) = (
                Arc::clone(&request),
                Arc::clone(&next),
                Arc::clone(&done),
                Arc::clone(&errors),
                Arc::clone(&live),
            );
            let (addr, model) = (config.addr, config.model);
            let seconds = config.duration.as_secs_f64();
            let http2 = config.http2;
            let (start, deadline, hard_stop) = (start, deadline, hard_stop);
            tokio::spawn(async move {
                let mut connection = if http2 {
                    Connection::http2(addr)
                } else {
                    Connection::new(addr)
                };
                let mut worker = Worker {
                    latency_by_outcome: BTreeMap::new(),
                    latency_all: histogram(),
                    per_second: Vec::new(),
                    outcomes: Vec::new(),
                };
                tokio::time::sleep_until(start.into()).await;
                loop {
                    // However slow the target, the run ends: the open model stops claiming new
                    // requests once it is far behind its schedule.
                    if Instant::now() >= hard_stop {
                        break;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total {
                        break;
                    }
                    let intended = match model.due(index, seconds) {
                        Some(due) => {
                            let at = start + Duration::from_secs_f64(due);
                            tokio::time::sleep_until(at.into()).await;
                            at
                        }
                        None => {
                            let now = Instant::now();
                            if now >= deadline {
                                break;
                            }
                            now
                        }
                    };
                    let outcome = connection.run(&request(index)).await;
                    let finished = Instant::now();
                    let micros = finished.saturating_duration_since(intended).as_micros() as u64;
                    let (status, replayed, body) = match outcome {
                        Ok(Answer {
                            status,
                            replayed,
                            body,
                            ..
                        }) => (status, replayed, body),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            (0, false, hyper::body::Bytes::new())
                        }
                    };
                    let micros = micros.max(1);
                    live.record(micros);
                    let _ = worker.latency_all.record(micros);
                    let _ = worker
                        .latency_by_outcome
                        .entry(label(status))
                        .or_insert_with(histogram)
                        .record(micros);
                    let second = finished.saturating_duration_since(start).as_secs() as usize;
                    if worker.per_second.len() <= second {
                        worker.per_second.resize(second + 1, 0);
                    }
                    worker.per_second[second] += 1;
                    worker.outcomes.push(Outcome {
                        index,
                        status,
                        replayed,
                        body,
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                }
                worker
            })
        })
        .collect();
    let mut recording = Recording {
        latency_by_outcome: BTreeMap::new(),
        latency_all: histogram(),
        per_second: Vec::new(),
        outcomes: Vec::new(),
        elapsed: Duration::ZERO,
        sent: 0,
    };
    for worker in workers {
        let Ok(worker) = worker.await else { continue };
        let _ = recording.latency_all.add(&worker.latency_all);
        for (label, histogram_of) in worker.latency_by_outcome {
            let _ = recording
                .latency_by_outcome
                .entry(label)
                .or_insert_with(histogram)
                .add(&histogram_of);
        }
        if recording.per_second.len() < worker.per_second.len() {
            recording.per_second.resize(worker.per_second.len(), 0);
        }
        for (second, count) in worker.per_second.iter().enumerate() {
            recording.per_second[second] += count;
        }
        recording.outcomes.extend(worker.outcomes);
    }
    if let Some(reporter) = reporter {
        reporter.abort();
        eprintln!();
    }
    recording.outcomes.sort_by_key(|o| o.index);
    recording.sent = recording.outcomes.len() as u64;
    recording.elapsed = Instant::now().saturating_duration_since(start);
    recording
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_p99_is_the_bucket_of_the_99th_percentile() {
        let live = LiveLatency::new();
        for _ in 0..99 {
            live.record(1_000);
        }
        live.record(1_000_000);
        let p99 = live.p99_ms();
        assert!((1.0..1.2).contains(&p99), "{p99}");
        live.record(1_000_000);
        assert!(live.p99_ms() > 900.0);
    }

    #[test]
    fn schedules_hold_their_arrivals_in_order() {
        for model in [
            Model::Open { rate: 100.0 },
            Model::Ramp {
                from: 100.0,
                to: 300.0,
                steps: 0,
            },
            Model::Ramp {
                from: 100.0,
                to: 300.0,
                steps: 3,
            },
        ] {
            let total = model.arrivals(10.0);
            let mut last = -1.0;
            for i in 0..total {
                let due = model.due(i, 10.0).expect("open");
                assert!(due >= last && due <= 10.0 + 1e-6, "{model:?} {i}: {due}");
                last = due;
            }
        }
        assert_eq!(
            Model::Ramp {
                from: 100.0,
                to: 300.0,
                steps: 0
            }
            .arrivals(10.0),
            2_000
        );
        assert_eq!(
            Model::Ramp {
                from: 100.0,
                to: 300.0,
                steps: 3
            }
            .arrivals(9.0),
            1_800
        );
        // 100/s rising by 20/s each second: 1,000 arrivals after (-100 + sqrt(50,000)) / 20 s.
        let half = Model::Ramp {
            from: 100.0,
            to: 300.0,
            steps: 0,
        }
        .due(1_000, 10.0)
        .expect("open");
        assert!((half - 6.1803).abs() < 0.001, "{half}");
    }
}

//! Driving load: the open model (requests sent on schedule whether or not earlier ones finished,
//! latency measured from the intended send time, as wrk2 does) and the closed model (N connections
//! each sending as soon as its previous answer arrived). Both are bounded in time and in count.

use crate::client::{Answer, Connection, Endpoint, Job};
use hdrhistogram::sync::{Recorder, SyncHistogram};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::io::IsTerminal;
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
    /// Where every connection goes, and how (HTTP/1.1 or HTTP/2, TCP or TLS).
    pub endpoint: Endpoint,
    pub model: Model,
    /// Keep-alive connections (the closed model's concurrency; the open model's pool).
    pub connections: usize,
    pub duration: Duration,
    /// The most requests sent, whatever the duration.
    pub requests_max: u64,
    /// Print a progress line every second (only when standard error is a terminal).
    pub progress: bool,
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

/// The live latency of the progress line: each worker records into its own hdrhistogram
/// [`Recorder`] (a plain histogram plus one atomic load per value, no lock: 6.4 ns a value against
/// 5.0 for a bare histogram and 7.3 for the shared atomic buckets this replaced, measured on the
/// project's VM); four times a second the reporter asks the recorders to hand over what they
/// recorded since and merges it without waiting for them (a worker busy with a slow request hands its share
/// over with its next answer).
struct LiveLatency {
    merged: SyncHistogram<u64>,
}

impl LiveLatency {
    fn new() -> Self {
        // Two significant digits are plenty for a progress line, and make each hand-over (a fresh
        // histogram per worker and refresh) 24 KiB instead of the report histograms' 168 KiB.
        let live = Histogram::new_with_bounds(1, 600_000_000, 2)
            .unwrap_or_else(|_| unreachable!("valid bounds"));
        Self {
            merged: live.into_sync(),
        }
    }

    fn recorder(&self) -> Recorder<u64> {
        self.merged.recorder()
    }

    /// Collects what the recorders handed over so far; never blocks.
    fn refresh(&mut self) {
        self.merged.refresh_timeout(Duration::ZERO);
    }

    /// The 99th percentile of what was collected, in milliseconds.
    fn p99_ms(&self) -> f64 {
        self.merged.value_at_quantile(0.99) as f64 / 1000.0
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
    let mut live = LiveLatency::new();
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + config.duration;
    let hard_stop = deadline + config.duration + Duration::from_secs(10);
    let total = config
        .model
        .arrivals(config.duration.as_secs_f64())
        .min(config.requests_max);
    let progress = config.progress && std::io::stderr().is_terminal();
    // Workers hold recorders only while the progress line needs them.
    let recorders: Vec<Option<Recorder<u64>>> = (0..config.connections)
        .map(|_| progress.then(|| live.recorder()))
        .collect();
    let reporter = progress.then(|| {
        let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
        tokio::spawn(async move {
            let mut last = 0;
            // Recorders hand over on their first value after a refresh asked for it, so the
            // reporter asks four times a second and prints once: the line lags by ~1/4 s.
            let mut ticker = tokio::time::interval(Duration::from_millis(250));
            ticker.tick().await;
            for tick in 1u64.. {
                ticker.tick().await;
                live.refresh();
                if tick % 4 != 0 {
                    continue;
                }
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
    let workers: Vec<_> = recorders
        .into_iter()
        .map(|mut live| {
            let (request, next, done, errors) = (
                Arc::clone(&request),
                Arc::clone(&next),
                Arc::clone(&done),
                Arc::clone(&errors),
            );
            let model = config.model;
            let seconds = config.duration.as_secs_f64();
            let endpoint = config.endpoint.clone();
            let (start, deadline, hard_stop) = (start, deadline, hard_stop);
            tokio::spawn(async move {
                let mut connection = Connection::to(endpoint);
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
                    if let Some(live) = live.as_mut() {
                        live.saturating_record(micros);
                    }
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
    fn the_live_p99_merges_what_the_recorders_handed_over() {
        let mut live = LiveLatency::new();
        let mut first = live.recorder();
        let mut second = live.recorder();
        for _ in 0..99 {
            first.saturating_record(1_000);
        }
        second.saturating_record(1_000_000);
        // Recorders hand their values over on their first record after a refresh asked for them.
        live.refresh();
        assert_eq!(live.p99_ms(), 0.0, "nothing was handed over yet");
        first.saturating_record(1_000);
        second.saturating_record(1_000);
        live.refresh();
        let p99 = live.p99_ms();
        assert!((0.99..1.01).contains(&p99), "{p99}");
        // A recorder that is dropped (a worker that finished) hands over the rest.
        drop(second);
        drop(first);
        live.refresh();
        assert_eq!(live.merged.len(), 102);
        let mut third = live.recorder();
        for _ in 0..2 {
            third.saturating_record(1_000_000);
        }
        drop(third);
        live.refresh();
        assert!(live.p99_ms() > 900.0, "{}", live.p99_ms());
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

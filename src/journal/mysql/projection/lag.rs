//! How far the projections are behind their source: shared by the applier (which moves it), the
//! source's writer (which hands batches), `/readyz`, `/metrics` and write-behind's backpressure.

use crate::metrics::{encode_counter, encode_gauge, Histogram, LATENCY_BOUNDS_SECONDS};
use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How far the projections are behind their source, shared by the applier (which moves it), the
/// source's writer (which hands batches), `/readyz`, `/metrics` and write-behind's backpressure.
#[derive(Debug)]
pub struct Lag {
    /// The last lsn the source has made durable.
    pub(super) committed_lsn: AtomicU64,
    /// The last lsn applied (the durable cursor as last read or written).
    pub(super) applied_lsn: Arc<AtomicU64>,
    /// The last event seq applied: events up to it are readable from `outbox`.
    pub(super) applied_seq: AtomicU64,
    /// When each handed batch became durable (its last lsn), oldest first; applied ones leave.
    pub(super) handed: Mutex<VecDeque<(u64, Instant)>>,
    /// When the oldest batch not yet applied was handed, in nanoseconds after `epoch` plus one
    /// (0: none): read on every write-behind append without a lock.
    pub(super) oldest: AtomicU64,
    pub(super) epoch: Instant,
    /// The error the applier is retrying, if any.
    pub(super) problem: Mutex<Option<String>>,
    /// Set while the applier is stopped at a record the database refuses (its lsn).
    pub(super) stopped_at: AtomicU64,
    /// Woken at each applied run.
    pub(super) applied: Notify,
    pub(super) batches: AtomicU64,
    pub(super) records: AtomicU64,
    pub(super) retries: [AtomicU64; 3],
    /// The lag of each run when it was applied (age of its oldest record), in seconds.
    pub(super) lag_at_apply: Histogram,
}

impl Lag {
    /// `applied_lsn` is shared with whoever must keep what is not applied yet (write-behind's
    /// embedded journal keeps every segment holding a record after it).
    pub(crate) fn new(committed_lsn: u64, applied_lsn: Arc<AtomicU64>) -> Self {
        Self {
            committed_lsn: AtomicU64::new(committed_lsn),
            applied_lsn,
            applied_seq: AtomicU64::new(0),
            handed: Mutex::new(VecDeque::new()),
            oldest: AtomicU64::new(0),
            epoch: Instant::now(),
            problem: Mutex::new(None),
            stopped_at: AtomicU64::new(0),
            applied: Notify::new(),
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            retries: Default::default(),
            lag_at_apply: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }

    /// The last event seq the projections hold.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// The last lsn the projections hold.
    pub fn applied_lsn(&self) -> u64 {
        self.applied_lsn.load(Ordering::Acquire)
    }

    /// Records durable at the source and not yet applied.
    pub fn records(&self) -> u64 {
        self.committed_lsn
            .load(Ordering::Acquire)
            .saturating_sub(self.applied_lsn())
    }

    /// Age of the oldest durable record not yet applied (0 when none).
    pub fn seconds(&self) -> f64 {
        match self.oldest.load(Ordering::Acquire) {
            0 => 0.0,
            since => {
                let now = self.epoch.elapsed().as_nanos() as u64 + 1;
                now.saturating_sub(since) as f64 / 1e9
            }
        }
    }

    /// Nanoseconds after `epoch`, plus one, of `at`.
    pub(super) fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// A batch ending at `last_lsn` became durable at the source now.
    pub(crate) fn hand(&self, last_lsn: u64) {
        let now = Instant::now();
        let mut handed = lock(&self.handed);
        if handed.is_empty() {
            self.oldest.store(self.stamp(now), Ordering::Release);
        }
        handed.push_back((last_lsn, now));
        self.committed_lsn.fetch_max(last_lsn, Ordering::AcqRel);
    }

    pub(super) fn set_applied(&self, lsn: u64, seq: u64) {
        self.applied_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.applied_seq.fetch_max(seq, Ordering::AcqRel);
        let mut handed = lock(&self.handed);
        while handed.front().is_some_and(|(last, _)| *last <= lsn) {
            handed.pop_front();
        }
        let oldest = handed.front().map_or(0, |(_, at)| self.stamp(*at));
        self.oldest.store(oldest, Ordering::Release);
        drop(handed);
        self.applied.notify_waiters();
    }

    pub(super) fn set_problem(&self, problem: Option<String>) {
        *lock(&self.problem) = problem;
    }

    /// `Ok` while the applier runs and is no more than `max` behind; why not otherwise.
    pub fn check(&self, max: Duration) -> Result<(), String> {
        let stopped = self.stopped_at.load(Ordering::Acquire);
        let problem = lock(&self.problem).clone();
        if stopped > 0 {
            return Err(format!(
                "the MySQL applier is stopped at lsn {stopped}: {} (resolve it, or run `turnstile mysql-apply --skip {stopped}`)",
                problem.unwrap_or_default()
            ));
        }
        let seconds = self.seconds();
        if seconds > max.as_secs_f64() {
            return Err(format!(
                "MySQL is {seconds:.1}s ({} records) behind, past --mysql-lag-max {}{}",
                self.records(),
                humantime::format_duration(max),
                problem.map(|p| format!(": {p}")).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Waits until the lag is at most `max` (write-behind's backpressure).
    pub(crate) async fn wait_within(&self, max: Duration) {
        loop {
            let applied = self.applied.notified();
            if self.seconds() <= max.as_secs_f64() {
                return;
            }
            // The lag also shrinks by time alone never, so an applied run is what to wait for;
            // the timeout only bounds a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(100), applied).await;
        }
    }

    /// What the applier stands at, for the operations desk.
    pub fn position(&self, log: &str, writer_turn: u64) -> crate::journal::MySqlPosition {
        crate::journal::MySqlPosition {
            log: log.to_owned(),
            writer_turn,
            applied_lsn: self.applied_lsn(),
            applied_event_seq: Some(self.applied_seq()),
            lag_records: self.records(),
            lag_seconds: self.seconds(),
            problem: lock(&self.problem).clone(),
        }
    }

    /// The last lsn durable at the source.
    pub fn committed_lsn(&self) -> u64 {
        self.committed_lsn.load(Ordering::Acquire)
    }

    /// Waits until the projections hold record `lsn`, up to `timeout`; true if so.
    pub async fn wait_applied(&self, lsn: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let applied = self.applied.notified();
            if self.applied_lsn() >= lsn {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return self.applied_lsn() >= lsn;
            }
        }
    }

    /// Waits until everything durable at the source is applied, up to `timeout`; true if so.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let applied = self.applied.notified();
            if self.records() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return self.records() == 0;
            }
        }
    }

    /// Writes the applier's metrics.
    pub fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encode_gauge(
            encoder,
            "turnstile_mysql_applied_lsn",
            "The last journal record the MySQL projections hold.",
            self.applied_lsn(),
        )?;
        encode_gauge(
            encoder,
            "turnstile_mysql_lag_records",
            "Durable records MySQL's projections do not hold yet.",
            self.records(),
        )?;
        encoder
            .encode_descriptor(
                "turnstile_mysql_lag_seconds",
                "Age of the oldest durable record MySQL's projections do not hold yet.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?
            .encode_gauge(&self.seconds())?;
        encode_gauge(
            encoder,
            "turnstile_mysql_apply_stopped",
            "1 while the applier is stopped at a record the database refuses.",
            u64::from(self.stopped_at.load(Ordering::Acquire) > 0),
        )?;
        encode_counter(
            encoder,
            "turnstile_mysql_apply_batches",
            "Runs of records applied to MySQL, one transaction each.",
            self.batches.load(Ordering::Relaxed),
        )?;
        encode_counter(
            encoder,
            "turnstile_mysql_apply_records",
            "Records applied to MySQL.",
            self.records.load(Ordering::Relaxed),
        )?;
        crate::journal::encode_retries(
            encoder,
            "turnstile_mysql_apply_retries",
            "Applier transactions retried after a passing database fault, by reason.",
            &self.retries,
        )?;
        self.lag_at_apply.encode(
            encoder,
            "turnstile_mysql_lag_at_apply_seconds",
            "How old the oldest record of each applied run was when it was applied.",
        )
    }
}

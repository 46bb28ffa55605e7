//! The sweeps: holds past their deadline released (each release a change committed like any
//! other, so a released order's void follows its durable release), and, beside them, what is past
//! its retention dropped: the store's expired idempotency keys first, then memory's carts, kept
//! answers and finished orders.

use super::Shared;
use crate::engine::Applied;
use crate::time::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// The most holds one sweep releases, so one sweep never stalls the runtime.
const SWEEP_HOLDS_MAX: usize = 10_000;

/// Releases expired holds (voiding their payments), expired carts and answers past retention.
pub async fn sweep(app: Shared, hold_ttl: Duration) {
    let interval = (hold_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_slow_sweep = now_ms();
    // Retention (and cart expiry) is enforced to within a quarter of the shortest one, at most
    // once a second and at least once a minute.
    let config = app.engine.config();
    let shortest_ms = config
        .answer_retention_ms
        .min(config.order_retention_ms)
        .min(app.carts.idle_ms());
    let slow_sweep_ms = (shortest_ms / 4).clamp(1_000, 60_000);
    let mut slow_sweep: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        ticker.tick().await;
        let now = now_ms();
        // Each release commits on its own task; a slow journal delays none of the others.
        let released = app.engine.expire_holds(now, SWEEP_HOLDS_MAX);
        // A released order with an authorisation owes its void; the settler makes it after the
        // commit ([`super::money`]).
        let commits = released.into_iter().map(|change| {
            super::commit(&app, change, |app, outcome| {
                if let Ok(Applied::Order { .. }) = outcome {
                    app.metrics.holds_expired.add(1);
                }
            })
        });
        for result in futures_util::future::join_all(commits).await {
            if let Err(error) = result {
                tracing::warn!(%error, "could not journal an expired hold; the next sweep retries");
            }
        }
        // The slow sweep runs beside the holds' (one at a time): a store slow to purge (MySQL
        // stalled) never delays a hold's release.
        let idle = slow_sweep.as_ref().is_none_or(|task| task.is_finished());
        if now - last_slow_sweep >= slow_sweep_ms && idle {
            last_slow_sweep = now;
            slow_sweep = Some(tokio::spawn(sweep_retention(Arc::clone(&app), now)));
        }
    }
}

/// Drops what is past its retention: the store's expired keys first, then the carts, kept
/// answers and finished orders memory holds.
async fn sweep_retention(app: Shared, now: i64) {
    // The store forgets expired keys before memory does: a key memory still knows is reused as
    // "past retention" (the store drops its old rows then), and one it forgot has no rows left in
    // the store.
    let cutoff = now - app.engine.config().answer_retention_ms;
    let purged = app.journal.purge_answers(cutoff).await;
    if let Err(error) = &purged {
        tracing::warn!(%error, "could not purge expired idempotency keys; retrying later");
    }
    // Scanning every cart and kept answer takes milliseconds with millions of them: off the
    // runtime's workers, so no request waits behind it.
    let swept = tokio::task::spawn_blocking(move || {
        let carts = app.carts.sweep(now);
        let answers = if purged.is_ok() {
            app.engine.idempotency().purge_expired(now)
        } else {
            0
        };
        let orders = app.engine.purge_orders(now, usize::MAX);
        (carts, answers, orders)
    })
    .await;
    if let Ok((carts, answers, orders)) = swept {
        tracing::debug!(
            carts,
            answers,
            orders,
            "expired carts, answers and orders dropped"
        );
    }
}

//! Live stock (`GET /v1/products/{sku}/stream`, API.md "Live stock"): Server-Sent Events of a
//! product's counters.
//!
//! One feed per SKU that has readers: a `watch` channel holding the SKU's last counters. One task
//! ([`feed`]) reads the counters of every watched SKU each [`POLL`] — the same reading `GET
//! /v1/products/{sku}` gives, from the applied state, never from a request — and publishes a
//! reading that differs from the last. So the checkout path pays nothing for streams (no
//! notification, no lock, no allocation: the feed looks at the counters, the checkouts never
//! look at the feed), a sold-out flood changes nothing and wakes no stream, and the cost of the
//! streams is one reading per watched SKU per [`POLL`] plus the events themselves.
//!
//! Each stream sends the counters at once (`stock`), then each change, at most one event per
//! [`EVENT_GAP`] (10 a second): the channel keeps only the last reading, so changes in between are
//! merged and the last state is always the one sent. When `available` reaches 0 a `sold_out`
//! event follows (again if units come back and sell out again). A reader that does not read holds
//! nothing here (the channel has no queue); the connection's own rule closes a connection whose
//! answer bytes stop leaving for the slow-client timeout (`connections`). A comment line every
//! [`HEARTBEAT`] keeps an idle stream's connection alive through proxies.
//!
//! Open streams are bounded by `--streams-max` (a permit each, `503 overloaded` past it) and not
//! by `--connections-max`: an HTTP/1 connection gives its place back when it starts a stream (it
//! carries nothing else until the stream ends, and ends with it); an HTTP/2 connection keeps its
//! place, one for up to 100 streams (its streams can be reset while it lives on). A connection
//! carrying a stream is never idle ([`crate::connections::ConnectionSlot::stream_started`]), while
//! the rule that cuts an answer whose bytes stop leaving still drops a reader that stopped
//! reading. When the server stops accepting, every stream ends (its body finishes, so the drain
//! is not held), and the shutdown waits for the streams' permits.

use crate::domain::Sku;
use crate::sync::lock;
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How often the feed reads the counters of watched SKUs.
pub const POLL: Duration = Duration::from_millis(50);
/// The least time between two events of one stream (API.md: at most 10 a second).
pub const EVENT_GAP: Duration = Duration::from_millis(100);
/// A comment line after this long without an event.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// A product's counters, as an event carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Units the shop owns.
    pub stock: i64,
    /// Units for sale.
    pub available: i64,
    /// Units held.
    pub reserved: i64,
    /// Units sold.
    pub sold: i64,
}

/// Why a stream was not opened.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// `--streams-max` streams are open.
    #[error("{0} live stock streams are open (--streams-max); retry later")]
    Full(usize),
    /// The server is stopping.
    #[error("the server is stopping")]
    Stopping,
}

/// The live stock feeds of one process.
pub struct StockStreams {
    feeds: Mutex<FxHashMap<Sku, watch::Sender<Option<Counters>>>>,
    open: Arc<Semaphore>,
    max: usize,
    closing: watch::Sender<bool>,
}

/// One open stream: its feed, its permit, and the server's closing signal.
pub struct Subscription {
    sku: Sku,
    feed: watch::Receiver<Option<Counters>>,
    closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl StockStreams {
    /// At most `max` streams open at once.
    pub fn new(max: usize) -> Self {
        Self {
            feeds: Mutex::default(),
            open: Arc::new(Semaphore::new(max)),
            max,
            closing: watch::channel(false).0,
        }
    }

    /// Opens a stream of `sku`, whose counters are `now`.
    pub fn subscribe(&self, sku: &Sku, now: Counters) -> Result<Subscription, StreamError> {
        if *self.closing.borrow() {
            return Err(StreamError::Stopping);
        }
        let permit = Arc::clone(&self.open)
            .try_acquire_owned()
            .map_err(|_| StreamError::Full(self.max))?;
        let feed = {
            let mut feeds = lock(&self.feeds);
            let sender = feeds
                .entry(sku.clone())
                .or_insert_with(|| watch::channel(Some(now)).0);
            sender.subscribe()
        };
        Ok(Subscription {
            sku: sku.clone(),
            feed,
            closing: self.closing.subscribe(),
            _permit: permit,
        })
    }

    /// How many streams are open.
    pub fn open(&self) -> usize {
        self.max - self.open.available_permits()
    }

    /// Ends every stream (the server stops accepting): their bodies finish.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Waits until every stream has ended, for at most `limit`; true if they all did.
    pub async fn wait_closed(&self, limit: Duration) -> bool {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        tokio::time::timeout(limit, self.open.acquire_many(all))
            .await
            .is_ok()
    }

    /// One round of the feed: publishes each watched SKU's counters (`read`), drops the feeds
    /// nobody reads any more.
    pub fn publish(&self, read: impl Fn(&Sku) -> Option<Counters>) {
        let watched: Vec<(Sku, watch::Sender<Option<Counters>>)> = {
            let mut feeds = lock(&self.feeds);
            feeds.retain(|_, sender| sender.receiver_count() > 0);
            feeds
                .iter()
                .map(|(sku, sender)| (sku.clone(), sender.clone()))
                .collect()
        };
        for (sku, sender) in watched {
            let now = read(&sku);
            sender.send_if_modified(|last| {
                let changed = now.is_some() && *last != now;
                if changed {
                    *last = now;
                }
                changed
            });
        }
    }
}

/// Reads the counters of every watched SKU each [`POLL`] and publishes those that changed, until
/// the streams close.
pub async fn feed(app: super::Shared) {
    let mut closing = app.streams.closing.subscribe();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closing.wait_for(|closing| *closing) => return,
        }
        app.streams.publish(|sku| counters(&app, sku));
    }
}

/// A product's counters as `GET /v1/products/{sku}` shows them (with several nodes, the shop's).
/// One node: read from the stock counters alone (no lock, no copy of the product).
pub fn counters(app: &super::AppState, sku: &Sku) -> Option<Counters> {
    let view = match &app.cluster {
        Some(cluster) => crate::cluster::catalogue::shop_view(cluster, &app.engine, sku)?.1,
        None => {
            let inventory = app.engine.inventory();
            inventory.view(inventory.lookup(sku)?)
        }
    };
    Some(Counters {
        stock: view.stock,
        available: view.available,
        reserved: view.reserved,
        sold: view.sold,
    })
}

/// One event's bytes: `event: <name>`, the counters as JSON `data`.
fn event(name: &str, sku: &Sku, counters: Counters) -> String {
    let data = serde_json::json!({
        "sku": sku.as_str(),
        "stock": counters.stock,
        "available": counters.available,
        "reserved": counters.reserved,
        "sold": counters.sold,
    });
    format!("event: {name}\ndata: {data}\n\n")
}

/// Where a stream stands.
struct Cursor<G> {
    subscription: Subscription,
    /// When the last event went out (`None`: none yet, the first goes at once).
    last_sent: Option<tokio::time::Instant>,
    /// The stock at the last `sold_out` sent, while the units stay out (`None`: none sent since
    /// units were last seen). A restock bought up between two readings shows no unit at all, only
    /// a new stock: that is a new sell-out, told again (found by attack).
    sold_out_at_stock: Option<i64>,
    /// Held while the stream runs (the connection's part: `connections::StreamOnConnection`).
    _held: G,
}

impl<G> Cursor<G> {
    /// The events for the reading now: `stock`, and `sold_out` when the units ran out.
    fn events(&mut self) -> Option<Bytes> {
        let now = *self.subscription.feed.borrow_and_update();
        let counters = now?;
        let sku = &self.subscription.sku;
        let mut text = event("stock", sku, counters);
        if counters.available > 0 {
            self.sold_out_at_stock = None;
        } else if self.sold_out_at_stock != Some(counters.stock) {
            text.push_str(&event("sold_out", sku, counters));
            self.sold_out_at_stock = Some(counters.stock);
        }
        self.last_sent = Some(tokio::time::Instant::now());
        Some(Bytes::from(text))
    }
}

/// Resolves once the server closes the streams (the guard `wait_for` gives is not kept across an
/// await, so the stream stays `Send`).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await.map(|_| ());
}

/// The body of a stream: its events as they come, ending when the server stops. `held` lives as
/// long as the stream.
pub fn body<G: Send + 'static>(
    subscription: Subscription,
    held: G,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let cursor = Cursor {
        subscription,
        last_sent: None,
        sold_out_at_stock: None,
        _held: held,
    };
    futures_util::stream::unfold(cursor, |mut cursor| async move {
        if cursor.last_sent.is_none() {
            let first = cursor.events().unwrap_or_default();
            return Some((Ok(first), cursor));
        }
        let heartbeat = tokio::time::sleep(HEARTBEAT);
        tokio::select! {
            changed = cursor.subscription.feed.changed() => {
                if changed.is_err() {
                    return None;
                }
                // At most one event per gap: what changes meanwhile is merged into the next.
                if let Some(sent) = cursor.last_sent {
                    tokio::select! {
                        () = tokio::time::sleep_until(sent + EVENT_GAP) => {}
                        () = closed(&mut cursor.subscription.closing) => return None,
                    }
                }
                let events = cursor.events().unwrap_or_default();
                Some((Ok(events), cursor))
            }
            () = heartbeat => {
                Some((Ok(Bytes::from_static(b": keep-alive\n\n")), cursor))
            }
            () = closed(&mut cursor.subscription.closing) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku() -> Sku {
        Sku::parse("S").expect("sku")
    }

    fn counters(available: i64) -> Counters {
        Counters {
            stock: 10,
            available,
            reserved: 0,
            sold: 10 - available,
        }
    }

    #[tokio::test]
    async fn a_stream_sends_at_once_then_merged_changes_then_sold_out_and_ends_on_close() {
        use futures_util::StreamExt;
        let streams = StockStreams::new(2);
        let subscription = streams.subscribe(&sku(), counters(3)).expect("open");
        let mut body = std::pin::pin!(body(subscription, ()));
        let first = body.next().await.expect("first").expect("bytes");
        assert!(String::from_utf8_lossy(&first).starts_with("event: stock\n"));
        // Three changes within one gap: one event, with the last reading, then sold_out.
        for available in [2, 1, 0] {
            streams.publish(|_| Some(counters(available)));
        }
        let next = body.next().await.expect("next").expect("bytes");
        let text = String::from_utf8_lossy(&next);
        assert!(text.contains("\"available\":0"), "{text}");
        assert!(text.contains("event: sold_out"), "{text}");
        assert_eq!(text.matches("event: stock").count(), 1, "{text}");
        // Full: a third stream is refused.
        let _second = streams.subscribe(&sku(), counters(0)).expect("open");
        assert!(matches!(
            streams.subscribe(&sku(), counters(0)),
            Err(StreamError::Full(2))
        ));
        streams.close();
        assert!(body.next().await.is_none(), "the stream ends on close");
    }
}

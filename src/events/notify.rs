//! `turnstile notify`: a real consumer of `order.paid`, to copy. It writes the "confirmation
//! e-mail" it would send as one JSON line per paid order (API.md) to a file or stdout.
//!
//! **Exactly one line per order out of at-least-once delivery.** Messages come with manual acks
//! and a prefetch limit. A message is acked only after its line and its dedup entry are on disk,
//! in this order, for each batch of the messages already delivered (up to the prefetch):
//! 1. the lines are appended to `--out` and `fsync`ed;
//! 2. `<message_id> <length of --out after its line>` per line is appended to `--state` and
//!    `fsync`ed;
//! 3. the messages are acked.
//!
//! A message whose `message_id` is in the state is acked and dropped (a duplicate: the relay
//! republishes after a reconnect). At start the state is read back, and `--out` is cut to the
//! length the state last recorded: a line written by a run killed between steps 1 and 2 goes (its
//! message was not acked, so it comes again and is written again), so every order keeps exactly
//! one line. With stdout as the output nothing can be cut: a kill between steps 1 and 2 may repeat
//! one line.
//!
//! **Poison messages.** The queue is a quorum queue with `x-delivery-limit` and the dead-letter
//! exchange `<exchange>.dlx` (queue `<exchange>.dead`): a message that cannot be turned into a line
//! is nacked back, and RabbitMQ itself dead-letters it after `--max-attempts` deliveries.

use super::relay::{dead_letter_exchange, declare_topology};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Settings of `turnstile notify`.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `amqp://user:pass@host:5672/%2f`.
    pub url: String,
    /// The exchange the relay publishes to.
    pub exchange: String,
    /// The queue consumed (declared durable, bound to `order.paid`).
    pub queue: String,
    /// Where lines go (`None`: stdout).
    pub out: Option<PathBuf>,
    /// The durable dedup state.
    pub state: PathBuf,
    /// Deliveries of one message before it goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Unacked messages at most.
    pub prefetch: u16,
}

/// Why `notify` stopped.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The state or output file cannot be read or written: nothing more is acked.
    #[error("{0}")]
    Files(String),
    /// The queue exists with other arguments (another `--max-attempts`, or not a quorum queue):
    /// retrying cannot help.
    #[error("the queue {queue} exists with other settings ({reason}): consume it with the settings it was declared with, or delete it (its messages with it) to declare it anew")]
    Queue {
        /// The queue.
        queue: String,
        /// The broker's words.
        reason: String,
    },
}

/// One line of the output (API.md), in this order.
#[derive(Debug, serde::Serialize)]
struct Line<'a> {
    order_id: &'a str,
    customer_id: &'a str,
    total_cents: i64,
    currency: &'a str,
    items: &'a serde_json::Value,
    paid_at: &'a str,
}

/// The line for an `order.paid` message body, or why there is none.
pub fn line_for(body: &[u8]) -> Result<String, String> {
    let event: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let field = |v: &serde_json::Value, name: &str| {
        v.get(name)
            .cloned()
            .ok_or_else(|| format!("the event has no {name}"))
    };
    let kind = field(&event, "type")?;
    if kind != "order.paid" {
        return Err(format!("not an order.paid event: {kind}"));
    }
    let data = field(&event, "data")?;
    let text = |v: &serde_json::Value, name: &str| {
        field(v, name)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{name} is not a string"))
    };
    let (order_id, at) = (text(&event, "order_id")?, text(&event, "at")?);
    let (customer_id, currency) = (text(&data, "customer_id")?, text(&data, "currency")?);
    let total_cents = field(&data, "total_cents")?
        .as_i64()
        .ok_or("total_cents is not an integer")?;
    let items = field(&data, "items")?;
    if !items.is_array() {
        return Err("items is not a list".into());
    }
    serde_json::to_string(&Line {
        order_id: &order_id,
        customer_id: &customer_id,
        total_cents,
        currency: &currency,
        items: &items,
        paid_at: &at,
    })
    .map_err(|e| e.to_string())
}

/// A relay's `message_id`: the event's seq, or `<node>:<seq>` with several nodes (each node's
/// seqs are its own, so the node is part of the event's identity).
fn is_message_id(id: &str) -> bool {
    let seq = match id.split_once(':') {
        Some((node, seq)) => {
            if node.is_empty()
                || node.len() > 63
                || !node
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return false;
            }
            seq
        }
        None => id,
    };
    !seq.is_empty() && seq.len() <= 20 && seq.bytes().all(|b| b.is_ascii_digit())
}

/// The output and the dedup state, on disk.
struct Files {
    seen: HashSet<String>,
    state: File,
    out: Option<File>,
    out_len: u64,
}

impl Files {
    fn open(config: &NotifyConfig) -> Result<Self, NotifyError> {
        let files = |what: &str, e: std::io::Error| NotifyError::Files(format!("{what}: {e}"));
        let state_path = config.state.display().to_string();
        let mut seen = HashSet::new();
        let mut recorded_len = None;
        let mut good_bytes = 0u64;
        let existing = match File::open(&config.state) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(files(&state_path, e)),
        };
        let state_existed = existing.is_some();
        if let Some(file) = existing {
            let mut reader = std::io::BufReader::new(file);
            let mut line = String::new();
            loop {
                line.clear();
                let read = reader
                    .read_line(&mut line)
                    .map_err(|e| files(&state_path, e))?;
                // A torn last line (no newline: killed while appending) is dropped.
                if read == 0 || !line.ends_with('\n') {
                    break;
                }
                let mut parts = line.split_whitespace();
                let parsed = (
                    parts
                        .next()
                        .filter(|id| is_message_id(id))
                        .map(str::to_owned),
                    parts.next().and_then(|s| s.parse::<u64>().ok()),
                );
                let (Some(seq), Some(len)) = parsed else {
                    return Err(NotifyError::Files(format!(
                        "{state_path}: line {:?} is not `<message_id> <output length>`; fix or move the file (it is the dedup state)",
                        line.trim_end()
                    )));
                };
                seen.insert(seq);
                recorded_len = Some(len);
                good_bytes += read as u64;
            }
        }
        let mut state = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.state)
            .map_err(|e| files(&state_path, e))?;
        if state.metadata().map_err(|e| files(&state_path, e))?.len() > good_bytes {
            state
                .set_len(good_bytes)
                .map_err(|e| files(&state_path, e))?;
        }
        let _ = state.flush();
        let (out, out_len) = match &config.out {
            None => (None, 0),
            Some(path) => {
                let shown = path.display().to_string();
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| files(&shown, e))?;
                let len = file.metadata().map_err(|e| files(&shown, e))?.len();
                let keep = recorded_len.unwrap_or(0);
                if !state_existed && len > 0 {
                    // Cutting would drop lines whose messages were acked: they never come again.
                    return Err(NotifyError::Files(format!(
                        "{shown} holds {len} bytes but the state {state_path} does not exist: give the --state that goes with this output, or move the output away"
                    )));
                }
                if len < keep {
                    return Err(NotifyError::Files(format!(
                        "{shown} is shorter ({len} bytes) than the state {state_path} records ({keep}): lines of acked messages are missing; restore the output or move both files away"
                    )));
                }
                if keep > 0 {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut last = [0u8; 1];
                    let mut reader = File::open(path).map_err(|e| files(&shown, e))?;
                    reader
                        .seek(SeekFrom::Start(keep - 1))
                        .and_then(|_| reader.read_exact(&mut last))
                        .map_err(|e| files(&shown, e))?;
                    if last[0] != b'\n' {
                        return Err(NotifyError::Files(format!(
                            "{shown}: the length {keep} the state {state_path} records does not end a line: the output or the state holds bad bytes; fix or move both files"
                        )));
                    }
                }
                if len > keep {
                    // Lines whose messages were not acked: they come again.
                    file.set_len(keep).map_err(|e| files(&shown, e))?;
                    file.sync_data().map_err(|e| files(&shown, e))?;
                    tracing::info!(
                        cut = len - keep,
                        "notify: cut lines written after the last recorded one"
                    );
                }
                (Some(file), len.min(keep))
            }
        };
        Ok(Self {
            seen,
            state,
            out,
            out_len,
        })
    }

    /// Writes the `lines` of a batch of messages (by seq), durably, before the caller acks them:
    /// one `fsync` of the output, then one of the state, for the whole batch.
    fn write(&mut self, lines: &[(String, String)]) -> Result<(), NotifyError> {
        let failed = |what: &str, e: std::io::Error| NotifyError::Files(format!("{what}: {e}"));
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for (_, line) in lines {
            text.push_str(line);
            text.push('\n');
        }
        match &mut self.out {
            Some(out) => {
                out.write_all(text.as_bytes())
                    .and_then(|()| out.sync_data())
                    .map_err(|e| failed("writing the output", e))?;
            }
            None => {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(text.as_bytes())
                    .and_then(|()| stdout.flush())
                    .map_err(|e| failed("writing to stdout", e))?;
            }
        }
        let mut state = String::new();
        for (seq, line) in lines {
            if self.out.is_some() {
                self.out_len += line.len() as u64 + 1;
            }
            state.push_str(&format!("{seq} {}\n", self.out_len));
        }
        self.state
            .write_all(state.as_bytes())
            .and_then(|()| self.state.sync_data())
            .map_err(|e| failed("writing the state", e))?;
        self.seen.extend(lines.iter().map(|(seq, _)| seq.clone()));
        Ok(())
    }
}

/// Consumes until `stop` resolves. Reconnects with backoff when the broker goes away.
pub async fn run(
    config: NotifyConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), NotifyError> {
    let mut files = Files::open(&config)?;
    tracing::info!(
        queue = %config.queue,
        already_notified = files.seen.len(),
        "notify: starting"
    );
    tokio::pin!(stop);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let session = consume(&config, &mut files);
        let wait = backoff.next_wait();
        tokio::select! {
            () = &mut stop => return Ok(()),
            ended = session => match ended {
                Err(Ended::Fatal(error)) => return Err(error),
                Err(Ended::Broker(error)) => {
                    tracing::warn!(%error, retry_in = ?wait, "notify: RabbitMQ session ended; reconnecting");
                }
                Ok(()) => {}
            },
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

enum Ended {
    Broker(lapin::Error),
    Fatal(NotifyError),
}

impl From<lapin::Error> for Ended {
    fn from(error: lapin::Error) -> Self {
        Ended::Broker(error)
    }
}

/// Declares the quorum queue `queue` bound to `order.paid`, with the delivery limit and the
/// dead-letter exchange of `exchange`.
pub async fn declare_queue(
    channel: &lapin::Channel,
    exchange: &str,
    queue: &str,
    max_attempts: u32,
) -> Result<(), lapin::Error> {
    declare_topology(channel, exchange).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(max_attempts.saturating_sub(1))),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dead_letter_exchange(exchange).as_str())),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "order.paid".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

async fn consume(config: &NotifyConfig, files: &mut Files) -> Result<(), Ended> {
    let connection = Connection::connect(
        &config.url,
        ConnectionProperties::default().with_connection_name("turnstile notify".into()),
    )
    .await?;
    let channel = connection.create_channel().await?;
    declare_queue(
        &channel,
        &config.exchange,
        &config.queue,
        config.max_attempts,
    )
    .await
    .map_err(|error| match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind()
                == lapin::protocol::AMQPErrorKind::Soft(
                    lapin::protocol::AMQPSoftError::PRECONDITIONFAILED,
                ) =>
        {
            Ended::Fatal(NotifyError::Queue {
                queue: config.queue.clone(),
                reason: amqp.to_string(),
            })
        }
        _ => Ended::Broker(error),
    })?;
    channel
        .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            "turnstile-notify".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %config.queue, "notify: consuming");
    while let Some(first) = consumer.next().await {
        // The deliveries already here join the first one: one pair of fsyncs per batch.
        let mut batch = vec![first?];
        while batch.len() < usize::from(config.prefetch) {
            match futures_util::FutureExt::now_or_never(consumer.next()) {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        let mut lines: Vec<(String, String)> = Vec::new();
        let mut acks = Vec::new();
        for delivery in batch {
            let seq = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .filter(|id| is_message_id(id));
            let outcome = match seq {
                None => Err(
                    "the message has no message_id `<seq>` or `<node>:<seq>` (several nodes)"
                        .to_owned(),
                ),
                // A duplicate: already written, or earlier in this batch.
                Some(seq) if files.seen.contains(&seq) || lines.iter().any(|(s, _)| *s == seq) => {
                    Ok(None)
                }
                Some(seq) => line_for(&delivery.data).map(|line| Some((seq, line))),
            };
            match outcome {
                Ok(line) => {
                    lines.extend(line);
                    acks.push(delivery);
                }
                Err(reason) => {
                    tracing::warn!(
                        %reason,
                        message_id = ?delivery.properties.message_id(),
                        "notify: message refused; RabbitMQ dead-letters it after --max-attempts deliveries"
                    );
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await?;
                }
            }
        }
        files.write(&lines).map_err(Ended::Fatal)?;
        for delivery in acks {
            delivery.ack(BasicAckOptions::default()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> NotifyConfig {
        NotifyConfig {
            url: "amqp://127.0.0.1:1/%2f".into(),
            exchange: "x".into(),
            queue: "q".into(),
            out: Some(dir.join("out")),
            state: dir.join("state"),
            max_attempts: 3,
            prefetch: 10,
        }
    }

    fn open_err(config: &NotifyConfig) -> String {
        match Files::open(config) {
            Ok(_) => panic!("opened without an error"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn an_output_shorter_than_the_state_records_is_an_error_not_a_silent_loss() {
        // Proves: lines the state says were written (and whose messages were acked) are missing
        // from the output: a clear error, never a silent restart from the shorter length.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::write(dir.path().join("out"), "{\"a\":1}\n").expect("out");
        std::fs::write(dir.path().join("state"), "1 8\n2 16\n").expect("state");
        let message = open_err(&config);
        assert!(message.contains("shorter"), "{message}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).expect("out"),
            "{\"a\":1}\n",
            "the output is left alone"
        );
    }

    #[test]
    fn an_output_with_lines_but_no_state_file_is_an_error_not_truncated() {
        // Proves: a missing state (wrong --state, file lost) does not cut every line of the
        // output away (their messages were acked: they would never come again).
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::write(dir.path().join("out"), "{\"a\":1}\n{\"b\":2}\n").expect("out");
        let message = open_err(&config);
        assert!(message.contains("state"), "{message}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).expect("out"),
            "{\"a\":1}\n{\"b\":2}\n"
        );
    }

    #[test]
    fn an_output_whose_recorded_length_is_not_a_line_end_is_an_error() {
        // Proves: bad bytes in the output (the recorded length does not end a line) are refused.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::write(dir.path().join("out"), "{\"a\":1}X{\"b\":2}\n").expect("out");
        std::fs::write(dir.path().join("state"), "1 8\n").expect("state");
        let message = open_err(&config);
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn lines_after_the_last_recorded_one_are_cut_and_a_torn_state_line_dropped() {
        // Holds: a kill between the output's fsync and the state's leaves extra lines (cut) and
        // maybe a torn state line (dropped).
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::write(dir.path().join("out"), "{\"a\":1}\n{\"b\":2}\n").expect("out");
        std::fs::write(dir.path().join("state"), "1 8\n2 1").expect("state");
        let files = Files::open(&config).expect("open");
        assert_eq!(files.out_len, 8);
        assert!(files.seen.contains("1") && !files.seen.contains("2"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).expect("out"),
            "{\"a\":1}\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("state")).expect("state"),
            "1 8\n"
        );
    }

    #[test]
    fn message_ids_are_a_seq_or_a_nodes_seq() {
        // Proves: several nodes' ids (`<node>:<seq>`) are events of their own, one node's plain
        // seqs still are, and anything else is refused.
        for good in ["1", "18446744073709551615", "node-a:7", "turnstile-0:1"] {
            assert!(is_message_id(good), "{good}");
        }
        for bad in [
            "", "seven", "node-a:", ":7", "Node:7", "a:b:7", "node_a:7", "-1",
        ] {
            assert!(!is_message_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_garbage_state_line_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::write(dir.path().join("state"), "1 8\nzz top\n").expect("state");
        assert!(open_err(&config).contains("zz top"));
    }
}

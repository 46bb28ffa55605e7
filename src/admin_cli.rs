//! `turnstile admin ...`: the operations desk of a running server, over its HTTP API
//! (`/v1/admin/...`, API.md "Operations desk"), printed as tables for a person (or, with
//! `--json`, the server's answer as it is).

use crate::config::{AdminAction, AdminArgs};
use crate::http_client::{ClientOptions, HttpClient, Trust};
use serde_json::Value;
use std::fmt::Write as _;
use std::time::Duration;

/// Why the desk could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad usage (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached, or refused (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// Runs one desk command; what to print.
pub fn run(args: AdminArgs) -> Result<String, AdminError> {
    let token = args.token.clone().ok_or_else(|| {
        AdminError::Usage(
            "needs --token (or TURNSTILE_ADMIN_TOKEN): the server's --admin-token".into(),
        )
    })?;
    let base = args.url.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(AdminError::Usage(format!(
            "--url {base:?} must start with http:// or https://"
        )));
    }
    let (method, path) = match &args.action {
        AdminAction::Holds { older_than } => (
            "GET",
            match older_than {
                Some(age) => format!("/v1/admin/holds?older_than={}ms", age.as_millis()),
                None => "/v1/admin/holds".to_owned(),
            },
        ),
        AdminAction::Release { order_id } => {
            if order_id.is_empty()
                || !order_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(AdminError::Usage(format!(
                    "{order_id:?} is not an order id"
                )));
            }
            ("POST", format!("/v1/admin/orders/{order_id}/release"))
        }
        AdminAction::Payments => ("GET", "/v1/admin/payments".to_owned()),
        AdminAction::Journal => ("GET", "/v1/admin/journal".to_owned()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::Failed(format!("cannot start the runtime: {e}")))?;
    let client = HttpClient::new(ClientOptions {
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(1),
        idle_per_host: 1,
        trust: Trust::Roots(std::sync::Arc::new(crate::server::platform_roots())),
        // The desk lists at most 10,000 orders (a few MB); a longer answer is not the desk's.
        body_max: 64 << 20,
    })
    .map_err(|e| AdminError::Failed(e.to_string()))?;
    let bearer = format!("Bearer {token}");
    let url = format!("{base}{path}");
    let answer = runtime
        .block_on(client.send(method, &url, &[("authorization", &bearer)], Vec::new()))
        .map_err(|e| AdminError::Failed(format!("{method} {base}{path}: {e}")))?;
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| {
        AdminError::Failed(format!(
            "{method} {path}: {} with a body that is not JSON ({e})",
            answer.status
        ))
    })?;
    if !(200..300).contains(&answer.status) {
        return Err(AdminError::Failed(format!(
            "{method} {path}: {} {}: {}",
            answer.status,
            text(&body["error"]),
            text(&body["message"])
        )));
    }
    // An answer of another shape is not the desk's (a --url that is not the server, a proxy's
    // page): saying "nothing is stuck" from it would mislead.
    // Each field the desk gives, with the JSON type it has.
    let expected: &[(&str, Shape)] = match args.action {
        AdminAction::Holds { .. } => &[("holds", Value::is_array)],
        AdminAction::Release { .. } => {
            &[("order_id", Value::is_string), ("status", Value::is_string)]
        }
        AdminAction::Payments => &[("owed", Value::is_array), ("pending", Value::is_array)],
        AdminAction::Journal => &[
            ("last_event_seq", Value::is_u64),
            ("checks", Value::is_object),
        ],
    };
    if let Some((missing, _)) = expected
        .iter()
        .find(|(field, is_right)| !body.get(*field).is_some_and(is_right))
    {
        return Err(AdminError::Failed(format!(
            "{method} {path}: {} without a right \"{missing}\": not an answer of the operations desk (is --url the server?)",
            answer.status
        )));
    }
    if args.json {
        return Ok(format!("{body}\n"));
    }
    Ok(match args.action {
        AdminAction::Holds { .. } => holds(&body),
        AdminAction::Release { .. } => format!(
            "{} {} ({} {})\n",
            text(&body["order_id"]),
            text(&body["status"]),
            text(&body["customer_id"]),
            items(&body["items"])
        ),
        AdminAction::Payments => payments(&body),
        AdminAction::Journal => journal(&body),
    })
}

/// Whether a field of an answer has the JSON type the desk gives it.
type Shape = fn(&Value) -> bool;

/// `sku×quantity, ...`.
fn items(items: &Value) -> String {
    items
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|line| format!("{}×{}", text(&line["sku"]), text(&line["quantity"])))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, header.to_vec());
    for row in rows {
        line(&mut out, row.iter().map(String::as_str).collect());
    }
    out
}

/// A cell: the value as text, control characters (escape sequences, line breaks) shown as `?`,
/// so what a server sends cannot move the terminal's cursor or forge a row.
fn text(value: &Value) -> String {
    let raw = match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    raw.chars()
        .map(|c| {
            if c.is_control()
                || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}')
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
            {
                '?'
            } else {
                c
            }
        })
        .collect()
}

fn holds(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["holds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|hold| {
            vec![
                text(&hold["order_id"]),
                text(&hold["status"]),
                text(&hold["customer_id"]),
                format!("{}s", text(&hold["age_s"])),
                text(&hold["created_at"]),
                items(&hold["items"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no order holds stock\n".to_owned();
    }
    table(
        &["ORDER", "STATUS", "CUSTOMER", "AGE", "CREATED", "ITEMS"],
        &rows,
    )
}

fn payments(body: &Value) -> String {
    let owed: Vec<Vec<String>> = body["owed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["order_id"]),
                text(&p["action"]),
                text(&p["status"]),
                text(&p["attempts"]),
                text(&p["since"]),
                if p["refused"] == true {
                    "refused for good".to_owned()
                } else {
                    String::new()
                },
                text(&p["last_error"]),
            ]
        })
        .collect();
    let pending: Vec<Vec<String>> = body["pending"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["order_id"]),
                format!("{}s", text(&p["age_s"])),
                match p["waiting_for"].as_str() {
                    Some("webhook") => "the gateway's webhook (order payment_pending)".to_owned(),
                    Some("checkout") => "its checkout (at the gateway, or committing)".to_owned(),
                    _ => text(&p["waiting_for"]),
                },
            ]
        })
        .collect();
    let mut out = String::new();
    if owed.is_empty() {
        out.push_str("nothing owed to the gateway\n");
    } else {
        out.push_str(&table(
            &[
                "ORDER",
                "OWES",
                "STATUS",
                "FAILED",
                "SINCE",
                "",
                "LAST ERROR",
            ],
            &owed,
        ));
    }
    out.push('\n');
    if pending.is_empty() {
        out.push_str("no checkout waiting on the gateway\n");
    } else {
        out.push_str(&table(&["WAITING ON THE GATEWAY", "AGE", "FOR"], &pending));
    }
    out
}

fn journal(body: &Value) -> String {
    let mut out = format!("last event seq  {}\n", text(&body["last_event_seq"]));
    let position = &body["journal"];
    if position.is_object() {
        let _ = writeln!(
            out,
            "journal         {}, last lsn {}",
            text(&position["kind"]),
            text(&position["last_lsn"])
        );
        let mysql = &position["mysql"];
        if mysql.is_object() {
            let _ = writeln!(
                out,
                "MySQL           log {:?} (writer turn {}), applied through lsn {} (event {}), {} records behind ({}s){}",
                text(&mysql["log"]),
                text(&mysql["writer_turn"]),
                text(&mysql["applied_lsn"]),
                text(&mysql["applied_event_seq"]),
                text(&mysql["lag_records"]),
                text(&mysql["lag_seconds"]),
                if mysql["problem"].is_string() {
                    format!(": {}", text(&mysql["problem"]))
                } else {
                    String::new()
                }
            );
        }
        let segments: Vec<Vec<String>> = position["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                vec![
                    text(&s["file"]),
                    text(&s["first_lsn"]),
                    text(&s["first_event_seq"]),
                ]
            })
            .collect();
        if !segments.is_empty() {
            out.push('\n');
            out.push_str(&table(&["SEGMENT", "FIRST LSN", "FIRST EVENT"], &segments));
        }
    }
    for (name, check) in body["checks"].as_object().into_iter().flatten() {
        let name = text(&Value::String(name.clone()));
        let _ = writeln!(out, "check {name:<10} {}", text(check));
    }
    let amqp = &body["amqp"];
    if amqp.is_object() {
        let _ = writeln!(
            out,
            "RabbitMQ        {} events not confirmed ({}s), confirmed through {}",
            text(&amqp["lag_events"]),
            text(&amqp["lag_seconds"]),
            text(&amqp["confirmed_seq"])
        );
    }
    let rows: Vec<Vec<String>> = body["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| vec![text(&Value::String(name.clone())), text(value)])
        .collect();
    out.push('\n');
    out.push_str(&table(&["COUNTER", "VALUE"], &rows));
    out
}

//! Checks of values clap takes as text: durations, fractions, names, and the URLs that may hold
//! a password (checked after parsing, so a refusal never echoes them).

use super::*;

/// The longest duration accepted: 100 years. Durations become signed milliseconds added to the
/// current time, so a longer one (humantime takes up to 2^64 seconds) would overflow them: expire
/// holds at once, purge idempotency keys at once, or panic.
pub const DURATION_MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a duration: `500ms`, `90s`, `15m`, `1h`, `7d` (humantime's syntax, also `1h 30m`), at
/// most [`DURATION_MAX`].
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 90s, 15m, 1h or 7d ({e})"))?;
    if parsed > DURATION_MAX {
        return Err(format!("{raw:?} is longer than 100 years (36500d)"));
    }
    Ok(parsed)
}

pub(super) fn duration(raw: &str) -> Result<Duration, String> {
    parse_duration(raw)
}

/// A duration longer than 0: a zero retention, expiry or timeout would expire things as soon as
/// they exist, or cut every client off at once.
pub(super) fn positive_duration(raw: &str) -> Result<Duration, String> {
    let parsed = parse_duration(raw)?;
    if parsed.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(parsed)
}

/// A node's name (`--node-id`): a DNS label, 1-63 characters of `[a-z0-9-]`, neither starting
/// nor ending with `-` (a pod's name is one).
pub(super) fn node_id(raw: &str) -> Result<String, String> {
    let fits = (1..=63).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !raw.starts_with('-')
        && !raw.ends_with('-');
    if !fits {
        return Err(
            "must be 1 to 63 characters of a-z, 0-9 and -, not starting or ending with - (a DNS label, like a pod name)"
                .into(),
        );
    }
    Ok(raw.to_owned())
}

/// Where the other nodes reach this one (`--advertise-url`): an HTTP base URL whose host another
/// machine can dial, so never an unspecified address (`0.0.0.0`, `[::]`).
pub fn check_advertise_url(raw: &str) -> Result<String, ConfigError> {
    let url = check_http_url("--advertise-url", raw)?;
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| ConfigError("--advertise-url is not a URL".into()))?;
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(ConfigError(format!(
            "--advertise-url {url} names an unspecified address, which no other node can reach: give this node's own address or DNS name (with --listen 0.0.0.0:PORT, set --advertise-url http://<pod or host name>:PORT)"
        )));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(ConfigError(format!(
            "--advertise-url {url} must be a base URL without a path (http://host:port)"
        )));
    }
    Ok(url)
}

pub(super) fn non_empty(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(raw.to_owned())
}

/// Checks a MySQL URL after parsing, so that a refusal never echoes it (clap's messages show the
/// value given, and this one may hold a password).
pub fn check_mysql_url(raw: &str) -> Result<(), ConfigError> {
    if !raw.starts_with("mysql://") && !raw.starts_with("mariadb://") {
        return Err(ConfigError(
            "--mysql-url must look like mysql://user:password@host:3306/database (the value given is not shown: it may hold a password)".into(),
        ));
    }
    // What the driver would refuse at the first connection (a port out of range, say): a
    // configuration error now, not a runtime failure later.
    let options = match <sqlx::mysql::MySqlConnectOptions as std::str::FromStr>::from_str(raw) {
        Ok(options) => options,
        Err(error) => {
            let reason = match &error {
                sqlx::Error::Configuration(inner) => inner.to_string(),
                _ => "it cannot be parsed".to_owned(),
            };
            return Err(ConfigError(format!(
                "--mysql-url cannot be used: {reason} (the value given is not shown: it may hold a password)"
            )));
        }
    };
    if options.get_database().is_none_or(str::is_empty) {
        return Err(ConfigError(
            "--mysql-url names no database: give mysql://user:password@host:3306/database (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// Checks an AMQP URL after parsing, without echoing it (it may hold a password).
pub fn check_amqp_url(raw: &str) -> Result<(), ConfigError> {
    if raw.starts_with("amqps://") {
        return Err(ConfigError(
            "--amqp-url: amqps:// (TLS to RabbitMQ) is not supported by this build; use amqp:// on a trusted network (the value given is not shown: it may hold a password)".into(),
        ));
    }
    let valid = raw
        .strip_prefix("amqp://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && lapin::uri::AMQPUri::from_str(raw).is_ok();
    if !valid {
        return Err(ConfigError(
            "--amqp-url must look like amqp://user:password@host:5672/%2f (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// Refuses a Redis URL this build cannot use, without echoing it (it may hold a password).
pub fn check_redis_url(raw: &str) -> Result<(), ConfigError> {
    if raw.starts_with("rediss://") {
        return Err(ConfigError(
            "--redis-url: rediss:// (TLS to Redis) is not supported by this build; use redis:// on a trusted network (the value given is not shown: it may hold a password)".into(),
        ));
    }
    if raw.contains(',') {
        // A Redis Cluster: its nodes (some or all; the client learns the rest from them).
        let nodes: Vec<&str> = raw.split(',').map(str::trim).collect();
        let valid = nodes.iter().all(|node| {
            node.strip_prefix("redis://")
                .is_some_and(|rest| !rest.is_empty())
                && redis::Client::open(*node).is_ok()
        });
        if !valid {
            return Err(ConfigError(
                "--redis-url: the nodes of a Redis Cluster are redis://[:password@]host:port URLs separated by commas (the value given is not shown: it may hold a password)".into(),
            ));
        }
        return Ok(());
    }
    let scheme_ok = ["redis://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| {
            raw.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
    if !scheme_ok || redis::Client::open(raw).is_err() {
        return Err(ConfigError(
            "--redis-url must look like redis://[:password@]host:6379[/db] or redis+unix:///path/to/socket (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// A Redis key prefix: 1–64 visible ASCII characters, no braces (hash tags would pin every key to
/// one cluster slot).
pub(super) fn redis_prefix(raw: &str) -> Result<String, String> {
    if raw.is_empty()
        || raw.len() > 64
        || !raw
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err("must be 1 to 64 visible ASCII characters without { or }".into());
    }
    Ok(raw.to_owned())
}

/// An exchange or queue name: 1–200 visible ASCII characters.
pub(super) fn amqp_name(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.len() > 200 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be 1 to 200 visible ASCII characters".into());
    }
    Ok(raw.to_owned())
}

/// Checks `--gateway-url` after parsing, without echoing it: an `http://` or `https://` URL that
/// parses, with a host, a port in 1–65535 if one is given, and nothing but a base: no credentials
/// (`user:password@`: this client would not send them, and they would be written wherever the URL
/// is: the start-up line, errors, `/readyz`), no query or fragment (a token there would be too,
/// and the calls' paths are appended to it). Returns the URL without a trailing `/`.
pub fn check_gateway_url(raw: &str) -> Result<String, ConfigError> {
    check_http_url("--gateway-url", raw)
}

/// Checks an `http://` or `https://` base URL given to `option` (no query, fragment or
/// credentials, a host, a port in range); gives it back without a trailing `/`.
fn check_http_url(option: &str, raw: &str) -> Result<String, ConfigError> {
    let refuse = |why: &str| {
        ConfigError(format!(
            "{option} {why} (the value given is not shown); give http://host:port or https://host"
        ))
    };
    if !raw.starts_with("http://") && !raw.starts_with("https://") {
        return Err(refuse("must be an http:// or https:// URL"));
    }
    if raw.contains('?') || raw.contains('#') {
        return Err(refuse("must not carry a query or a fragment"));
    }
    let uri: hyper::Uri = raw.parse().map_err(|_| refuse("is not a URL"))?;
    let authority = uri.authority().ok_or_else(|| refuse("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(refuse(
            "must not carry credentials (user:password@ would never be sent)",
        ));
    }
    if authority.host().is_empty() {
        return Err(refuse("has no host"));
    }
    // After the last ':' that is not inside an IPv6 address's brackets.
    let port = authority
        .as_str()
        .rsplit_once(':')
        .filter(|(_, port)| !port.contains(']'))
        .map(|(_, port)| port);
    if port.is_some_and(|port| !matches!(port.parse::<u32>(), Ok(1..=65_535))) {
        return Err(refuse("has a port outside 1-65535"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

pub(super) fn fraction(raw: &str) -> Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| "must be a fraction from 0 to 1".into())
}

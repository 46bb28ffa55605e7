//! The `serve` configuration: command-line flags win over environment variables, which win over the
//! JSON config file, which wins over the defaults. The config file is refused when its mode lets
//! group or others read it (it may hold secrets).

use crate::time::parse_duration;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One `serve` option: its flag name, environment variable, default and help text.
pub struct OptionSpec {
    /// The flag without `--`.
    pub name: &'static str,
    /// The environment variable, if any.
    pub env: Option<&'static str>,
    /// The default shown in `--help` (and used when nothing else sets it).
    pub default: Option<&'static str>,
    /// What it does.
    pub help: &'static str,
}

/// Every `serve` option, in `--help` order.
pub const SERVE_OPTIONS: &[OptionSpec] = &[
    OptionSpec { name: "listen", env: Some("TURNSTILE_LISTEN"), default: Some("127.0.0.1:8080"), help: "HTTP listen address (port 0 picks a free port)" },
    OptionSpec { name: "data-dir", env: Some("TURNSTILE_DATA_DIR"), default: Some("./data"), help: "embedded journal (write-ahead log) location" },
    OptionSpec { name: "hold-ttl", env: Some("TURNSTILE_HOLD_TTL"), default: Some("15m"), help: "how long an unfinished order may hold stock before it is released" },
    OptionSpec { name: "webhook-secret", env: Some("TURNSTILE_WEBHOOK_SECRET"), default: None, help: "HMAC key for Turnstile-Signature (default: random at start; the in-process simulator uses the same)" },
    OptionSpec { name: "gateway-timeout", env: Some("TURNSTILE_GATEWAY_TIMEOUT"), default: Some("5s"), help: "how long an authorisation may take before 504" },
    OptionSpec { name: "sim-pending-delay", env: Some("TURNSTILE_SIM_PENDING_DELAY"), default: Some("500ms"), help: "in-process simulator: how long tok_pending stays undecided before its webhook" },
    OptionSpec { name: "mysql-url", env: Some("TURNSTILE_MYSQL_URL"), default: None, help: "use MySQL/MariaDB as the journal instead of the embedded one (mysql://user:pass@host:3306/db; run `turnstile migrate` first)" },
    OptionSpec { name: "mysql-pool-size", env: Some("TURNSTILE_MYSQL_POOL_SIZE"), default: Some("8"), help: "MySQL connections (the journal's writer uses one; reads share the rest)" },
    OptionSpec { name: "journal-batch-max", env: Some("TURNSTILE_JOURNAL_BATCH_MAX"), default: Some("2000"), help: "most records in one MySQL transaction (group commit)" },
    OptionSpec { name: "journal-timeout", env: Some("TURNSTILE_JOURNAL_TIMEOUT"), default: Some("5s"), help: "how long a request waits for its commit before answering 503 journal_unavailable" },
    OptionSpec { name: "idempotency-retention", env: Some("TURNSTILE_IDEMPOTENCY_RETENTION"), default: Some("24h"), help: "how long the answer of a checkout that created an order is kept under its key; past it the key starts afresh" },
    OptionSpec { name: "order-retention", env: Some("TURNSTILE_ORDER_RETENTION"), default: Some("7d"), help: "finished orders older than this leave memory (GET /v1/orders/{id} then answers from MySQL when configured, else 404)" },
    OptionSpec { name: "event-retention", env: Some("TURNSTILE_EVENT_RETENTION"), default: Some("7d"), help: "events are kept on disk at least this long; only a recent window stays in memory" },
    OptionSpec { name: "slow-client-timeout", env: Some("TURNSTILE_SLOW_CLIENT_TIMEOUT"), default: Some("10s"), help: "a client that has not sent its whole request headers and body within this is disconnected" },
    OptionSpec { name: "cart-ttl", env: Some("TURNSTILE_CART_TTL"), default: Some("1h"), help: "idle expiry of a cart" },
    OptionSpec { name: "carts-max", env: Some("TURNSTILE_CARTS_MAX"), default: Some("1000000"), help: "live carts at most; past it POST /v1/carts answers 503 overloaded" },
    OptionSpec { name: "connections-max", env: Some("TURNSTILE_CONNECTIONS_MAX"), default: Some("10000"), help: "open client connections at most; past it new connections wait in the kernel's backlog until one closes" },
    OptionSpec { name: "checkouts-in-flight-max", env: Some("TURNSTILE_CHECKOUTS_IN_FLIGHT_MAX"), default: Some("10000"), help: "checkouts past their hold (authorising, committing) at most at once; past it a checkout answers 503 overloaded with Retry-After" },
    OptionSpec { name: "redis-url", env: Some("TURNSTILE_REDIS_URL"), default: None, help: "carts and submission locks in Redis (not in this build yet)" },
    OptionSpec { name: "amqp-url", env: Some("TURNSTILE_AMQP_URL"), default: None, help: "also publish order events to RabbitMQ (not in this build yet)" },
    OptionSpec { name: "gateway-url", env: Some("TURNSTILE_GATEWAY_URL"), default: None, help: "payment gateway over HTTP (not in this build yet)" },
    OptionSpec { name: "tls-cert", env: None, default: None, help: "serve HTTPS with this certificate (not in this build yet)" },
    OptionSpec { name: "tls-key", env: None, default: None, help: "private key for --tls-cert (not in this build yet)" },
    OptionSpec { name: "config", env: Some("TURNSTILE_CONFIG"), default: None, help: "JSON config file (keys = option names); refused if group or others may read it" },
];

/// A configuration the server cannot start with; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The embedded journal's directory.
    pub data_dir: PathBuf,
    /// How long an unfinished order may hold stock.
    pub hold_ttl: Duration,
    /// HMAC key for webhooks; `None`: random at start.
    pub webhook_secret: Option<String>,
    /// How long an authorisation may take.
    pub gateway_timeout: Duration,
    /// How long the in-process simulator keeps `tok_pending` undecided.
    pub sim_pending_delay: Duration,
    /// The MySQL journal, if configured (else the embedded file journal).
    pub mysql: Option<crate::journal::mysql::MySqlConfig>,
    /// How long a request waits for its commit before answering 503.
    pub journal_timeout: Duration,
    /// How long the answer of a checkout that created an order stays under its key, so a retry
    /// within it replays instead of buying twice.
    pub idempotency_retention: Duration,
    /// How long a finished order stays in memory, which bounds memory under a steady flow of orders.
    pub order_retention: Duration,
    /// How long events stay on disk at least, so consumers that fall behind can still catch up.
    pub event_retention: Duration,
    /// How long a client may take to send its request headers, and its body, before it is cut off,
    /// so slow or stalled clients cannot hold connections forever.
    pub slow_client_timeout: Duration,
    /// How long an unused cart lives, so abandoned carts do not pile up.
    pub cart_ttl: Duration,
    /// The most live carts, so cart creation cannot exhaust memory.
    pub carts_max: usize,
    /// The most open client connections, so a connection flood cannot exhaust file descriptors
    /// or memory.
    pub connections_max: usize,
    /// The most checkouts past their hold at once: bounds the tasks and gateway calls a flood can
    /// start.
    pub checkouts_in_flight_max: usize,
}

/// `--help` for `serve`, generated from [`SERVE_OPTIONS`].
pub fn serve_help() -> String {
    let mut out = String::from(
        "Usage: turnstile serve [OPTIONS]\n\nRuns the checkout server. With no options it works on a fresh machine: embedded journal in\n./data, in-process carts, embedded event log, in-process payment simulator.\nFlags win over environment variables, which win over the config file.\n\nOptions:\n",
    );
    for option in SERVE_OPTIONS {
        let value = if option.name == "config" {
            " FILE"
        } else {
            " VALUE"
        };
        out.push_str(&format!(
            "  --{}{value}\n      {}",
            option.name, option.help
        ));
        if let Some(env) = option.env {
            out.push_str(&format!(" [env {env}]"));
        }
        if let Some(default) = option.default {
            out.push_str(&format!(" [default {default}]"));
        }
        out.push('\n');
    }
    out.push_str(
        "  -h, --help\n      print this help\n\nDurations are written like 500ms, 90s, 15m, 1h, 7d.\n",
    );
    out
}

fn normalise(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase()
}

fn read_config_file(path: &str) -> Result<HashMap<String, String>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path)
        .map_err(|e| ConfigError(format!("cannot read config file {path}: {e}")))?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError(format!(
            "config file {path} has mode {:o}, which lets group or others read it; it may hold secrets: run `chmod 600 {path}`",
            mode & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {path}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {path} is not valid JSON: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| ConfigError(format!("config file {path} must hold a JSON object")))?;
    let mut values = HashMap::new();
    for (key, value) in object {
        let spec = SERVE_OPTIONS
            .iter()
            .find(|o| normalise(o.name) == normalise(key) && o.name != "config")
            .ok_or_else(|| ConfigError(format!("config file {path}: unknown key {key:?}")))?;
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => {
                return Err(ConfigError(format!(
                    "config file {path}: {key} must be a string, not {other}"
                )))
            }
        };
        values.insert(spec.name.to_owned(), text);
    }
    Ok(values)
}

/// Parses `serve`'s arguments (after the command word) with `env` for environment lookups.
pub fn parse_serve(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServeConfig, ConfigError> {
    let mut flags: HashMap<String, String> = HashMap::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ConfigError(format!(
                "unexpected argument {arg:?} (see --help)"
            )));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        if !SERVE_OPTIONS.iter().any(|o| o.name == name) {
            return Err(ConfigError(format!("unknown option --{name} (see --help)")));
        }
        let value = match inline {
            Some(value) => value,
            None => rest
                .next()
                .cloned()
                .ok_or_else(|| ConfigError(format!("--{name} needs a value")))?,
        };
        flags.insert(name.to_owned(), value);
    }
    let env_of = |name: &str| {
        SERVE_OPTIONS
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.env)
            .and_then(env)
    };
    let file = match flags.get("config").cloned().or_else(|| env_of("config")) {
        Some(path) => read_config_file(&path)?,
        None => HashMap::new(),
    };
    let value = |name: &str| -> Option<String> {
        flags
            .get(name)
            .cloned()
            .or_else(|| env_of(name))
            .or_else(|| file.get(name).cloned())
            .or_else(|| {
                SERVE_OPTIONS
                    .iter()
                    .find(|o| o.name == name)
                    .and_then(|o| o.default.map(str::to_owned))
            })
    };
    let duration = |name: &str| -> Result<Duration, ConfigError> {
        let raw = value(name).unwrap_or_default();
        parse_duration(&raw).map_err(|e| ConfigError(format!("--{name}: {e}")))
    };
    for (name, arrives_with) in [
        ("redis-url", "the Redis session store"),
        ("amqp-url", "the RabbitMQ publisher"),
        ("gateway-url", "the HTTP payment gateway client"),
        ("tls-cert", "TLS support"),
        ("tls-key", "TLS support"),
    ] {
        if value(name).is_some() {
            return Err(ConfigError(format!(
                "--{name} is not supported by this build yet (it arrives with {arrives_with}); remove it to run on the embedded default"
            )));
        }
    }
    let listen_raw = value("listen").unwrap_or_default();
    let listen = listen_raw.parse().map_err(|_| {
        ConfigError(format!(
            "--listen {listen_raw:?} is not an address like 127.0.0.1:8080"
        ))
    })?;
    let hold_ttl = duration("hold-ttl")?;
    if hold_ttl.is_zero() {
        return Err(ConfigError("--hold-ttl must be longer than 0".into()));
    }
    let gateway_timeout = duration("gateway-timeout")?;
    if gateway_timeout.is_zero() {
        return Err(ConfigError(
            "--gateway-timeout must be longer than 0".into(),
        ));
    }
    let webhook_secret = value("webhook-secret");
    if webhook_secret.as_deref() == Some("") {
        return Err(ConfigError("--webhook-secret must not be empty".into()));
    }
    let count = |name: &str, range: std::ops::RangeInclusive<u64>| -> Result<u64, ConfigError> {
        let raw = value(name).unwrap_or_default();
        raw.parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ConfigError(format!(
                    "--{name} {raw:?} must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ))
            })
    };
    let mysql = match value("mysql-url") {
        Some(url) => {
            if !url.starts_with("mysql://") && !url.starts_with("mariadb://") {
                return Err(ConfigError(format!(
                    "--mysql-url {url:?} must look like mysql://user:password@host:3306/database"
                )));
            }
            let mut mysql = crate::journal::mysql::MySqlConfig::new(url);
            mysql.pool_size = count("mysql-pool-size", 2..=256)? as u32;
            mysql.batch_records_max = count("journal-batch-max", 1..=10_000)? as usize;
            Some(mysql)
        }
        None => None,
    };
    let journal_timeout = duration("journal-timeout")?;
    if journal_timeout.is_zero() {
        return Err(ConfigError(
            "--journal-timeout must be longer than 0".into(),
        ));
    }
    // Every retention, expiry and timeout must be positive: zero would expire things as soon as
    // they exist or cut every client off at once.
    let positive = |name: &str| -> Result<Duration, ConfigError> {
        let parsed = duration(name)?;
        if parsed.is_zero() {
            return Err(ConfigError(format!("--{name} must be longer than 0")));
        }
        Ok(parsed)
    };
    let idempotency_retention = positive("idempotency-retention")?;
    let order_retention = positive("order-retention")?;
    let event_retention = positive("event-retention")?;
    let slow_client_timeout = positive("slow-client-timeout")?;
    let cart_ttl = positive("cart-ttl")?;
    let carts_max = count("carts-max", 1..=1_000_000_000)? as usize;
    let connections_max = count("connections-max", 1..=1_000_000)? as usize;
    let checkouts_in_flight_max = count("checkouts-in-flight-max", 1..=1_000_000)? as usize;
    Ok(ServeConfig {
        mysql,
        journal_timeout,
        listen,
        data_dir: PathBuf::from(value("data-dir").unwrap_or_default()),
        hold_ttl,
        webhook_secret,
        gateway_timeout,
        sim_pending_delay: duration("sim-pending-delay")?,
        idempotency_retention,
        order_retention,
        event_retention,
        slow_client_timeout,
        cart_ttl,
        carts_max,
        connections_max,
        checkouts_in_flight_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_env_and_flags_in_order() {
        let none = |_: &str| None;
        let config = parse_serve(&[], &none).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.hold_ttl, Duration::from_secs(900));
        let env = |name: &str| (name == "TURNSTILE_LISTEN").then(|| "127.0.0.1:9000".to_owned());
        assert_eq!(parse_serve(&[], &env).unwrap().listen.port(), 9000);
        let flag = parse_serve(&args(&["--listen", "127.0.0.1:9100"]), &env).unwrap();
        assert_eq!(flag.listen.port(), 9100);
        let inline = parse_serve(&args(&["--hold-ttl=2s"]), &none).unwrap();
        assert_eq!(inline.hold_ttl, Duration::from_secs(2));
    }

    #[test]
    fn retention_expiry_and_limit_options_default_per_the_contract() {
        // Proves: with nothing set, the new options take API.md's defaults.
        let none = |_: &str| None;
        let config = parse_serve(&[], &none).unwrap();
        let hours = |n: u64| Duration::from_secs(n * 3_600);
        assert_eq!(config.idempotency_retention, hours(24));
        assert_eq!(config.order_retention, hours(7 * 24));
        assert_eq!(config.event_retention, hours(7 * 24));
        assert_eq!(config.slow_client_timeout, Duration::from_secs(10));
        assert_eq!(config.cart_ttl, hours(1));
        assert_eq!(config.carts_max, 1_000_000);
        assert_eq!(config.connections_max, 10_000);
    }

    #[test]
    fn retention_expiry_and_limit_options_come_from_env_and_flags() {
        // Proves: the new options are read from their environment variables, and a flag wins over them.
        let env = |name: &str| match name {
            "TURNSTILE_IDEMPOTENCY_RETENTION" => Some("48h".to_owned()),
            "TURNSTILE_ORDER_RETENTION" => Some("2d".to_owned()),
            "TURNSTILE_EVENT_RETENTION" => Some("30d".to_owned()),
            "TURNSTILE_SLOW_CLIENT_TIMEOUT" => Some("3s".to_owned()),
            "TURNSTILE_CART_TTL" => Some("20m".to_owned()),
            "TURNSTILE_CARTS_MAX" => Some("500".to_owned()),
            "TURNSTILE_CONNECTIONS_MAX" => Some("64".to_owned()),
            _ => None,
        };
        let config = parse_serve(&[], &env).unwrap();
        assert_eq!(
            config.idempotency_retention,
            Duration::from_secs(48 * 3_600)
        );
        assert_eq!(config.order_retention, Duration::from_secs(2 * 86_400));
        assert_eq!(config.event_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(config.slow_client_timeout, Duration::from_secs(3));
        assert_eq!(config.cart_ttl, Duration::from_secs(1_200));
        assert_eq!(config.carts_max, 500);
        assert_eq!(config.connections_max, 64);
        let flags = parse_serve(
            &args(&[
                "--slow-client-timeout",
                "250ms",
                "--connections-max=2",
                "--carts-max",
                "7",
                "--cart-ttl",
                "90s",
                "--order-retention",
                "1h",
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(flags.slow_client_timeout, Duration::from_millis(250));
        assert_eq!(flags.connections_max, 2);
        assert_eq!(flags.carts_max, 7);
        assert_eq!(flags.cart_ttl, Duration::from_secs(90));
        assert_eq!(flags.order_retention, Duration::from_secs(3_600));
    }

    #[test]
    fn bad_input_is_refused_with_a_message() {
        let none = |_: &str| None;
        for bad in [
            vec!["--nope", "1"],
            vec!["--listen"],
            vec!["--listen", "nowhere"],
            vec!["--hold-ttl", "5x"],
            vec!["--mysql-url", "postgres://x"],
            vec!["--redis-url", "redis://x"],
            vec!["stray"],
        ] {
            assert!(parse_serve(&args(&bad), &none).is_err(), "{bad:?}");
        }
        // The message names the option to change.
        for bad in [
            vec!["--idempotency-retention", "0s"],
            vec!["--order-retention", "0"],
            vec!["--event-retention", "0d"],
            vec!["--event-retention", "a week"],
            vec!["--slow-client-timeout", "0ms"],
            vec!["--slow-client-timeout", "-1s"],
            vec!["--cart-ttl", "0h"],
            vec!["--carts-max", "0"],
            vec!["--carts-max", "many"],
            vec!["--carts-max", "-5"],
            vec!["--connections-max", "0"],
            vec!["--connections-max", "1.5"],
            vec!["--connections-max", "99999999999"],
        ] {
            let error = parse_serve(&args(&bad), &none).unwrap_err();
            assert!(error.0.contains(bad[0]), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_config_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnstile.json");
        std::fs::write(&path, r#"{"listen": "127.0.0.1:9200", "hold_ttl": "1m"}"#).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let none = |_: &str| None;
        let path_arg = path.display().to_string();
        let error = parse_serve(&args(&["--config", &path_arg]), &none).unwrap_err();
        assert!(error.0.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = parse_serve(&args(&["--config", &path_arg]), &none).unwrap();
        assert_eq!(config.listen.port(), 9200);
        assert_eq!(config.hold_ttl, Duration::from_secs(60));
    }
}

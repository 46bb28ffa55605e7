//! What `serve` runs with, built from its parsed arguments, with the floors and pairings between
//! options checked.

use super::*;

/// TLS for the listener: the certificate chain and key files, and the lowest version accepted.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Lowest version accepted.
    pub min: TlsMin,
}

/// Socket options of the listener and its connections.
#[derive(Debug, Clone, Copy)]
pub struct SocketConfig {
    /// The listen backlog.
    pub backlog: u32,
    /// `TCP_NODELAY` on every client connection.
    pub nodelay: bool,
    /// `SO_RCVBUF` of client connections; `None`: the kernel's.
    pub recv_buffer: Option<u32>,
    /// `SO_SNDBUF` of client connections; `None`: the kernel's.
    pub send_buffer: Option<u32>,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// How requests are served.
    pub runtime: RuntimeKind,
    /// Worker threads serving requests; `None`: one per physical core.
    pub workers: Option<usize>,
    /// Pin per-core workers to their cores.
    pub pin: bool,
    /// Socket options.
    pub socket: SocketConfig,
    /// HTTPS, when configured.
    pub tls: Option<TlsConfig>,
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
    /// The payment gateway over HTTP; `None`: the in-process simulator.
    pub gateway_url: Option<String>,
    /// How long the reconciler leaves a payment pending, owed or orphaned before it acts.
    pub reconcile_after: Duration,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where the log goes (`None`: standard error).
    pub log_file: Option<PathBuf>,
    /// After the stop signal: how long the node serves on, `/readyz` answering 503, before it
    /// stops accepting.
    pub shutdown_delay: Duration,
    /// The MySQL journal, if configured (else the embedded file journal).
    pub mysql: Option<crate::journal::mysql::MySqlConfig>,
    /// With `mysql`: the embedded journal acknowledges and MySQL follows it.
    pub mysql_write_behind: bool,
    /// The RabbitMQ relay, if configured.
    pub amqp: Option<crate::events::relay::RelayConfig>,
    /// Redis for carts, submission locks and answers, if configured (else carts in process).
    pub redis: Option<crate::sessions::redis::RedisConfig>,
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
    /// The most live stock streams open at once (`--streams-max`).
    pub streams_max: usize,
    /// How long an admitted ticket stays valid (`--ticket-ttl`).
    pub ticket_ttl: Duration,
    /// Signs the waiting rooms' tickets (`--ticket-secret`; `None`: the cluster's secret with
    /// several nodes, else random at start).
    pub ticket_secret: Option<String>,
    /// The most bytes of answers not yet sent to their clients, across all connections, so
    /// clients that never read (or never open an HTTP/2 window) cannot make the server hold
    /// answers without bound.
    pub response_bytes_max: usize,
    /// With Redis unreachable, checkouts naming their items go on under this node's own key table
    /// (one node only: another node cannot see this node's keys).
    pub redis_optional: bool,
    /// The operations desk's bearer token; `None`: `/v1/admin/...` answers 404.
    pub admin_token: Option<String>,
    /// One node of several selling one stock (`--node-id`); `None`: one node.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The shortest retention that keeps the contract's promises: longer than a checkout can take
/// from the claim of its key to the decision of its commit (`--gateway-timeout` plus
/// `--journal-timeout`). An answer that expired sooner would be gone when a client told `503`
/// ("outcome unknown, retry with the same key") comes back, and the retry would place a second
/// order; an order or an event that left sooner would be gone before the client could read the
/// order it was just told about.
pub(super) fn check_retentions(args: &ServeArgs) -> Result<(), ConfigError> {
    let floor = args.gateway_timeout + args.journal_timeout;
    for (option, retention) in [
        ("--idempotency-retention", args.idempotency_retention),
        ("--order-retention", args.order_retention),
        ("--event-retention", args.event_retention),
    ] {
        if retention <= floor {
            return Err(ConfigError(format!(
                "{option} {} must be longer than --gateway-timeout plus --journal-timeout ({}): an answer, order or event must outlive the longest a checkout can take to decide, or a client told to retry with the same key could find it gone and buy twice",
                humantime::format_duration(retention),
                humantime::format_duration(floor)
            )));
        }
    }
    Ok(())
}

/// Turns parsed options into the server's configuration, refusing what this build cannot do.
pub fn serve_config(args: ServeArgs) -> Result<ServeConfig, CliError> {
    if let Some(url) = &args.redis_url {
        check_redis_url(url).map_err(CliError::Config)?;
    }
    // The reconciler voids authorisations with no durable order once they are this old: a
    // checkout still between its authorisation and its commit must be younger.
    if args.reconcile_after <= args.gateway_timeout + args.journal_timeout {
        return Err(CliError::Config(ConfigError(format!(
            "--reconcile-after {} must be longer than --gateway-timeout plus --journal-timeout ({}), or an authorisation whose order is still being journaled could be voided",
            humantime::format_duration(args.reconcile_after),
            humantime::format_duration(args.gateway_timeout + args.journal_timeout)
        ))));
    }
    // A submission lock is renewed while its checkout's outcome is unknown, a third of its TTL
    // at a time; a checkout that runs its normal course (its lock call, its authorisation, its
    // commit) stays within one TTL, so even a renewal lost to a Redis blip cannot let another
    // node start the same key while it runs.
    let lock_ttl = args.redis_lock_ttl;
    let checkout_max = args.redis_timeout + args.gateway_timeout + args.journal_timeout;
    if args.redis_url.is_some() && checkout_max >= lock_ttl {
        return Err(CliError::Config(ConfigError(format!(
            "--redis-timeout plus --gateway-timeout plus --journal-timeout ({}) must be shorter than --redis-lock-ttl ({}) with --redis-url, or another node could start a checkout still running under the same key",
            humantime::format_duration(checkout_max),
            humantime::format_duration(lock_ttl)
        ))));
    }
    if lock_ttl < Duration::from_secs(1) {
        return Err(CliError::Config(ConfigError(format!(
            "--redis-lock-ttl {} is too short: at least 1s (it is renewed every third of it)",
            humantime::format_duration(lock_ttl)
        ))));
    }
    if args.redis_optional && args.redis_url.is_none() {
        return Err(CliError::Config(ConfigError(
            "--redis-optional needs --redis-url (it says what checkouts do while that Redis is unreachable)".into(),
        )));
    }
    check_retentions(&args).map_err(CliError::Config)?;
    let cluster = cluster_config(&args).map_err(CliError::Config)?;
    if let Some(token) = &args.admin_token {
        // Checked here, not by clap, so a refusal never echoes the token.
        if token.len() < 16 || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CliError::Config(ConfigError(
                "--admin-token must be 16 to 256 visible ASCII characters (the value given is not shown)".into(),
            )));
        }
    }
    if let Some(url) = &args.mysql_url {
        check_mysql_url(url).map_err(CliError::Config)?;
    }
    let gateway_url = args
        .gateway_url
        .as_deref()
        .map(check_gateway_url)
        .transpose()
        .map_err(CliError::Config)?;
    if args.mysql_write_behind && args.mysql_url.is_none() {
        return Err(CliError::Config(ConfigError(
            "--mysql-write-behind needs --mysql-url (the database written behind the embedded journal)".into(),
        )));
    }
    if let Some(url) = &args.amqp_url {
        check_amqp_url(url).map_err(CliError::Config)?;
    }
    let amqp = args.amqp_url.map(|url| crate::events::relay::RelayConfig {
        url,
        exchange: args.amqp_exchange.clone(),
        window: args.amqp_window as usize,
        unconfirmed_max: args.amqp_unconfirmed_max,
        node: args.node_id.clone(),
    });
    let redis = args
        .redis_url
        .map(|url| crate::sessions::redis::RedisConfig {
            url,
            prefix: args.redis_prefix.clone(),
            timeout: args.redis_timeout,
            lock_ttl: args.redis_lock_ttl,
        });
    let mysql = args.mysql_url.map(|url| {
        let mut mysql = crate::journal::mysql::MySqlConfig::new(url);
        mysql.pool_size = args.mysql_pool_size;
        mysql.batch_records_max = args.journal_batch_max as usize;
        mysql.lag_max = args.mysql_lag_max;
        mysql.statement_timeout = args.mysql_timeout;
        mysql.node_id = args.node_id.clone();
        mysql
    });
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            min: args.tls_min,
        }),
        (None, None) => None,
        // Checked here, once flags, environment and config file are merged, and not with clap's
        // `requires`: its first parse runs before the file is read, so it would refuse a cert
        // from one source and its key from another.
        (Some(_), None) => {
            return Err(CliError::Config(ConfigError(
                "--tls-cert needs --tls-key".into(),
            )))
        }
        (None, Some(_)) => {
            return Err(CliError::Config(ConfigError(
                "--tls-key needs --tls-cert".into(),
            )))
        }
    };
    Ok(ServeConfig {
        listen: args.listen,
        runtime: args.runtime,
        workers: args.workers.map(|n| n as usize),
        pin: !args.no_pin,
        socket: SocketConfig {
            backlog: args.listen_backlog,
            nodelay: args.tcp_nodelay,
            recv_buffer: args.socket_recv_buffer,
            send_buffer: args.socket_send_buffer,
        },
        tls,
        data_dir: args.data_dir,
        hold_ttl: args.hold_ttl,
        webhook_secret: args.webhook_secret,
        gateway_timeout: args.gateway_timeout,
        sim_pending_delay: args.sim_pending_delay,
        gateway_url,
        reconcile_after: args.reconcile_after,
        shutdown_delay: args.shutdown_delay,
        log_format: args.log_format,
        log_file: args.log_file,
        mysql,
        mysql_write_behind: args.mysql_write_behind,
        amqp,
        redis,
        journal_timeout: args.journal_timeout,
        idempotency_retention: args.idempotency_retention,
        order_retention: args.order_retention,
        event_retention: args.event_retention,
        slow_client_timeout: args.slow_client_timeout,
        cart_ttl: args.cart_ttl,
        carts_max: args.carts_max as usize,
        connections_max: args.connections_max as usize,
        checkouts_in_flight_max: args.checkouts_in_flight_max as usize,
        streams_max: args.streams_max as usize,
        ticket_ttl: args.ticket_ttl,
        ticket_secret: args.ticket_secret,
        response_bytes_max: usize::try_from(args.response_bytes_max).unwrap_or(usize::MAX),
        redis_optional: args.redis_optional,
        admin_token: args.admin_token,
        cluster,
    })
}

/// `--node-id` and its companions: what several nodes need is all there, and nothing of theirs
/// is given to one node, where it would do nothing.
fn cluster_config(args: &ServeArgs) -> Result<Option<crate::cluster::ClusterConfig>, ConfigError> {
    let Some(node_id) = &args.node_id else {
        for (option, given) in [
            ("--advertise-url", args.advertise_url.is_some()),
            ("--cluster-secret", args.cluster_secret.is_some()),
        ] {
            if given {
                return Err(ConfigError(format!(
                    "{option} needs --node-id (it configures one node of several)"
                )));
            }
        }
        return Ok(None);
    };
    let missing: Vec<&str> = [
        ("--mysql-url", args.mysql_url.is_none()),
        ("--redis-url", args.redis_url.is_none()),
        ("--cluster-secret", args.cluster_secret.is_none()),
    ]
    .into_iter()
    .filter_map(|(option, absent)| absent.then_some(option))
    .collect();
    if !missing.is_empty() {
        return Err(ConfigError(format!(
            "--node-id needs {} (several nodes share their stock in MySQL, their idempotency keys in Redis, and sign their calls to each other with the cluster secret)",
            missing.join(", ")
        )));
    }
    if args.redis_optional {
        return Err(ConfigError(
            "--redis-optional is for one node only: with --node-id a checkout never runs without a guard that covers every node".into(),
        ));
    }
    if args.lease_ttl < Duration::from_secs(2) {
        return Err(ConfigError(format!(
            "--lease-ttl {} is too short: at least 2s (a node renews every fifth of it, and a busy node must not be presumed dead)",
            humantime::format_duration(args.lease_ttl)
        )));
    }
    let advertise_url = match &args.advertise_url {
        Some(url) => Some(check_advertise_url(url)?),
        None if args.listen.ip().is_unspecified() => {
            return Err(ConfigError(format!(
                "--listen {} is an unspecified address, which no other node can reach: give --advertise-url with this node's own address or DNS name",
                args.listen
            )))
        }
        // Known once the listener is bound (`--listen` may name port 0).
        None => None,
    };
    Ok(Some(crate::cluster::ClusterConfig {
        node_id: node_id.clone(),
        advertise_url,
        secret: args.cluster_secret.clone().unwrap_or_default(),
        lease_ttl: args.lease_ttl,
    }))
}

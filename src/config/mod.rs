//! The command line, on `clap` (derive): `serve` (also `turnstile` alone, or `turnstile --listen …`),
//! `migrate`, `gateway-sim`, `mysql-apply` and `notify`, each with a generated `--help`; an unknown
//! option or a bad value exits 2 with clap's message, and a value checked after parsing (a URL that
//! may hold a password, a floor between options) exits 2 with a message naming the option.
//!
//! A `serve` option comes from, in this order: its flag, its environment variable (clap's `env`),
//! the JSON config file (`--config FILE`, keys = option names), its default. clap knows the first two
//! and the default; the file sits between environment and default, so it is read after a first parse
//! and its values are given to a second parse as flags, only for options whose first value was the
//! default (clap's [`ValueSource`]). The config file is refused when its mode lets group or others in
//! (it may hold secrets).
//!
//! Here: the parse and its errors. Beside it: [`cli`] (clap's definitions of every command),
//! [`values`] (the checks of values clap cannot make: durations, URLs, names), [`file`] (the
//! config file layer) and [`serve`] (`ServeConfig`, what `serve` runs with, built from its
//! arguments).
//!
//! Durations are parsed by `humantime` (`500ms`, `90s`, `15m`, `1h`, `7d`), the same parser as the
//! load-test harness's.

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

mod cli;
mod file;
mod serve;
mod values;

pub use cli::*;
use file::*;
pub use serve::*;
pub use values::*;

/// A configuration the server cannot start with; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// What the command line asks for, ready to run.
#[derive(Debug)]
pub enum Invocation {
    /// Run the server.
    Serve(Box<ServeConfig>),
    /// Apply the migrations.
    Migrate(MigrateArgs),
    /// Run the payment gateway simulator.
    GatewaySim(GatewaySimArgs),
    /// Inspect or steer the MySQL applier.
    MysqlApply(MysqlApplyArgs),
    /// Several nodes: an operation on the cluster.
    Cluster(ClusterCommand),
    /// Consume order.paid events.
    Notify(NotifyArgs),
    /// The operations desk of a running server.
    Admin(AdminArgs),
}

/// Why the command line could not be used.
#[derive(Debug)]
pub enum CliError {
    /// clap's own: `--help`, `--version` (exit 0) or a usage error (exit 2), already rendered by clap.
    Clap(clap::Error),
    /// A value clap accepted that the configuration refuses (exit 2).
    Config(ConfigError),
}

impl Invocation {
    /// Registers every secret this command was given (`crate::secrets`): passwords in URLs,
    /// tokens and signing secrets, from flags, environment and config file alike.
    pub fn register_secrets(&self) {
        use crate::secrets::{register, register_url};
        match self {
            Invocation::Serve(config) => {
                if let Some(mysql) = &config.mysql {
                    register_url(&mysql.url);
                }
                if let Some(redis) = &config.redis {
                    register_url(&redis.url);
                }
                if let Some(amqp) = &config.amqp {
                    register_url(&amqp.url);
                }
                for secret in [
                    &config.webhook_secret,
                    &config.admin_token,
                    &config.ticket_secret,
                ]
                .into_iter()
                .flatten()
                {
                    register(secret);
                }
                if let Some(cluster) = &config.cluster {
                    register(&cluster.secret);
                }
            }
            Invocation::Migrate(args) => register_url(&args.mysql_url),
            Invocation::MysqlApply(args) => register_url(&args.mysql_url),
            Invocation::Cluster(ClusterCommand::Forget(args)) => register_url(&args.mysql_url),
            Invocation::Notify(args) => register_url(&args.amqp_url),
            Invocation::Admin(args) => {
                if let Some(token) = &args.token {
                    register(token);
                }
            }
            Invocation::GatewaySim(args) => {
                if let Some(secret) = &args.webhook_secret {
                    register(secret);
                }
            }
        }
    }
}

/// Parses the whole command line (`args[0]` is the program name). `turnstile` alone, or with only
/// options, is `serve`.
pub fn parse(args: &[String]) -> Result<Invocation, CliError> {
    let matches = Cli::command()
        .try_get_matches_from(args)
        .map_err(CliError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    let (first, serve_matches) = match cli.command {
        Some(Command::Migrate(args)) => return Ok(Invocation::Migrate(args)),
        Some(Command::GatewaySim(args)) => return Ok(Invocation::GatewaySim(args)),
        Some(Command::MysqlApply(args)) => return Ok(Invocation::MysqlApply(args)),
        Some(Command::Cluster(command)) => return Ok(Invocation::Cluster(command)),
        Some(Command::Admin(args)) => return Ok(Invocation::Admin(args)),
        Some(Command::Notify(args)) => {
            check_amqp_url(&args.amqp_url).map_err(CliError::Config)?;
            return Ok(Invocation::Notify(args));
        }
        Some(Command::Serve(args)) => (
            *args,
            matches.subcommand_matches("serve").unwrap_or(&matches),
        ),
        None => (cli.serve, &matches),
    };
    let Some(path) = first.config.clone() else {
        return serve_config(first).map(|c| Invocation::Serve(Box::new(c)));
    };
    // The file's values fill the options that only had their default.
    let file = read_config_file(&path).map_err(CliError::Config)?;
    let options = ServeArgs::augment_args(clap::Command::new("serve"));
    // A switch (`--mysql-write-behind`, `--no-pin`) takes no value: `true` names it, `false`
    // leaves it off.
    let is_switch = |id: &str| {
        options.get_arguments().any(|a| {
            a.get_id().as_str() == id && matches!(a.get_action(), clap::ArgAction::SetTrue)
        })
    };
    let mut injected: Vec<String> = Vec::new();
    for (id, value) in &file {
        if serve_matches.value_source(id) == Some(ValueSource::DefaultValue)
            || serve_matches.value_source(id).is_none()
        {
            let flag = format!("--{}", id.replace('_', "-"));
            if !is_switch(id) {
                injected.push(format!("{flag}={value}"));
            } else if value == "true" {
                injected.push(flag);
            } else if value != "false" {
                return Err(CliError::Config(ConfigError(format!(
                    "config file {}: {id} is a switch: true or false, not {value:?}",
                    path.display()
                ))));
            }
        }
    }
    // A second parse of the file's values followed by the command line's: a flag given twice
    // takes its last value, so the command line wins; the environment still fills what neither
    // names; the file named none of the options the environment or the command line set.
    let given = match matches.subcommand_name() {
        Some(_) => &args[2..],
        None => &args[1..],
    };
    injected.extend(given.iter().cloned());
    let command = ServeArgs::augment_args(clap::Command::new("turnstile serve"))
        .no_binary_name(true)
        .args_override_self(true);
    let file_matches = command.try_get_matches_from(&injected).map_err(|error| {
        CliError::Config(ConfigError(format!(
            "config file {}: {}",
            path.display(),
            error
                .render()
                .to_string()
                .trim_start_matches("error: ")
                .trim()
        )))
    })?;
    let merged = ServeArgs::from_arg_matches(&file_matches).map_err(CliError::Clap)?;
    serve_config(merged).map(|c| Invocation::Serve(Box::new(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Tests that set `TURNSTILE_*` variables run one at a time.
    static ENV: Mutex<()> = Mutex::new(());

    fn serve(list: &[&str]) -> Result<ServeConfig, CliError> {
        let args: Vec<String> = std::iter::once("turnstile")
            .chain(list.iter().copied())
            .map(str::to_owned)
            .collect();
        match parse(&args)? {
            Invocation::Serve(config) => Ok(*config),
            other => panic!("not serve: {other:?}"),
        }
    }

    fn message(error: CliError) -> String {
        match error {
            CliError::Clap(error) => error.render().to_string(),
            CliError::Config(error) => error.0,
        }
    }

    /// Runs `f` with these environment variables set, then removes them.
    fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // Only `vars` count: the environment the tests run in (TURNSTILE_RUNTIME, say) is put
        // aside meanwhile.
        let outer: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with("TURNSTILE_"))
            .collect();
        for (name, _) in &outer {
            std::env::remove_var(name);
        }
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
        let result = f();
        for (name, _) in vars {
            std::env::remove_var(name);
        }
        for (name, value) in outer {
            std::env::set_var(name, value);
        }
        result
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_env_and_flags_in_order() {
        with_env(&[], || {
            let config = serve(&[]).unwrap();
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.hold_ttl, Duration::from_secs(900));
        });
        with_env(&[("TURNSTILE_LISTEN", "127.0.0.1:9000")], || {
            assert_eq!(serve(&[]).unwrap().listen.port(), 9000);
            assert_eq!(serve(&["serve"]).unwrap().listen.port(), 9000);
            let flag = serve(&["--listen", "127.0.0.1:9100"]).unwrap();
            assert_eq!(flag.listen.port(), 9100);
            let sub = serve(&["serve", "--listen", "127.0.0.1:9101"]).unwrap();
            assert_eq!(sub.listen.port(), 9101);
        });
        let inline = with_env(&[], || serve(&["--hold-ttl=2s"]).unwrap());
        assert_eq!(inline.hold_ttl, Duration::from_secs(2));
    }

    #[test]
    fn retention_expiry_and_limit_options_default_per_the_contract() {
        // Proves: with nothing set, the options take API.md's defaults.
        let config = with_env(&[], || serve(&[]).unwrap());
        let hours = |n: u64| Duration::from_secs(n * 3_600);
        assert_eq!(config.idempotency_retention, hours(24));
        assert_eq!(config.order_retention, hours(7 * 24));
        assert_eq!(config.event_retention, hours(7 * 24));
        assert_eq!(config.slow_client_timeout, Duration::from_secs(10));
        assert_eq!(config.cart_ttl, hours(1));
        assert_eq!(config.carts_max, 1_000_000);
        assert_eq!(config.connections_max, 10_000);
        assert!(config.tls.is_none());
        assert!(config.socket.nodelay);
        assert_eq!(config.socket.backlog, 4096);
    }

    #[test]
    fn retention_expiry_and_limit_options_come_from_env_and_flags() {
        // Proves: the options are read from their environment variables, and a flag wins over them.
        let env = [
            ("TURNSTILE_IDEMPOTENCY_RETENTION", "48h"),
            ("TURNSTILE_ORDER_RETENTION", "2d"),
            ("TURNSTILE_EVENT_RETENTION", "30d"),
            ("TURNSTILE_SLOW_CLIENT_TIMEOUT", "3s"),
            ("TURNSTILE_CART_TTL", "20m"),
            ("TURNSTILE_CARTS_MAX", "500"),
            ("TURNSTILE_CONNECTIONS_MAX", "64"),
        ];
        let (config, flags) = with_env(&env, || {
            (
                serve(&[]).unwrap(),
                serve(&[
                    "--slow-client-timeout",
                    "250ms",
                    "--connections-max=2",
                    "--carts-max",
                    "7",
                    "--cart-ttl",
                    "90s",
                    "--order-retention",
                    "1h",
                ])
                .unwrap(),
            )
        });
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
        assert_eq!(flags.slow_client_timeout, Duration::from_millis(250));
        assert_eq!(flags.connections_max, 2);
        assert_eq!(flags.carts_max, 7);
        assert_eq!(flags.cart_ttl, Duration::from_secs(90));
        assert_eq!(flags.order_retention, Duration::from_secs(3_600));
    }

    #[test]
    fn a_retention_shorter_than_a_checkout_can_take_is_refused_naming_it() {
        // Proves: each retention must outlive --gateway-timeout plus --journal-timeout (an answer
        // gone before the retry that was told "outcome unknown" would let that retry buy twice);
        // the refusal is a configuration error naming the option and the floor.
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for option in [
            "--idempotency-retention",
            "--order-retention",
            "--event-retention",
        ] {
            for short in ["1ns", "1s", "10s"] {
                let text = message(serve(&[option, short]).unwrap_err());
                assert!(text.contains(option), "{option} {short}: {text}");
                assert!(text.contains("10s"), "the floor is named: {text}");
            }
            assert!(serve(&[option, "11s"]).is_ok(), "{option} 11s");
            // The floor follows the timeouts.
            let shorter = [
                option,
                "1s",
                "--gateway-timeout",
                "250ms",
                "--journal-timeout",
                "500ms",
            ];
            assert!(serve(&shorter).is_ok(), "{shorter:?}");
        }
    }

    #[test]
    fn service_urls_are_checked_without_being_shown() {
        // Proves: a gateway URL with credentials (never sent, but written wherever the URL is) or
        // a bad port, and a MySQL URL its driver cannot use, are configuration errors naming the
        // option and never the value.
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for bad in [
            "http://merchant:SECRETPW@127.0.0.1:8090",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://:8090",
            "http://[x",
            "http://pay.example.com/?api_key=SECRETPW",
            "http://pay.example.com/#SECRETPW",
            "ftp://127.0.0.1:8090",
        ] {
            let text = message(serve(&["--gateway-url", bad]).unwrap_err());
            assert!(text.contains("--gateway-url"), "{bad}: {text}");
            assert!(!text.contains(bad) && !text.contains("SECRETPW"), "{text}");
        }
        for fine in [
            "http://127.0.0.1:8090/",
            "https://pay.example.com",
            "http://[::1]:8090",
        ] {
            let config = serve(&["--gateway-url", fine]).unwrap();
            assert_eq!(
                config.gateway_url.as_deref(),
                Some(fine.trim_end_matches('/'))
            );
        }
        let text = message(serve(&["--mysql-url", "mysql://u:SECRETPW@h:99999/db"]).unwrap_err());
        assert!(
            text.contains("--mysql-url") && !text.contains("SECRETPW"),
            "{text}"
        );
    }

    #[test]
    fn several_nodes_need_their_companions_and_a_reachable_address() {
        // Proves: --node-id names whatever it lacks (MySQL, Redis, the cluster secret), refuses a
        // name that is not a DNS label, an unspecified address to advertise, --redis-optional and
        // a lease too short to renew; its companions without it are refused; a full set works.
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let text = message(serve(&["--node-id", "node-1"]).unwrap_err());
        for missing in ["--mysql-url", "--redis-url", "--cluster-secret"] {
            assert!(text.contains(missing), "{text}");
        }
        let full = [
            "--node-id",
            "node-1",
            "--mysql-url",
            "mysql://root@127.0.0.1:3306/test",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--cluster-secret",
            "s3cret",
        ];
        let config = serve(&full).unwrap();
        let cluster = config.cluster.expect("a cluster config");
        assert_eq!(cluster.node_id, "node-1");
        assert_eq!(cluster.advertise_url, None, "known once bound");
        assert_eq!(cluster.lease_ttl, Duration::from_secs(10));
        for bad in [
            "--node-id=Node-1",
            "--node-id=-node",
            "--node-id=node_1",
            "--node-id=node-",
            "--node-id=",
        ] {
            let mut args = full[2..].to_vec();
            args.push(bad);
            let text = message(serve(&args).unwrap_err());
            assert!(text.contains("--node-id"), "{bad:?}: {text}");
        }
        let with = |extra: &[&str]| {
            let mut args = full.to_vec();
            args.extend_from_slice(extra);
            serve(&args)
        };
        let text = message(with(&["--listen", "0.0.0.0:8080"]).unwrap_err());
        assert!(text.contains("--advertise-url"), "{text}");
        let text = message(with(&["--advertise-url", "http://0.0.0.0:8080"]).unwrap_err());
        assert!(text.contains("unspecified"), "{text}");
        let given = with(&[
            "--listen",
            "0.0.0.0:8080",
            "--advertise-url",
            "http://turnstile-0.turnstile:8080/",
        ])
        .unwrap();
        assert_eq!(
            given.cluster.and_then(|c| c.advertise_url).as_deref(),
            Some("http://turnstile-0.turnstile:8080")
        );
        let text = message(with(&["--redis-optional"]).unwrap_err());
        assert!(text.contains("--redis-optional"), "{text}");
        let text = message(with(&["--lease-ttl", "1s"]).unwrap_err());
        assert!(text.contains("--lease-ttl"), "{text}");
        let text = message(serve(&["--cluster-secret", "s"]).unwrap_err());
        assert!(text.contains("needs --node-id"), "{text}");
        let text = message(serve(&["--advertise-url", "http://10.0.0.1:8080"]).unwrap_err());
        assert!(text.contains("needs --node-id"), "{text}");
    }

    #[test]
    fn redis_lock_and_optional_and_the_admin_token_are_checked() {
        // Proves: --redis-optional without Redis, a lock shorter than a checkout may take, and a
        // weak admin token are refused naming the option (and the token itself never shown).
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let redis = ["--redis-url", "redis://127.0.0.1:6379"];
        let text = message(serve(&["--redis-optional"]).unwrap_err());
        assert!(
            text.contains("--redis-optional needs --redis-url"),
            "{text}"
        );
        let optional = serve(&[redis[0], redis[1], "--redis-optional"]).unwrap();
        assert!(optional.redis_optional);
        let text = message(serve(&[redis[0], redis[1], "--redis-lock-ttl", "10s"]).unwrap_err());
        assert!(text.contains("--redis-lock-ttl"), "{text}");
        let short = serve(&[
            redis[0],
            redis[1],
            "--redis-lock-ttl",
            "3s",
            "--gateway-timeout",
            "1s",
            "--journal-timeout",
            "1s",
            "--redis-timeout",
            "300ms",
        ])
        .unwrap();
        assert_eq!(
            short.redis.map(|r| r.lock_ttl),
            Some(Duration::from_secs(3))
        );
        for weak in ["short-token", "sixteen chars!!!", "é-not-ascii-token-x"] {
            let text = message(serve(&["--admin-token", weak]).unwrap_err());
            assert!(text.contains("--admin-token"), "{text}");
            assert!(!text.contains(weak), "the token is never shown: {text}");
        }
        let fine = serve(&["--admin-token", "0123456789abcdef"]).unwrap();
        assert_eq!(fine.admin_token.as_deref(), Some("0123456789abcdef"));
    }

    #[test]
    fn bad_input_is_refused_with_clap_usage_errors_naming_the_option() {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for bad in [
            vec!["--nope", "1"],
            vec!["--listen"],
            vec!["--listen", "nowhere"],
            vec!["--hold-ttl", "5x"],
            vec!["stray"],
            vec!["--idempotency-retention", "0s"],
            vec!["--order-retention", "0"],
            vec!["--event-retention", "0d"],
            vec!["--event-retention", "a week"],
            vec!["--slow-client-timeout", "0ms"],
            vec!["--slow-client-timeout=-1s"],
            vec!["--cart-ttl", "0h"],
            vec!["--carts-max", "0"],
            vec!["--carts-max", "many"],
            vec!["--carts-max=-5"],
            vec!["--connections-max", "0"],
            vec!["--connections-max", "1.5"],
            vec!["--connections-max", "99999999999"],
            vec!["--tls-min", "1.1"],
            vec!["--hold-ttl", "200000000000d"],
            vec!["--idempotency-retention", "106751991167d"],
            vec!["--webhook-secret", ""],
        ] {
            match serve(&bad) {
                Err(CliError::Clap(error)) => {
                    assert_eq!(error.exit_code(), 2, "{bad:?}");
                    let text = error.render().to_string();
                    let name = bad[0].split('=').next().unwrap_or_default();
                    if name.starts_with("--") && (bad.len() > 1 || bad[0].contains('=')) {
                        assert!(text.contains(name), "{bad:?}: {text}");
                    }
                }
                other => panic!("{bad:?} was not refused by clap: {other:?}"),
            }
        }
        // Accepted by clap, refused by this build, with a message naming the option.
        let error = serve(&["--redis-url", "rediss://:secret@x"]).unwrap_err();
        let text = message(error);
        assert!(
            text.contains("--redis-url") && !text.contains("secret"),
            "{text}"
        );
        let error = serve(&["--redis-url", "http://x"]).unwrap_err();
        assert!(message(error).contains("--redis-url"));
        let config = serve(&[
            "--redis-url",
            "redis://127.0.0.1:6379/2",
            "--redis-prefix",
            "t1:",
        ])
        .unwrap();
        let redis = config.redis.expect("redis configured");
        assert_eq!(
            (redis.prefix.as_str(), redis.timeout),
            ("t1:", Duration::from_secs(1))
        );
        assert!(serve(&["--redis-prefix", "a{b}"]).is_err());
        // A Redis Cluster's nodes, comma-separated: redis:// URLs only, none shown back.
        assert!(serve(&["--redis-url", "redis://10.0.0.1:6379,redis://10.0.0.2:6379"]).is_ok());
        for bad in [
            "redis://:hunter2@10.0.0.1:6379,",
            "redis://:hunter2@10.0.0.1:6379,redis+unix:///tmp/r.sock",
            "redis://:hunter2@10.0.0.1:6379,http://b",
        ] {
            let text = message(serve(&["--redis-url", bad]).unwrap_err());
            assert!(
                text.contains("Redis Cluster") && !text.contains("hunter2"),
                "{bad}: {text}"
            );
        }
        // A bad MySQL URL is refused without echoing it (it may hold a password).
        let error = message(serve(&["--mysql-url", "postgres://u:hunter2@h/db"]).unwrap_err());
        assert!(
            error.contains("--mysql-url") && !error.contains("hunter2"),
            "{error}"
        );
        // One that names no database is refused now, not at the first statement.
        for url in ["mysql://u:hunter2@h:3306/", "mysql://u:hunter2@h:3306"] {
            let error = message(serve(&["--mysql-url", url]).unwrap_err());
            assert!(
                error.contains("names no database") && !error.contains("hunter2"),
                "{error}"
            );
        }
        // A bad AMQP URL, or amqps:// (no TLS to the broker in this build), is refused without
        // echoing it; a good one configures the relay with the contract's defaults.
        for bad in [
            "http://guest:hunter2@h:5672/%2f",
            "amqps://guest:hunter2@h:5671/%2f",
            "amqp://",
        ] {
            let error = message(serve(&["--amqp-url", bad]).unwrap_err());
            assert!(
                error.contains("--amqp-url") && !error.contains("hunter2"),
                "{error}"
            );
        }
        let relay = serve(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"])
            .unwrap()
            .amqp
            .expect("the relay is configured");
        assert_eq!(relay.exchange, "turnstile.orders");
        assert_eq!(relay.window, 1_024);
        let notify = |list: &[&str]| {
            let args: Vec<String> = ["turnstile", "notify"]
                .iter()
                .chain(list)
                .map(|s| (*s).to_owned())
                .collect();
            parse(&args)
        };
        assert!(
            matches!(notify(&[]), Err(CliError::Clap(_))),
            "notify needs --amqp-url"
        );
        match notify(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"]) {
            Ok(Invocation::Notify(args)) => {
                assert_eq!(args.queue, "turnstile.notify");
                assert_eq!(args.max_attempts, 5);
                assert_eq!(args.state, PathBuf::from("./notify-state"));
            }
            other => panic!("not notify: {other:?}"),
        }
        // Each TLS file needs the other, checked once every source is merged.
        let error = serve(&["--tls-cert", "cert.pem"]).unwrap_err();
        assert!(message(error).contains("--tls-key"));
        let error = serve(&["--tls-key", "key.pem"]).unwrap_err();
        assert!(message(error).contains("--tls-cert"));
    }

    #[test]
    fn the_tls_cert_and_key_may_come_from_different_sources() {
        // Proves: the certificate from a flag or the environment and its key from the config
        // file (or the other way round) make one TLS configuration; clap's first parse, before
        // the file is read, does not refuse the half it sees.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnstile.json");
        let path_arg = path.display().to_string();
        let write = |json: &str| {
            std::fs::write(&path, json).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(r#"{"tls-key": "/etc/key.pem"}"#);
        for (vars, flags) in [
            (vec![("TURNSTILE_TLS_CERT", "/etc/cert.pem")], vec![]),
            (vec![], vec!["--tls-cert", "/etc/cert.pem"]),
        ] {
            let mut args = vec!["--config", path_arg.as_str()];
            args.extend(flags);
            let config = with_env(&vars, || serve(&args).unwrap());
            let tls = config.tls.expect("tls");
            assert_eq!(tls.cert, PathBuf::from("/etc/cert.pem"));
            assert_eq!(tls.key, PathBuf::from("/etc/key.pem"));
        }
        write(r#"{"tls_cert": "/etc/cert.pem"}"#);
        let config = with_env(&[("TURNSTILE_TLS_KEY", "/etc/key.pem")], || {
            serve(&["--config", &path_arg]).unwrap()
        });
        assert_eq!(config.tls.expect("tls").key, PathBuf::from("/etc/key.pem"));
    }

    #[test]
    fn durations_use_one_parser() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
        // Past 100 years a duration would overflow the milliseconds it becomes.
        assert_eq!(parse_duration("36500d"), Ok(DURATION_MAX));
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("200000000000d").is_err());
    }

    #[test]
    fn the_config_file_must_be_private_and_sits_between_env_and_defaults() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnstile.json");
        std::fs::write(
            &path,
            r#"{"listen": "127.0.0.1:9200", "hold_ttl": "1m", "carts-max": 9, "cart-ttl": "2m"}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path_arg = path.display().to_string();
        let error = with_env(&[], || serve(&["--config", &path_arg]).unwrap_err());
        assert!(message(error).contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = with_env(&[("TURNSTILE_CART_TTL", "3m")], || {
            serve(&["--config", &path_arg, "--carts-max", "11"]).unwrap()
        });
        assert_eq!(config.listen.port(), 9200, "file over default");
        assert_eq!(
            config.hold_ttl,
            Duration::from_secs(60),
            "file over default"
        );
        assert_eq!(config.carts_max, 11, "flag over file");
        assert_eq!(config.cart_ttl, Duration::from_secs(180), "env over file");
        // The file through the environment, too.
        let config = with_env(&[("TURNSTILE_CONFIG", &path_arg)], || serve(&[]).unwrap());
        assert_eq!(config.listen.port(), 9200);
        // A bad value, an unknown key or one option set twice in the file names the file.
        for bad in [
            r#"{"hold-ttl": "soon"}"#,
            r#"{"holdttl": "1m"}"#,
            r#"{"listen": [1]}"#,
            r#"{"hold-ttl": "1m", "hold_ttl": "2m"}"#,
            r#"{"no-pin": "maybe"}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let error = with_env(&[], || serve(&["--config", &path_arg]).unwrap_err());
            let text = message(error);
            assert!(text.contains(&path_arg), "{bad}: {text}");
        }
        // Switches take true or false in the file (a switch takes no value on the command line).
        std::fs::write(
            &path,
            r#"{"no-pin": true, "runtime": "shared", "workers": 3, "tcp-nodelay": false}"#,
        )
        .unwrap();
        let config = with_env(&[], || serve(&["--config", &path_arg]).unwrap());
        assert!(!config.pin);
        assert_eq!(config.runtime, RuntimeKind::Shared);
        assert_eq!(config.workers, Some(3));
        assert!(!config.socket.nodelay);
        std::fs::write(&path, r#"{"no-pin": false}"#).unwrap();
        let config = with_env(&[], || serve(&["--config", &path_arg]).unwrap());
        assert!(config.pin);
    }

    #[test]
    fn the_runtime_defaults_to_per_core_pinned_with_a_worker_per_core() {
        let config = with_env(&[], || serve(&[]).unwrap());
        assert_eq!(config.runtime, RuntimeKind::PerCore);
        assert_eq!(config.workers, None);
        assert!(config.pin);
        let config = with_env(&[("TURNSTILE_RUNTIME", "shared")], || {
            serve(&["--workers", "4", "--no-pin"]).unwrap()
        });
        assert_eq!(config.runtime, RuntimeKind::Shared);
        assert_eq!(config.workers, Some(4));
        assert!(!config.pin);
        let config = with_env(&[], || serve(&["--no-pin", "--pin"]).unwrap());
        assert!(config.pin, "the last of --pin/--no-pin wins");
        for bad in [&["--workers", "0"][..], &["--runtime", "fibers"]] {
            assert!(with_env(&[], || serve(bad)).is_err(), "{bad:?}");
        }
    }
}

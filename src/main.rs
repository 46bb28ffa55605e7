//! The `turnstile` binary: parses the command line, sets up tracing, calls the library.

use mimalloc::MiMalloc;
use std::process::ExitCode;
use turnstile::config;
use turnstile::secrets::Scrubbing;
use turnstile::server;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A command's own words on standard error, scrubbed of every secret it was given
/// (`turnstile::secrets`).
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("{}", turnstile::secrets::scrub(&format!($($arg)*)))
    };
}

/// Standard error for logs, where a failed write is dropped: a log line lost to a full disk or a
/// closed pipe must never take a thread of the server down with it (tracing's own fallback for a
/// failed write prints to standard error, and panics when that fails too).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// A log file, where a failed write is dropped (as [`LossyStderr`]).
struct LossyFile(std::fs::File);

impl std::io::Write for LossyFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Sets up the log: `RUST_LOG` (default `info`), as text or JSON lines, to standard error or
/// appended to a file (`serve --log-format`, `--log-file`).
fn init_logs(
    format: config::LogFormat,
    file: Option<&std::path::Path>,
) -> Result<(), std::io::Error> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, ansi) = match file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            (
                BoxMakeWriter::new(std::sync::Mutex::new(Scrubbing(LossyFile(file)))),
                false,
            )
        }
        None => (
            BoxMakeWriter::new(|| Scrubbing(LossyStderr)),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        config::LogFormat::Text => builder.with_ansi(ansi).init(),
        config::LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Non-UTF-8 arguments reach clap as they are, and it refuses them with its message.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let parsed = config::parse(&args);
    // Every secret given, before the first log line (`turnstile::secrets`).
    if let Ok(invocation) = &parsed {
        invocation.register_secrets();
    }
    let (format, file) = match &parsed {
        Ok(config::Invocation::Serve(config)) => (config.log_format, config.log_file.clone()),
        _ => (config::LogFormat::Text, None),
    };
    if let Err(error) = init_logs(format, file.as_deref()) {
        say!(
            "turnstile: cannot open the log file {}: {error}",
            file.as_deref()
                .map_or_else(String::new, |p| p.display().to_string())
        );
        return ExitCode::from(2);
    }
    let invocation = match parsed {
        Ok(invocation) => invocation,
        Err(config::CliError::Clap(error)) => {
            // `--help` and `--version` (exit 0) print to stdout; usage errors to stderr (exit 2).
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
        Err(config::CliError::Config(error)) => {
            say!("turnstile: {error}");
            return ExitCode::from(2);
        }
    };
    match invocation {
        config::Invocation::Serve(config) => match server::run(*config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(
                error @ (server::ServeError::Schema(_)
                | server::ServeError::DataDir(_)
                | server::ServeError::Tls(_)
                | server::ServeError::Listen { .. }),
            ) => {
                say!("turnstile serve: {error}");
                ExitCode::from(2)
            }
            Err(error) => {
                tracing::error!(%error, "turnstile stopped");
                ExitCode::FAILURE
            }
        },
        config::Invocation::Migrate(args) => migrate(args),
        config::Invocation::MysqlApply(args) => mysql_apply(args),
        config::Invocation::Cluster(config::ClusterCommand::Forget(args)) => forget(args),
        config::Invocation::Notify(args) => notify(args),
        config::Invocation::Admin(args) => match turnstile::admin_cli::run(args) {
            Ok(text) => {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                let _ = stdout
                    .write_all(text.as_bytes())
                    .and_then(|()| stdout.flush());
                ExitCode::SUCCESS
            }
            Err(error @ turnstile::admin_cli::AdminError::Usage(_)) => {
                say!("turnstile admin: {error}");
                ExitCode::from(2)
            }
            Err(error) => {
                say!("turnstile admin: {error}");
                ExitCode::FAILURE
            }
        },
        config::Invocation::GatewaySim(args) => match turnstile::payment::gateway_sim::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error @ turnstile::payment::gateway_sim::SimError::Usage(_)) => {
                say!("turnstile gateway-sim: {error}");
                ExitCode::from(2)
            }
            Err(error) => {
                tracing::error!(%error, "gateway-sim stopped");
                ExitCode::FAILURE
            }
        },
    }
}

/// What a MySQL command needs: its URL checked (exit 2 if unusable) and a runtime to run on.
fn mysql_tool(
    command: &str,
    url: String,
) -> Result<
    (
        tokio::runtime::Runtime,
        turnstile::journal::mysql::MySqlConfig,
    ),
    ExitCode,
> {
    if let Err(error) = config::check_mysql_url(&url) {
        say!("turnstile {command}: {error}");
        return Err(ExitCode::from(2));
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Ok((runtime, turnstile::journal::mysql::MySqlConfig::new(url))),
        Err(error) => {
            say!("turnstile {command}: cannot start the runtime: {error}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// `turnstile mysql-apply`: the applier's state; `--skip LSN`, `--replay-from LSN`.
fn mysql_apply(args: config::MysqlApplyArgs) -> ExitCode {
    use turnstile::journal::mysql::apply_tool;
    let (runtime, mut config) = match mysql_tool("mysql-apply", args.mysql_url) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    config.node = args.node.unwrap_or_default();
    let outcome = runtime.block_on(async {
        if let Some(lsn) = args.skip {
            apply_tool::skip(&config, lsn, &args.reason).await?;
            say!("turnstile mysql-apply: record {lsn} will be skipped (a running applier goes on within a second)");
        }
        if let Some(after) = args.replay_from {
            let applied = apply_tool::replay(&config, after).await?;
            say!("turnstile mysql-apply: replayed the journal after lsn {after}: {applied} record(s) newly applied");
        }
        apply_tool::status(&config).await
    });
    match outcome {
        Ok(status) => {
            // The one line a script reads: stdout.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{status}");
            ExitCode::SUCCESS
        }
        // A URL, schema or lsn the operator must change: exit 2.
        Err(
            error @ (turnstile::journal::mysql::SchemaError::Refused(_)
            | turnstile::journal::mysql::SchemaError::Unmigrated { .. }
            | turnstile::journal::mysql::SchemaError::Newer { .. }
            | turnstile::journal::mysql::SchemaError::NotSkippable { .. }
            | turnstile::journal::mysql::SchemaError::WhichNode { .. }),
        ) => {
            say!("turnstile mysql-apply: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            say!("turnstile mysql-apply: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `turnstile cluster forget NODE`: a dead node's disk declared lost.
fn forget(args: config::ForgetArgs) -> ExitCode {
    use turnstile::cluster::forget::{self, ForgetError};
    use turnstile::journal::mysql::SchemaError;
    let (runtime, config) = match mysql_tool("cluster forget", args.mysql_url) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match runtime.block_on(forget::forget(&config, &args.node, args.lease_ttl)) {
        Ok(done) => {
            use std::io::Write;
            // The node reports its last event seq at its renewals only: what it acknowledged
            // after its last report (until --lease-ttl past its last renewal) is not counted.
            let after = "what it acknowledged after its last report (it reports at every renewal, and records for up to --lease-ttl after its last one) cannot be counted here and is lost too";
            let lost = match done.lost_events {
                Some((first, last)) => format!(
                    "by its last report, {} event(s) it acknowledged (seqs {first}..={last}: orders placed or changed) never reached MySQL and are lost with its disk; {after}",
                    last - first + 1
                ),
                None => format!("every event it reported is in MySQL; {after}"),
            };
            let _ = writeln!(
                std::io::stdout(),
                "node {} forgotten: {} unit(s) of its lease back in the pool; {lost}; {} open order(s) go to a live node",
                args.node, done.returned, done.open_orders
            );
            ExitCode::SUCCESS
        }
        Err(
            error @ (ForgetError::Refused(_)
            | ForgetError::Schema(
                SchemaError::Refused(_)
                | SchemaError::Unmigrated { .. }
                | SchemaError::Newer { .. },
            )),
        ) => {
            say!("turnstile cluster forget: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            say!("turnstile cluster forget: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `turnstile notify`: consumes `order.paid` until SIGTERM or Ctrl-C.
fn notify(args: config::NotifyArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            say!("turnstile notify: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = turnstile::events::notify::NotifyConfig {
        url: args.amqp_url,
        exchange: args.amqp_exchange,
        queue: args.queue,
        out: args.out,
        state: args.state,
        max_attempts: args.max_attempts,
        prefetch: args.prefetch,
    };
    // The signal handlers need the runtime: installed inside it.
    match runtime.block_on(async {
        turnstile::events::notify::run(config, turnstile::server::stop_signal()).await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            say!("turnstile notify: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `turnstile migrate --mysql-url URL`: applies the embedded migrations.
fn migrate(args: config::MigrateArgs) -> ExitCode {
    let (runtime, config) = match mysql_tool("migrate", args.mysql_url) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    match runtime.block_on(turnstile::journal::mysql::migrate(&config)) {
        Ok(applied) => {
            say!("turnstile migrate: {applied} migration(s) applied; the schema is current");
            ExitCode::SUCCESS
        }
        // A login or database the server refuses: the URL must change (exit 2).
        Err(error @ turnstile::journal::mysql::SchemaError::Refused(_)) => {
            say!("turnstile migrate: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            say!("turnstile migrate: {error}");
            ExitCode::FAILURE
        }
    }
}

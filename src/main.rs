//! The `turnstile` binary: parses the command line, sets up tracing, calls the library.

use mimalloc::MiMalloc;
use std::process::ExitCode;
use turnstile::config;
use turnstile::server;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const USAGE: &str = "\
turnstile: a checkout engine for flash sales

Usage:
  turnstile [serve] [OPTIONS]      run the checkout server (the default command)
  turnstile migrate --mysql-url URL  apply the MySQL/MariaDB migrations (env TURNSTILE_MYSQL_URL)
  turnstile gateway-sim [OPTIONS]  stand-alone payment gateway simulator (not in this build yet)
  turnstile help                   this help; `turnstile serve --help` lists serve's options

Exit codes: 0 normal stop, 1 runtime failure, 2 bad usage or configuration.";

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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.first().map(String::as_str) {
        None => ("serve", &args[..]),
        Some(first) if first.starts_with("--") || first == "-h" => ("serve", &args[..]),
        Some(first) => (first, &args[1..]),
    };
    match command {
        "serve" => {
            if rest.iter().any(|a| a == "-h" || a == "--help") {
                eprint!("{}", config::serve_help());
                return ExitCode::SUCCESS;
            }
            let config = match config::parse_serve(rest, &|name| std::env::var(name).ok()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("turnstile serve: {error}");
                    return ExitCode::from(2);
                }
            };
            match server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error @ (server::ServeError::Schema(_) | server::ServeError::DataDir(_))) => {
                    eprintln!("turnstile serve: {error}");
                    ExitCode::from(2)
                }
                Err(error) => {
                    tracing::error!(%error, "turnstile stopped");
                    ExitCode::FAILURE
                }
            }
        }
        "help" | "-h" | "--help" => {
            eprintln!("{USAGE}");
            ExitCode::SUCCESS
        }
        "migrate" => migrate(rest),
        "gateway-sim" => {
            eprintln!("turnstile {command}: not available in this build yet\n\n{USAGE}");
            ExitCode::from(2)
        }
        other => {
            eprintln!("turnstile: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `turnstile migrate --mysql-url URL`: applies the embedded migrations.
fn migrate(args: &[String]) -> ExitCode {
    let mut url = std::env::var("TURNSTILE_MYSQL_URL").ok();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                eprintln!("Usage: turnstile migrate --mysql-url URL\n\nApplies the migrations embedded in this binary to the MySQL/MariaDB database (env TURNSTILE_MYSQL_URL). Safe to run again: applied migrations are skipped.");
                return ExitCode::SUCCESS;
            }
            "--mysql-url" => url = rest.next().cloned(),
            other => match other.strip_prefix("--mysql-url=") {
                Some(value) => url = Some(value.to_owned()),
                None => {
                    eprintln!("turnstile migrate: unknown argument {other:?} (see --help)");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let Some(url) = url else {
        eprintln!("turnstile migrate: --mysql-url URL is required (or set TURNSTILE_MYSQL_URL)");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("turnstile migrate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = turnstile::journal::mysql::MySqlConfig::new(url);
    match runtime.block_on(turnstile::journal::mysql::migrate(&config)) {
        Ok(applied) => {
            eprintln!("turnstile migrate: {applied} migration(s) applied; the schema is current");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("turnstile migrate: {error}");
            ExitCode::FAILURE
        }
    }
}

//! The `turnstile` binary: parses the command line, sets up tracing, calls the library.

use mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;
use turnstile::server::{self, ServeOptions};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const USAGE: &str = "\
turnstile: a checkout engine for flash sales

Usage:
  turnstile [serve] [--data-dir DIR]

Commands:
  serve    start the engine on the embedded journal (the default command)

Options:
  --data-dir DIR   where the embedded journal lives (env TURNSTILE_DATA_DIR; default ./data)
  -h, --help       print this help

The HTTP API arrives with the next release; for now `serve` recovers the journal, rebuilds the
engine, says so, and waits for SIGTERM or Ctrl-C.";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("serve") {
        args.next();
    }
    let mut data_dir = std::env::var_os("TURNSTILE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("./data"));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--data-dir" => match args.next() {
                Some(dir) => data_dir = PathBuf::from(dir),
                None => {
                    eprintln!("turnstile: --data-dir needs a directory\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("turnstile: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match server::run(ServeOptions { data_dir }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "turnstile stopped");
            ExitCode::FAILURE
        }
    }
}

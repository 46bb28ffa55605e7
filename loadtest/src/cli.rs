//! The command line, on clap: generated `--help` for every subcommand, unknown options and bad
//! values refused with clap's message (exit 2), durations parsed by `humantime` as the server
//! parses its own (`500ms`, `10s`, `2m`, `1h`, `7d`).

use crate::scenario::Kind;
use crate::target::Target;
use crate::tls::Trust;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Drives a Turnstile server (or a reference server of a classic design) with a flash-sale,
/// steady or cart scenario over keep-alive HTTP/1.1 or HTTP/2, plain or over TLS, reports
/// latencies and throughput, and checks the invariants afterwards (exit 1 if one is broken).
/// Every run is bounded by --duration and --requests and stops by itself.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One hot SKU with --stock units, far more buyers than units, a share of double submits
    /// (one key sent twice) and of declined cards.
    FlashSale(LoadArgs),
    /// Successful checkouts on --skus SKUs with large stock; a fifth are 3-line baskets.
    Steady(LoadArgs),
    /// Each buyer creates a cart, puts 1–3 lines in it and checks out by cart_id (Turnstile
    /// only: the reference servers serve the item-list form alone).
    Mixed(LoadArgs),
    /// A limited drop: one hot SKU with --stock units and max_per_customer --limit, bought by
    /// --customers customers who each come back many times under new keys (Turnstile only);
    /// checks that no customer got more than the limit.
    Drop(LoadArgs),
    /// Runs one scenario against GET /healthz of the target, Turnstile and the two reference
    /// servers, and prints the ratio tables.
    #[command(long_about = "\
Runs the same scenario against GET /healthz of the target (the machine's HTTP ceiling), Turnstile
at --target and the mysql-for-update and redis-lua references in turn: throughput at saturation
(closed model, --connections each), then latency at one arrival rate every target sustains (open
model, --rate, default 80% of the slowest target's saturated throughput), and prints the ratio
tables. The reference servers speak plain HTTP/1.1; an https:// target is driven over TLS, so its
ratios then include the cost of TLS.")]
    Compare(CompareArgs),
    /// Runs a reference server of a classic design and prints `listening on <addr>` (started by
    /// --target-kind and compare; stops on Ctrl-C).
    ServeReference(ReferenceArgs),
}

/// Where the load goes and how it is carried.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The Turnstile server to drive: a URL (http://127.0.0.1:8080, https://localhost:8443) or
    /// host:port (plain HTTP). The host is a name or an IP; the path, if any, must be /.
    #[arg(
        long,
        value_name = "URL",
        env = "LOADTEST_TARGET",
        default_value = "127.0.0.1:8080"
    )]
    pub target: Target,
    /// HTTP/2 instead of HTTP/1.1: by prior knowledge (h2c) over http://, by ALPN (h2) over
    /// https://.
    #[arg(long)]
    pub http2: bool,
    /// With https://: accept any server certificate (self-signed test servers), as curl -k does.
    /// The handshake signatures are still checked.
    #[arg(long, conflicts_with = "cacert")]
    pub insecure: bool,
    /// With https://: trust the certificates of this PEM file (a CA, or a self-signed server
    /// certificate) instead of the system's root certificates.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
}

impl TargetArgs {
    /// Which server certificates an https:// target may show.
    pub fn trust(&self) -> Trust {
        match (&self.cacert, self.insecure) {
            (_, true) => Trust::AnyCertificate,
            (Some(path), false) => Trust::CaFile(path.clone()),
            (None, false) => Trust::SystemRoots,
        }
    }
}

/// The bounds of a run and the scenario's parameters, shared by the load commands and compare.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Keep-alive connections (the closed model's concurrency, the open model's pool).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,
    /// How long to send, e.g. 500ms, 10s, 2m.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The most requests sent, whatever the duration.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub requests: u64,
    /// flash-sale: units of the hot SKU.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    pub stock: i64,
    /// steady, mixed: SKUs.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub skus: u64,
    /// flash-sale: percent of buyers who submit twice with one key.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub double_percent: u64,
    /// flash-sale, drop: percent of buyers whose card is declined.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub decline_percent: u64,
    /// drop: the product's max_per_customer.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// drop: how many customers share the requests (0: as many as --stock units).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub customers: u64,
    /// drop: the product's admission_rate (buyers per second through its waiting room): every buyer takes a ticket, waits for it and checks out with it, and a live stock stream watches for sold_out
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub admission_rate: Option<u32>,
    /// The database of the reference servers.
    #[arg(
        long,
        value_name = "URL",
        env = "LOADTEST_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    pub mysql_url: String,
    /// Redis for the redis-lua reference.
    #[arg(
        long,
        value_name = "URL",
        env = "LOADTEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
}

/// `flash-sale`, `steady` and `mixed`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// turnstile (the server at --target), or a reference server of the classic design that the
    /// harness starts itself (--target is then ignored).
    #[arg(long, value_name = "KIND", value_enum, default_value_t = TargetKind::Turnstile)]
    pub target_kind: TargetKind,
    /// open: a constant arrival rate, latency measured from each request's intended send time;
    /// closed: each connection sends when its previous request was answered.
    #[arg(long, value_name = "MODEL", value_enum, default_value_t = ModelKind::Open)]
    pub model: ModelKind,
    /// Open model: requests per second.
    #[arg(long, value_name = "N", default_value_t = 1000.0, value_parser = rate)]
    pub rate: f64,
    /// Open model: ramp the rate from --rate to N over the run.
    #[arg(long, value_name = "N", value_parser = rate)]
    pub rate_to: Option<f64>,
    /// With --rate-to: K equal steps instead of a linear ramp.
    #[arg(long, value_name = "K", requires = "rate_to")]
    pub steps: Option<u32>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Also write report.json, report.md, latency.svg and throughput.svg into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `compare <flash-sale|steady>`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The scenario to compare.
    #[arg(value_enum)]
    pub scenario: CompareScenario,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Arrival rate of the latency table (open model) [default: 80% of the slowest target's
    /// saturated throughput].
    #[arg(long, value_name = "N", value_parser = rate)]
    pub rate: Option<f64>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `serve-reference`.
#[derive(Debug, Clone, Args)]
pub struct ReferenceArgs {
    /// Which classic design to serve.
    #[arg(long, value_enum)]
    pub kind: ReferenceKind,
    /// The database the reference keeps its stock and orders in.
    #[arg(long, value_name = "URL", env = "LOADTEST_MYSQL_URL")]
    pub mysql_url: String,
    /// Redis for redis-lua.
    #[arg(
        long,
        value_name = "URL",
        env = "LOADTEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Listen address (port 0: any free port, printed at start).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Database connections.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_size: u32,
    /// Sell without checking the stock: a broken target, to show the harness catches oversells.
    #[arg(long)]
    pub no_stock_check: bool,
    /// Stall once, at the N-th checkout, for --stall-for: to show a stall in the open model's p99.
    #[arg(long, value_name = "N")]
    pub stall_at: Option<u64>,
    /// How long the stall of --stall-at lasts.
    #[arg(long, value_name = "D", default_value = "1s", value_parser = humantime::parse_duration)]
    pub stall_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    Turnstile,
    MysqlForUpdate,
    RedisLua,
}

impl TargetKind {
    /// The reference server's kind, `None` for Turnstile.
    pub fn reference(self) -> Option<ReferenceKind> {
        match self {
            TargetKind::Turnstile => None,
            TargetKind::MysqlForUpdate => Some(ReferenceKind::MysqlForUpdate),
            TargetKind::RedisLua => Some(ReferenceKind::RedisLua),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReferenceKind {
    MysqlForUpdate,
    RedisLua,
}

impl ReferenceKind {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ReferenceKind::MysqlForUpdate => "mysql-for-update",
            ReferenceKind::RedisLua => "redis-lua",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompareScenario {
    FlashSale,
    Steady,
}

impl CompareScenario {
    pub fn kind(self) -> Kind {
        match self {
            CompareScenario::FlashSale => Kind::FlashSale,
            CompareScenario::Steady => Kind::Steady,
        }
    }
}

/// A rate in requests per second: a finite number above zero.
fn rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected requests per second, a number above 0 (e.g. 1000)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Scheme;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
    }

    fn load(args: &[&str]) -> LoadArgs {
        match parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        {
            Command::FlashSale(load)
            | Command::Steady(load)
            | Command::Mixed(load)
            | Command::Drop(load) => load,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_those_documented() {
        let args = load(&["flash-sale"]);
        assert_eq!(args.target.target.to_string(), "http://127.0.0.1:8080");
        assert_eq!(args.target_kind, TargetKind::Turnstile);
        assert_eq!(args.model, ModelKind::Open);
        assert_eq!((args.rate, args.rate_to, args.steps), (1000.0, None, None));
        assert_eq!(args.run.connections, 64);
        assert_eq!(args.run.duration, Duration::from_secs(10));
        assert_eq!(args.run.requests, 1_000_000);
        assert_eq!((args.run.stock, args.run.skus), (1000, 10_000));
        assert_eq!(
            (args.run.double_percent, args.run.decline_percent),
            (10, 10)
        );
        assert_eq!(args.run.mysql_url, "mysql://root@127.0.0.1:3306/test");
        assert_eq!(args.run.redis_url, "redis://127.0.0.1:6379");
        assert!(!args.target.http2 && args.out.is_none());
        assert_eq!(args.target.trust(), Trust::SystemRoots);
    }

    #[test]
    fn every_option_is_read() {
        let args = load(&[
            "mixed",
            "--target",
            "https://localhost:8443/",
            "--http2",
            "--cacert",
            "ca.pem",
            "--target-kind",
            "redis-lua",
            "--model",
            "open",
            "--rate",
            "500",
            "--rate-to",
            "2000.5",
            "--steps",
            "4",
            "--connections",
            "8",
            "--duration",
            "1m 30s",
            "--requests",
            "5000",
            "--stock",
            "7",
            "--skus",
            "3",
            "--double-percent",
            "0",
            "--decline-percent",
            "100",
            "--mysql-url",
            "mysql://m/db",
            "--redis-url",
            "redis://r",
            "--out",
            "report",
        ]);
        assert_eq!(args.target.target.scheme, Scheme::Https);
        assert_eq!(args.target.target.authority(), "localhost:8443");
        assert!(args.target.http2);
        assert_eq!(args.target.trust(), Trust::CaFile("ca.pem".into()));
        assert_eq!(args.target_kind, TargetKind::RedisLua);
        assert_eq!(
            (args.rate, args.rate_to, args.steps),
            (500.0, Some(2000.5), Some(4))
        );
        assert_eq!(args.run.connections, 8);
        assert_eq!(args.run.duration, Duration::from_secs(90));
        assert_eq!(args.run.requests, 5000);
        assert_eq!((args.run.stock, args.run.skus), (7, 3));
        assert_eq!(
            (args.run.double_percent, args.run.decline_percent),
            (0, 100)
        );
        assert_eq!(
            (args.run.mysql_url.as_str(), args.run.redis_url.as_str()),
            ("mysql://m/db", "redis://r")
        );
        assert_eq!(args.out, Some(PathBuf::from("report")));
        let args = load(&["steady", "--insecure", "--model", "closed"]);
        assert_eq!(args.target.trust(), Trust::AnyCertificate);
        assert_eq!(args.model, ModelKind::Closed);
    }

    #[test]
    fn durations_parse_as_the_server_parses_them() {
        for (raw, expected) in [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("7d", Duration::from_secs(7 * 86_400)),
        ] {
            assert_eq!(
                load(&["steady", "--duration", raw]).run.duration,
                expected,
                "{raw}"
            );
        }
        let Command::ServeReference(reference) = parse(&[
            "serve-reference",
            "--kind",
            "mysql-for-update",
            "--mysql-url",
            "mysql://m/db",
            "--stall-at",
            "500",
            "--stall-for",
            "250ms",
        ])
        .expect("serve-reference")
        .command
        else {
            panic!("not serve-reference")
        };
        assert_eq!(reference.stall_for, Duration::from_millis(250));
        assert_eq!(reference.stall_at, Some(500));
        assert_eq!(reference.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
    }

    #[test]
    fn a_bad_duration_is_a_value_error() {
        for raw in ["10", "ten seconds", "10 parsecs", "-1s", ""] {
            // `--duration=-1s`: written apart, `-1s` would be taken for an option.
            let error = parse(&["flash-sale", &format!("--duration={raw}")]).expect_err(raw);
            assert_eq!(error.kind(), ErrorKind::ValueValidation, "{raw}: {error}");
            assert_eq!(error.exit_code(), 2);
        }
        let error = parse(&[
            "serve-reference",
            "--kind",
            "redis-lua",
            "--mysql-url",
            "m",
            "--stall-for",
            "soon",
        ])
        .expect_err("soon");
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn unknown_options_and_subcommands_are_refused() {
        let error = parse(&["flash-sale", "--connection", "8"]).expect_err("typo");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument);
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("--connections"),
            "a suggestion: {error}"
        );
        // compare takes no model options: they used to be accepted and silently ignored.
        let error = parse(&["compare", "steady", "--model", "open"]).expect_err("compare model");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument);
        let error = parse(&["flash-sales"]).expect_err("subcommand typo");
        assert_eq!(error.kind(), ErrorKind::InvalidSubcommand);
        let error = parse(&["steady", "extra"]).expect_err("positional");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["steady", "--connections", "0"][..],
            &["steady", "--connections", "many"],
            &["steady", "--rate", "0"],
            &["steady", "--rate=-5"],
            &["steady", "--rate", "NaN"],
            &["steady", "--double-percent", "101"],
            &["steady", "--skus", "0"],
            &["steady", "--model", "half-open"],
            &["steady", "--target-kind", "nginx"],
            &["steady", "--target", "ftp://127.0.0.1:21"],
            &["steady", "--target", "http://127.0.0.1:8080/v1"],
            &["steady", "--target", "localhost"],
            &["compare", "mixed"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?}"));
            assert!(
                matches!(
                    error.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{args:?}: {:?} {error}",
                error.kind()
            );
            assert_eq!(error.exit_code(), 2);
        }
        let error = parse(&["steady", "--target", "ftp://127.0.0.1:21"]).expect_err("ftp");
        assert!(
            error.to_string().contains("use http:// or https://"),
            "{error}"
        );
    }

    #[test]
    fn options_that_need_another_or_exclude_one_are_refused() {
        let error = parse(&["steady", "--steps", "3"]).expect_err("steps without rate-to");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        let error = parse(&["steady", "--insecure", "--cacert", "ca.pem"]).expect_err("both");
        assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
        let error = parse(&["serve-reference", "--kind", "redis-lua"]).expect_err("no mysql");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        let error = parse(&["compare"]).expect_err("no scenario");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn help_is_generated_for_every_subcommand() {
        for command in [
            "flash-sale",
            "steady",
            "mixed",
            "compare",
            "serve-reference",
        ] {
            let error = parse(&[command, "--help"]).expect_err("help is an early exit");
            assert_eq!(error.kind(), ErrorKind::DisplayHelp, "{command}");
            assert_eq!(error.exit_code(), 0);
            assert!(error.to_string().contains("Usage: loadtest"), "{command}");
        }
        let error = parse(&[]).expect_err("no subcommand");
        assert_eq!(
            error.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(error.exit_code(), 2);
    }
}

//! `loadtest`: drives a Turnstile server (or a reference server of a classic design) with a
//! flash-sale or steady scenario, reports latencies and throughput, and fails (exit 1) when an
//! invariant is broken.

use loadtest::reference::{serve_mysql_for_update, ReferenceConfig};
use loadtest::report::Report;
use loadtest::run::{run, Model, RunConfig};
use loadtest::scenario::{Kind, Scenario};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

const USAGE: &str = "\
Usage:
  loadtest <flash-sale|steady|mixed> [OPTIONS]
  loadtest compare <flash-sale|steady> [OPTIONS]
  loadtest serve-reference --kind mysql-for-update|redis-lua --mysql-url URL [--redis-url URL] [--listen ADDR]

`compare` runs the same scenario against GET /healthz of the target (the machine's HTTP ceiling),
Turnstile at --target and the mysql-for-update and redis-lua references in turn: throughput at saturation (closed
model, --connections each), then latency at one arrival rate every target sustains (open model,
--rate, default 80% of the slowest target's saturated throughput), and prints the ratio tables.

Drives a target over keep-alive HTTP/1.1 and checks the invariants afterwards (exit 1 if one is
broken). Every run is bounded by --duration and --requests and stops by itself.

Options:
  --target ADDR          the Turnstile server to drive [default 127.0.0.1:8080]
  --target-kind KIND     turnstile | mysql-for-update | redis-lua (these two start a reference
                         server of the classic design) [default turnstile]
  --mysql-url URL        database for the references [default mysql://root@127.0.0.1:3306/test]
  --redis-url URL        Redis for the redis-lua reference [default redis://127.0.0.1:6379]
  --model MODEL          open (constant arrival rate, latency from the intended send time) |
                         closed (each connection sends when answered) [default open]
  --rate N               open model: requests per second [default 1000]
  --rate-to N            open model: ramp the rate from --rate to N over the run
  --steps K              with --rate-to: K equal steps instead of a linear ramp
  --connections N        keep-alive connections [default 64]
  --duration D           how long to send, e.g. 10s [default 10s]
  --requests N           the most requests sent [default 1000000]
  --stock N              flash-sale: units of the hot SKU [default 1000]
  --skus N               steady, mixed: SKUs [default 10000]
  --double-percent N     flash-sale: buyers who submit twice with one key [default 10]
  --decline-percent N    flash-sale: buyers whose card is declined [default 10]
  --http2                HTTP/2 over cleartext (prior knowledge) instead of HTTP/1.1
  --out DIR              also write report.json, report.md, latency.svg, throughput.svg there
";

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 10s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        _ => return Err(format!("{raw:?}: unknown unit {unit:?}")),
    })
}

fn options(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let name = arg
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
        if matches!(name, "no-stock-check" | "http2") {
            map.insert(name.to_owned(), "true".to_owned());
            continue;
        }
        let value = rest
            .next()
            .ok_or_else(|| format!("--{name} needs a value"))?;
        map.insert(name.to_owned(), value.clone());
    }
    Ok(map)
}

fn number<T: std::str::FromStr>(
    options: &HashMap<String, String>,
    name: &str,
    default: T,
) -> Result<T, String> {
    match options.get(name) {
        Some(raw) => raw
            .parse()
            .map_err(|_| format!("--{name} {raw:?} is not a number")),
        None => Ok(default),
    }
}

fn mysql_url(options: &HashMap<String, String>) -> String {
    options
        .get("mysql-url")
        .cloned()
        .unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".into())
}

fn redis_url(options: &HashMap<String, String>) -> String {
    options
        .get("redis-url")
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

/// Starts `loadtest serve-reference` as a child process and returns it with its address.
fn start_reference(
    kind: &str,
    options: &HashMap<String, String>,
) -> Result<(std::process::Child, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (mysql, redis) = (mysql_url(options), redis_url(options));
    let mut child = Command::new(exe)
        .args(["serve-reference", "--kind", kind, "--mysql-url", &mysql])
        .args(["--redis-url", &redis, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the reference server: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("the reference server did not start: {line:?}"))?
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok((child, addr))
}

/// The bounds of one run from the options.
fn run_config(
    options: &HashMap<String, String>,
    addr: SocketAddr,
    model: Model,
) -> Result<RunConfig, String> {
    Ok(RunConfig {
        addr,
        model,
        connections: number(options, "connections", 64usize)?.clamp(1, 10_000),
        duration: parse_duration(options.get("duration").map_or("10s", String::as_str))?,
        requests_max: number(options, "requests", 1_000_000u64)?,
        progress: true,
        http2: options.contains_key("http2"),
    })
}

/// Runs `kind` once against `addr` with `model`, checks the invariants, returns the report.
async fn measure(
    kind: Kind,
    options: &HashMap<String, String>,
    target_name: &str,
    addr: SocketAddr,
    model: Model,
) -> Result<Report, String> {
    let config = run_config(options, addr, model)?;
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let scenario = Scenario {
        kind,
        run_id,
        stock: number(options, "stock", 1000i64)?,
        skus: number(options, "skus", 10_000usize)?.max(1),
        double_percent: number(options, "double-percent", 10u64)?.min(100),
        decline_percent: number(options, "decline-percent", 10u64)?.min(100),
    };
    eprintln!("setting up {} on {target_name} at {addr}", kind.name());
    scenario.setup(addr).await?;
    let requests = scenario.clone();
    let recording = run(&config, move |i| requests.job(i)).await;
    let verification = scenario.verify(addr, &recording).await;
    Ok(Report::new(
        target_name,
        kind.name(),
        &model_name(model),
        config.connections,
        &recording,
        verification,
    ))
}

fn model_name(model: Model) -> String {
    match model {
        Model::Open { rate } => format!("open model, {rate:.0} req/s"),
        Model::Ramp { from, to, steps: 0 } => format!("open model, {from:.0} → {to:.0} req/s"),
        Model::Ramp { from, to, steps } => {
            format!("open model, {from:.0} → {to:.0} req/s in {steps} steps")
        }
        Model::Closed => "closed model".to_owned(),
    }
}

/// GET /healthz of the target: the HTTP ceiling no checkout can pass.
async fn ceiling(
    options: &HashMap<String, String>,
    addr: SocketAddr,
    model: Model,
) -> Result<Report, String> {
    let config = run_config(options, addr, model)?;
    let recording = run(&config, |_| {
        loadtest::client::Job::Single(loadtest::client::Request {
            method: "GET",
            path: "/healthz".into(),
            key: None,
            body: String::new(),
        })
    })
    .await;
    Ok(Report::new(
        "GET /healthz",
        "ceiling",
        &model_name(model),
        config.connections,
        &recording,
        Default::default(),
    ))
}

async fn compare(kind: Kind, options: HashMap<String, String>) -> Result<bool, String> {
    let addr: SocketAddr = options
        .get("target")
        .map_or("127.0.0.1:8080", String::as_str)
        .parse()
        .map_err(|_| "--target must be an address like 127.0.0.1:8080")?;
    let (mut for_update, for_update_addr) = start_reference("mysql-for-update", &options)?;
    let (mut lua, lua_addr) = start_reference("redis-lua", &options)?;
    let targets = [
        ("turnstile", addr),
        ("mysql-for-update", for_update_addr),
        ("redis-lua", lua_addr),
    ];
    let mut saturated = vec![ceiling(&options, addr, Model::Closed).await?];
    for (name, target) in targets {
        saturated.push(measure(kind, &options, name, target, Model::Closed).await?);
    }
    let slowest = saturated
        .iter()
        .map(|r| r.throughput_rps)
        .fold(f64::MAX, f64::min);
    let rate = match options.get("rate") {
        Some(raw) => raw.parse().map_err(|_| "--rate must be a number")?,
        None => (slowest * 0.8).max(1.0),
    };
    let mut fixed_rate = vec![ceiling(&options, addr, Model::Open { rate }).await?];
    for (name, target) in targets {
        fixed_rate.push(measure(kind, &options, name, target, Model::Open { rate }).await?);
    }
    for child in [&mut for_update, &mut lua] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let turnstile = &saturated[1];
    println!(
        "## {} — throughput at saturation (closed model, {} connections)\n",
        kind.name(),
        turnstile.connections
    );
    println!("| target | req/s | p99 ms | % of HTTP ceiling | Turnstile ÷ target | invariants |\n| --- | --- | --- | --- | --- | --- |");
    for report in &saturated {
        println!(
            "| {} | {:.0} | {:.2} | {:.0}% | {:.2}× | {} |",
            report.target,
            report.throughput_rps,
            report.all.p99_ms,
            100.0 * report.throughput_rps / saturated[0].throughput_rps,
            turnstile.throughput_rps / report.throughput_rps,
            if report.passed() { "hold" } else { "VIOLATED" }
        );
    }
    println!(
        "\n## {} — latency at one arrival rate ({rate:.0} req/s, open model)\n",
        kind.name()
    );
    println!("| target | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | invariants |\n| --- | --- | --- | --- | --- | --- | --- |");
    for report in &fixed_rate {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            report.target,
            report.all.p50_ms,
            report.all.p90_ms,
            report.all.p99_ms,
            report.all.p999_ms,
            report.all.max_ms,
            if report.passed() { "hold" } else { "VIOLATED" }
        );
    }
    for report in saturated.iter().chain(fixed_rate.iter()) {
        eprint!("{}", report.text());
    }
    Ok(saturated
        .iter()
        .chain(fixed_rate.iter())
        .all(Report::passed))
}

async fn load(kind: Kind, options: HashMap<String, String>) -> Result<bool, String> {
    let target_kind = options
        .get("target-kind")
        .map_or("turnstile", String::as_str)
        .to_owned();
    let mut reference = None;
    let addr: SocketAddr = match target_kind.as_str() {
        "turnstile" => options
            .get("target")
            .map_or("127.0.0.1:8080", String::as_str)
            .parse()
            .map_err(|_| "--target must be an address like 127.0.0.1:8080")?,
        kind @ ("mysql-for-update" | "redis-lua") => {
            let (child, addr) = start_reference(kind, &options)?;
            reference = Some(child);
            addr
        }
        other => {
            return Err(format!(
                "--target-kind {other:?}: use turnstile, mysql-for-update or redis-lua"
            ))
        }
    };
    let model = match options.get("model").map_or("open", String::as_str) {
        "open" => match options.get("rate-to") {
            None => Model::Open {
                rate: number(&options, "rate", 1000.0)?,
            },
            Some(_) => Model::Ramp {
                from: number(&options, "rate", 1000.0)?,
                to: number(&options, "rate-to", 1000.0)?,
                steps: number(&options, "steps", 0u32)?,
            },
        },
        "closed" => Model::Closed,
        other => return Err(format!("--model {other:?}: use open or closed")),
    };
    let report = measure(kind, &options, &target_kind, addr, model).await;
    if let Some(mut child) = reference.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let report = report?;
    print!("{}", report.text());
    if let Some(dir) = options.get("out") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (name, content) in [
            ("report.json", report.json()),
            ("report.md", report.markdown()),
            ("latency.svg", report.latency_svg()),
            ("throughput.svg", report.throughput_svg()),
        ] {
            std::fs::write(dir.join(name), content).map_err(|e| format!("{name}: {e}"))?;
        }
        eprintln!("reports written to {}", dir.display());
    }
    Ok(report.passed())
}

async fn serve_reference(options: HashMap<String, String>) -> Result<(), String> {
    let kind = options.get("kind").cloned().unwrap_or_default();
    if !matches!(kind.as_str(), "mysql-for-update" | "redis-lua") {
        return Err(format!(
            "--kind {kind:?}: use mysql-for-update or redis-lua"
        ));
    }
    let config = ReferenceConfig {
        mysql_url: options
            .get("mysql-url")
            .cloned()
            .ok_or("--mysql-url is required")?,
        listen: options
            .get("listen")
            .map_or("127.0.0.1:0", String::as_str)
            .parse()
            .map_err(|_| "--listen must be an address")?,
        pool_size: number(&options, "pool-size", 64u32)?,
        no_stock_check: options.contains_key("no-stock-check"),
        stall_at: options
            .get("stall-at")
            .map(|s| s.parse())
            .transpose()
            .map_err(|_| "--stall-at must be a number")?,
        stall_for: parse_duration(options.get("stall-for").map_or("1s", String::as_str))?,
    };
    let addr = if kind == "redis-lua" {
        loadtest::redis_lua::serve_redis_lua(config, &redis_url(&options)).await?
    } else {
        serve_mysql_for_update(config).await?
    };
    println!("listening on {addr}");
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    if command == "-h" || command == "--help" {
        eprint!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = if command == "compare" {
        Ok(HashMap::new())
    } else {
        options(&args[1..])
    };
    let options = match parsed {
        Ok(options) => options,
        Err(error) => {
            eprintln!("loadtest: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command.as_str() {
        "serve-reference" => runtime.block_on(serve_reference(options)).map(|()| true),
        "compare" => {
            let Some(kind) = args.get(1).and_then(|k| Kind::parse(k)) else {
                eprintln!("loadtest compare: name a scenario (flash-sale or steady)\n\n{USAGE}");
                return ExitCode::from(2);
            };
            let options = match self::options(&args[2..]) {
                Ok(options) => options,
                Err(error) => {
                    eprintln!("loadtest: {error}\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            runtime.block_on(compare(kind, options))
        }
        scenario => match Kind::parse(scenario) {
            Some(kind) => runtime.block_on(load(kind, options)),
            None => {
                eprintln!("loadtest: unknown scenario {scenario:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadtest: invariants violated");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

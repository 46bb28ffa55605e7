//! `loadtest`: drives a Turnstile server (or a reference server of a classic design) with a
//! flash-sale, steady or cart scenario over HTTP/1.1 or HTTP/2, plain or over TLS, reports latencies
//! and throughput, and fails (exit 1) when an invariant is broken. The command line is
//! [`loadtest::cli`]; `loadtest --help` and `loadtest <command> --help` describe it.
//!
//! Exit codes: 0 every invariant held, 1 an invariant broke or the run failed, 2 bad usage or
//! configuration (clap's message, an unresolvable --target, an unusable --cacert).

use clap::Parser;
use loadtest::cli::{
    Cli, Command, CompareArgs, LoadArgs, ModelKind, ReferenceArgs, RunArgs, TargetArgs,
};
use loadtest::client::Endpoint;
use loadtest::reference::{serve_mysql_for_update, ReferenceConfig};
use loadtest::report::Report;
use loadtest::run::{run, Model, RunConfig};
use loadtest::scenario::{Kind, Scenario};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::Duration;

/// Why a command failed: bad usage or configuration (exit 2), or a failure at run time (exit 1).
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<String> for Failure {
    fn from(error: String) -> Self {
        Failure::Runtime(error)
    }
}

/// The Turnstile endpoint of `--target`: the host resolved, TLS configured for https://.
async fn endpoint(args: &TargetArgs) -> Result<Endpoint, Failure> {
    let addr = args.target.resolve().await.map_err(Failure::Usage)?;
    Endpoint::for_target(&args.target, addr, args.http2, &args.trust())
        .map_err(|e| Failure::Usage(format!("--target {}: {e}", args.target)))
}

/// The endpoint of a reference server the harness started (plain HTTP).
fn reference_endpoint(addr: SocketAddr, http2: bool) -> Endpoint {
    if http2 {
        Endpoint::h2c(addr)
    } else {
        Endpoint::plain(addr)
    }
}

/// Starts `loadtest serve-reference` as a child process and returns it with its address.
fn start_reference(kind: &str, run: &RunArgs) -> Result<(std::process::Child, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the harness binary: {e}"))?;
    let mut child = Process::new(exe)
        .args([
            "serve-reference",
            "--kind",
            kind,
            "--mysql-url",
            &run.mysql_url,
        ])
        .args(["--redis-url", &run.redis_url, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the {kind} reference server: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("the {kind} reference server has no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading from the {kind} reference server: {e}"))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("the {kind} reference server did not start: {line:?}"))?
        .parse()
        .map_err(|e| format!("the {kind} reference server's address {line:?}: {e}"))?;
    Ok((child, addr))
}

/// The bounds of one run from the options.
fn run_config(run: &RunArgs, endpoint: &Endpoint, model: Model) -> RunConfig {
    RunConfig {
        endpoint: endpoint.clone(),
        model,
        connections: usize::try_from(run.connections).unwrap_or(usize::MAX),
        duration: run.duration,
        requests_max: run.requests,
        progress: true,
    }
}

/// Runs `kind` once against `endpoint` with `model`, checks the invariants, returns the report.
async fn measure(
    kind: Kind,
    run_args: &RunArgs,
    target_name: &str,
    endpoint: &Endpoint,
    model: Model,
) -> Result<Report, String> {
    let config = run_config(run_args, endpoint, model);
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let scenario = Scenario {
        kind,
        run_id,
        stock: run_args.stock,
        skus: usize::try_from(run_args.skus).unwrap_or(usize::MAX),
        double_percent: run_args.double_percent,
        decline_percent: run_args.decline_percent,
        limit: run_args.limit,
        customers: match run_args.customers {
            0 => u64::try_from(run_args.stock).unwrap_or(1).max(1),
            n => n,
        },
        admission_rate: run_args.admission_rate,
        admissions: Default::default(),
    };
    eprintln!(
        "setting up {} on {target_name} at {}{}",
        kind.name(),
        endpoint.addr,
        if endpoint.is_tls() { " (TLS)" } else { "" }
    );
    scenario
        .setup(endpoint)
        .await
        .map_err(|e| format!("setting up {} on {target_name}: {e}", kind.name()))?;
    // A waiting room's drop: a live stock stream of the SKU watches for sold_out meanwhile (plain
    // HTTP/1.1 targets).
    let watcher = (kind == Kind::Drop
        && scenario.admission_rate.is_some()
        && !endpoint.is_tls()
        && !endpoint.http2)
        .then(|| {
            tokio::spawn(loadtest::client::watch_sold_out(
                endpoint.addr,
                scenario.hot_sku(),
                std::time::Instant::now() + run_args.duration + Duration::from_secs(180),
            ))
        });
    let requests = scenario.clone();
    let recording = run(&config, move |i| requests.job(i)).await;
    let mut verification = scenario.verify(endpoint, &recording).await;
    if let Some(watcher) = watcher {
        let last_sale = scenario
            .admissions
            .last_sale
            .lock()
            .ok()
            .and_then(|last| *last);
        let seen = tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        verification.checked.push(match (seen, last_sale) {
            (Some(seen), Some(last)) => format!(
                "live stock stream: sold_out {:.0?} after the last sale was answered",
                seen.saturating_duration_since(last)
            ),
            (None, _) => "live stock stream: no sold_out within 5 s of the run's end (did the stock sell out?)".into(),
            (Some(_), None) => "live stock stream: sold_out, with no sale seen".into(),
        });
    }
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
async fn ceiling(run_args: &RunArgs, endpoint: &Endpoint, model: Model) -> Report {
    let config = run_config(run_args, endpoint, model);
    let recording = run(&config, |_| {
        loadtest::client::Job::Single(loadtest::client::Request {
            method: "GET",
            path: "/healthz".into(),
            key: None,
            body: String::new(),
        })
    })
    .await;
    Report::new(
        "GET /healthz",
        "ceiling",
        &model_name(model),
        config.connections,
        &recording,
        Default::default(),
    )
}

async fn compare(args: CompareArgs) -> Result<bool, Failure> {
    let kind = args.scenario.kind();
    let turnstile_endpoint = endpoint(&args.target).await?;
    if turnstile_endpoint.is_tls() {
        eprintln!(
            "note: Turnstile is driven over TLS, the reference servers over plain HTTP: the ratios include the cost of TLS"
        );
    }
    let (mut for_update, for_update_addr) = start_reference("mysql-for-update", &args.run)?;
    let (mut lua, lua_addr) = match start_reference("redis-lua", &args.run) {
        Ok(started) => started,
        Err(error) => {
            let _ = for_update.kill();
            let _ = for_update.wait();
            return Err(error.into());
        }
    };
    let result = compare_with(
        kind,
        &args,
        [
            ("turnstile", turnstile_endpoint),
            (
                "mysql-for-update",
                reference_endpoint(for_update_addr, args.target.http2),
            ),
            ("redis-lua", reference_endpoint(lua_addr, args.target.http2)),
        ],
    )
    .await;
    for child in [&mut for_update, &mut lua] {
        let _ = child.kill();
        let _ = child.wait();
    }
    result.map_err(Failure::Runtime)
}

/// The two rounds of compare against the three started targets, and the tables.
async fn compare_with(
    kind: Kind,
    args: &CompareArgs,
    targets: [(&str, Endpoint); 3],
) -> Result<bool, String> {
    let turnstile_endpoint = &targets[0].1;
    let mut saturated = vec![ceiling(&args.run, turnstile_endpoint, Model::Closed).await];
    for (name, target) in &targets {
        saturated.push(measure(kind, &args.run, name, target, Model::Closed).await?);
    }
    let slowest = saturated
        .iter()
        .map(|r| r.throughput_rps)
        .fold(f64::MAX, f64::min);
    let rate = args.rate.unwrap_or((slowest * 0.8).max(1.0));
    let mut fixed_rate = vec![ceiling(&args.run, turnstile_endpoint, Model::Open { rate }).await];
    for (name, target) in &targets {
        fixed_rate.push(measure(kind, &args.run, name, target, Model::Open { rate }).await?);
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

async fn load(kind: Kind, args: LoadArgs) -> Result<bool, Failure> {
    let model = match (args.model, args.rate_to) {
        (ModelKind::Open, None) => Model::Open { rate: args.rate },
        (ModelKind::Open, Some(to)) => Model::Ramp {
            from: args.rate,
            to,
            steps: args.steps.unwrap_or(0),
        },
        (ModelKind::Closed, _) => Model::Closed,
    };
    let report = match args.target_kind.reference() {
        None => {
            let endpoint = endpoint(&args.target).await?;
            measure(kind, &args.run, "turnstile", &endpoint, model).await
        }
        Some(reference) => {
            let (mut child, addr) = start_reference(reference.name(), &args.run)?;
            let endpoint = reference_endpoint(addr, args.target.http2);
            let report = measure(kind, &args.run, reference.name(), &endpoint, model).await;
            let _ = child.kill();
            let _ = child.wait();
            report
        }
    };
    let report = report?;
    print!("{}", report.text());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("--out {}: {e}", dir.display()))?;
        for (name, content) in [
            ("report.json", report.json()),
            ("report.md", report.markdown()),
            ("latency.svg", report.latency_svg()),
            ("throughput.svg", report.throughput_svg()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        eprintln!("reports written to {}", dir.display());
    }
    Ok(report.passed())
}

async fn serve_reference(args: ReferenceArgs) -> Result<(), String> {
    let config = ReferenceConfig {
        mysql_url: args.mysql_url,
        listen: args.listen,
        pool_size: args.pool_size,
        no_stock_check: args.no_stock_check,
        stall_at: args.stall_at,
        stall_for: args.stall_for,
    };
    let addr = match args.kind {
        loadtest::cli::ReferenceKind::RedisLua => {
            loadtest::redis_lua::serve_redis_lua(config, &args.redis_url).await?
        }
        loadtest::cli::ReferenceKind::MysqlForUpdate => serve_mysql_for_update(config).await?,
    };
    println!("listening on {addr}");
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

fn main() -> ExitCode {
    // Help and version exit 0 on stdout; usage errors exit 2 with clap's message.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadtest: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::ServeReference(args) => runtime
            .block_on(serve_reference(args))
            .map(|()| true)
            .map_err(Failure::Runtime),
        Command::Compare(args) => runtime.block_on(compare(args)),
        Command::FlashSale(args) => runtime.block_on(load(Kind::FlashSale, args)),
        Command::Steady(args) => runtime.block_on(load(Kind::Steady, args)),
        Command::Mixed(args) => runtime.block_on(load(Kind::Mixed, args)),
        Command::Drop(args) => runtime.block_on(load(Kind::Drop, args)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadtest: invariants violated");
            ExitCode::FAILURE
        }
        Err(Failure::Usage(error)) => {
            eprintln!("loadtest: {error}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(error)) => {
            eprintln!("loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

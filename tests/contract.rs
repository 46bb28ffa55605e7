//! The contract as a machine checks it: `docs/openapi.json` is a valid OpenAPI 3.1 document
//! (`openapi-spec-validator`), the server serves it as it is at `GET /openapi.json`, and
//! schemathesis, driving a real server from it (examples, coverage, fuzzing and stateful phases,
//! every check), finds no answer the document does not describe and no 5xx it does not
//! document; the stock's identity holds afterwards. The checkers come from PyPI
//! (`tests/tools/api-requirements.txt`, installed into `target/api-tools` on first use).
//!
//! `TURNSTILE_SCHEMATHESIS_EXAMPLES` sets the examples per operation (default 50; the 10×
//! longer run of the note: 500).

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{spawn_app, JsonBody};
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "contract-test-admin-token";

/// The venv of the contract's checkers.
fn tools() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/api-tools");
    let made = Command::new("bash")
        .arg(root.join("tests/tools/venv.sh"))
        .arg(root.join("tests/tools/api-requirements.txt"))
        .arg(&dir)
        .status()
        .expect("run tests/tools/venv.sh");
    assert!(
        made.success(),
        "the contract's checkers could not be installed"
    );
    dir
}

/// Runs `tool` of the venv with `args`; its exit status and what it printed.
fn run(tools: &Path, tool: &str, args: &[&str]) -> (bool, String) {
    // Run from a directory of its own: schemathesis keeps a cache where it runs.
    let cwd = tempfile::tempdir().expect("tempdir");
    let output = Command::new(tools.join("bin/python"))
        .arg(tools.join("bin").join(tool))
        .args(args)
        .current_dir(cwd.path())
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_served_as_it_is() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let tools = tools();
    let (valid, said) = run(
        &tools,
        "openapi-spec-validator",
        &[&path.display().to_string()],
    );
    assert!(
        valid,
        "docs/openapi.json is not a valid OpenAPI document:\n{said}"
    );
    let document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/openapi.json"))
            .expect("JSON");
    assert_eq!(document["openapi"], "3.1.0");
    let app = spawn_app(&[]);
    let served = app.client().get("/openapi.json").await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.json(),
        document,
        "the server serves docs/openapi.json as it is"
    );
    // Every route the server has is in the document, and nothing else.
    let mut documented: Vec<&str> = document["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    documented.sort_unstable();
    let mut routes: Vec<&str> = turnstile::api::ROUTES.to_vec();
    routes.sort_unstable();
    assert_eq!(
        documented, routes,
        "the document's paths are the server's routes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_a_real_server() {
    let tools = tools();
    let examples = std::env::var("TURNSTILE_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "50".into());
    let app = spawn_app(&["--admin-token", TOKEN, "--sim-pending-delay", "50ms"]);
    let mut client = app.client();
    // A product to find, so the generated checkouts and reads reach the paths behind a lookup.
    assert_eq!(client.put_product("SKU1", 500, 1_000).await.status, 200);
    let report = tempfile::tempdir().expect("tempdir");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let url = format!("http://{}/openapi.json", app.addr);
    let report_dir = report.path().display().to_string();
    let (passed, said) = run(
        &tools,
        "schemathesis",
        &[
            "run",
            &url,
            "--checks",
            "all",
            // Not a property of this API: a valid-looking request may name no product (404),
            // and a state-changing call's resource may be gone by the next (a cancelled order
            // stays readable, but a generated id never existed).
            "--exclude-checks",
            "positive_data_acceptance,use_after_free,ensure_resource_availability",
            // The live stock stream never ends by itself (it is read by tests/api/stock_stream.rs).
            "--exclude-path",
            "/v1/products/{sku}/stream",
            "--max-examples",
            &examples,
            "--workers",
            "1",
            "--header",
            &bearer,
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "30",
            "--report",
            "junit",
            "--report-dir",
            &report_dir,
        ],
    );
    assert!(passed, "schemathesis found a problem:\n{said}");
    let summary: Vec<&str> = said.lines().rev().take(16).collect();
    eprintln!(
        "schemathesis ({examples} examples per operation):\n{}",
        summary.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    // The checkouts it made left the stock's books straight.
    let (stock, available, reserved, sold) = client.stock("SKU1").await;
    assert_eq!(available + reserved + sold, stock);
    assert_eq!(app.client().get("/readyz").await.status, 200);
}

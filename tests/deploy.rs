//! `deploy/kubernetes` as it runs. Two tests:
//!
//! - the rendered manifests pass the Kubernetes schemas in strict mode and checkov's policies
//!   (`deploy/check.sh`, which CI runs through this test);
//! - three pods of the StatefulSet, started as the kubelet would start them: the entrypoint from
//!   the Dockerfile, the arguments, environment (ConfigMap, downward API, Secret) and probes read
//!   from the rendered manifests, never retyped. Only what differs between a pod and a process on
//!   this machine is replaced, each by name in [`SUBSTITUTED`]; a variable or source the test
//!   does not know fails it. One pod is sent SIGTERM under load, as a scale-down does: `/readyz`
//!   turns 503 at once, every checkout it had taken is answered, it exits 0 within the
//!   manifest's grace period, its unsold units are back in the pool, and the two left sell every
//!   unit.
//!
//! Needs kubectl (renders with `kubectl kustomize`), python3 and PyPI for the validators
//! (installed into `target/deploy-tools` on first use), MariaDB, Redis and RabbitMQ.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{
    eventually, free_port, start_command, Client, JsonBody, Sim, TestApp, TestBroker, TestDatabase,
    TestRedis, REDIS_URL,
};
use serde_json::Value;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The only differences between a pod and a process here. Every other variable and argument is
/// passed exactly as the manifests give it.
const SUBSTITUTED: &[(&str, &str)] = &[
    (
        "TURNSTILE_LISTEN",
        "the pod's own address → 127.0.0.1 and a free port per pod",
    ),
    (
        "TURNSTILE_DATA_DIR",
        "the pod's volume → a directory of the test's",
    ),
    (
        "TURNSTILE_ADVERTISE_URL",
        "the pod's DNS name in the headless Service → its local address",
    ),
    (
        "TURNSTILE_MYSQL_URL",
        "Secret mysql-url → the test's own database",
    ),
    (
        "TURNSTILE_REDIS_URL",
        "Secret redis-url → the machine's Redis",
    ),
    (
        "TURNSTILE_REDIS_PREFIX",
        "→ the test's own key prefix (tests share that Redis)",
    ),
    (
        "TURNSTILE_AMQP_URL",
        "Secret amqp-url → the machine's RabbitMQ",
    ),
    (
        "TURNSTILE_AMQP_EXCHANGE",
        "→ the test's own exchange (tests share that broker)",
    ),
    (
        "TURNSTILE_GATEWAY_URL",
        "the payment gateway → a `turnstile gateway-sim` of the test's",
    ),
    (
        "TURNSTILE_CLUSTER_SECRET",
        "Secret placeholder → a test value",
    ),
    (
        "TURNSTILE_WEBHOOK_SECRET",
        "Secret placeholder → a test value",
    ),
    ("TURNSTILE_ADMIN_TOKEN", "Secret placeholder → a test value"),
];

/// Variables the manifests may set that are not `turnstile serve` options.
const NOT_OPTIONS: &[(&str, &str)] = &[
    (
        "POD_NAMESPACE",
        "read by TURNSTILE_ADVERTISE_URL's $(POD_NAMESPACE)",
    ),
    ("RUST_LOG", "the log filter"),
    ("HOSTNAME", "set by the container runtime to the pod's name"),
];

#[test]
fn the_rendered_manifests_pass_strict_schema_validation_and_checkov() {
    let output = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/check.sh"))
        .output()
        .expect("run deploy/check.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "deploy/check.sh failed:\n{said}");
    assert!(said.contains("all checks passed"), "{said}");
}

/// The rendered manifests (the base, `data-stores/` and the example Secret), by kind, namespace
/// and name.
struct Manifests(Vec<Value>);

impl Manifests {
    fn render() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("manifests.json");
        let output = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/check.sh"))
            .arg("--json")
            .arg(&json)
            .output()
            .expect("run deploy/check.sh --json");
        assert!(
            output.status.success(),
            "rendering deploy/kubernetes failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&json).expect("the rendered manifests");
        Self(serde_json::from_str(&text).expect("JSON manifests"))
    }

    /// The `kind` named `name` in `namespace`, as the kubelet would look it up for a pod there.
    fn get(&self, kind: &str, namespace: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|m| {
                m["kind"] == kind
                    && m["metadata"]["name"] == name
                    && m["metadata"]["namespace"] == namespace
            })
            .unwrap_or_else(|| panic!("no {kind} {name} in namespace {namespace}"))
    }

    /// Every `kind` in `namespace`.
    fn all<'a>(&'a self, kind: &'a str, namespace: &'a str) -> impl Iterator<Item = &'a Value> {
        self.0
            .iter()
            .filter(move |m| m["kind"] == kind && m["metadata"]["namespace"] == namespace)
    }
}

/// True when `selector` (a `matchLabels` object) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|wanted| wanted.iter().all(|(k, v)| labels[k] == *v))
}

/// What the Dockerfile gives a container: its environment, entrypoint and command.
struct Image {
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Image {
    /// The final stage of the Dockerfile (the one the image is).
    fn read() -> Self {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
                .expect("read the Dockerfile");
        let joined = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("\\\n", " ");
        let empty = || Image {
            env: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        };
        let mut image = empty();
        for line in joined.lines() {
            let (instruction, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            let array = || -> Vec<String> {
                serde_json::from_str(rest.trim())
                    .unwrap_or_else(|e| panic!("{instruction} must be a JSON array ({e}): {rest}"))
            };
            match instruction {
                // A new stage starts afresh: only the last one is the image.
                "FROM" => image = empty(),
                "ENV" => {
                    for pair in rest.split_whitespace() {
                        let (name, value) = pair
                            .split_once('=')
                            .unwrap_or_else(|| panic!("ENV {pair}: write NAME=value"));
                        assert!(
                            !value.contains(['"', '\'', '$']),
                            "ENV {pair}: quotes or $ are not read here"
                        );
                        image.env.push((name.to_owned(), value.to_owned()));
                    }
                }
                "ENTRYPOINT" => image.entrypoint = array(),
                "CMD" => image.cmd = array(),
                _ => {}
            }
        }
        image
    }
}

/// A Kubernetes quantity (`2`, `500m`, `1.5`) in thousandths.
fn milli(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(m) => m.parse().expect("a quantity in m"),
        None => (quantity.parse::<f64>().expect("a quantity") * 1000.0).round() as u64,
    }
}

/// Expands `$(NAME)` from `defined` in one pass, `$$` being a literal `$`, as the kubelet does;
/// a reference to a variable not defined (which the kubelet would leave as it is) fails.
fn expand(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(reference) = after.strip_prefix('(') {
            let end = reference
                .find(')')
                .unwrap_or_else(|| panic!("{value}: an unclosed $("));
            let name = &reference[..end];
            let found = defined.get(name).unwrap_or_else(|| {
                panic!("{value}: $({name}) is not defined before it (envFrom or an earlier env entry), so the kubelet would leave it as it is")
            });
            out.push_str(found);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container of a pod as the kubelet starts it: its environment (the image's, then `envFrom`,
/// then `env` in order) and the variables its `$(VAR)` references may use.
struct Container {
    env: BTreeMap<String, String>,
    referable: BTreeMap<String, String>,
}

impl Container {
    /// Container `container` of pod `pod` in `namespace`.
    fn new(
        image: &Image,
        manifests: &Manifests,
        container: &Value,
        pod: &str,
        namespace: &str,
    ) -> Self {
        // What `$(VAR)` may name: envFrom and the env entries before it, not the image's ENV.
        let mut referable: BTreeMap<String, String> = BTreeMap::new();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let name = source["configMapRef"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("envFrom {source}: only configMapRef is known here"));
            let prefix = source["prefix"].as_str().unwrap_or("");
            assert!(
                source["configMapRef"]["optional"] != true,
                "envFrom {name}: an optional ConfigMap may be missing in a cluster"
            );
            let map = manifests.get("ConfigMap", namespace, name);
            for (key, value) in map["data"].as_object().expect("ConfigMap data") {
                let value = value.as_str().expect("string data").to_owned();
                referable.insert(format!("{prefix}{key}"), value);
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &referable)
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod.to_owned(),
                    "metadata.namespace" => namespace.to_owned(),
                    other => panic!("fieldRef {other}: not known here"),
                }
            } else if let Some(resource) = var["valueFrom"]["resourceFieldRef"].as_object() {
                let wanted = resource["resource"].as_str().expect("resource");
                let (kind, what) = wanted.split_once('.').expect("limits.cpu or the like");
                let quantity = container["resources"][kind][what]
                    .as_str()
                    .unwrap_or_else(|| panic!("{wanted} is not set on the container"));
                let divisor = resource
                    .get("divisor")
                    .and_then(Value::as_str)
                    .unwrap_or("1");
                // The kubelet rounds up: 1500m with divisor 1 is 2.
                milli(quantity).div_ceil(milli(divisor)).to_string()
            } else if let Some(key) = var["valueFrom"]["secretKeyRef"].as_object() {
                assert!(
                    key.get("optional") != Some(&Value::Bool(true)),
                    "env {name}: an optional secret may be missing in a cluster"
                );
                let secret = manifests.get(
                    "Secret",
                    namespace,
                    key["name"].as_str().expect("secret name"),
                );
                let item = key["key"].as_str().expect("secret key");
                secret["stringData"][item]
                    .as_str()
                    .unwrap_or_else(|| panic!("Secret key {item} is missing"))
                    .to_owned()
            } else {
                panic!("env {name}: a source not known here: {var}")
            };
            referable.insert(name, value);
        }
        let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
        env.extend(referable.clone());
        env.insert("HOSTNAME".into(), pod.to_owned());
        Container { env, referable }
    }

    /// Its command line: `command` (else the image's entrypoint) and `args` (else, without a
    /// `command`, the image's command), `$(VAR)` expanded; the image's binary path replaced by
    /// the one cargo built. The process gets [`Self::env`] and nothing else.
    fn command(&self, image: &Image, container: &Value) -> Command {
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .map(|s| expand(s.as_str().expect("a string"), &self.referable))
                    .collect()
            })
        };
        let command = strings(&container["command"]);
        let args = strings(&container["args"]).unwrap_or_else(|| match command {
            Some(_) => Vec::new(),
            None => image.cmd.clone(),
        });
        let entrypoint = command.unwrap_or_else(|| image.entrypoint.clone());
        assert_eq!(
            entrypoint,
            ["/usr/local/bin/turnstile"],
            "the entrypoint the Dockerfile installs"
        );
        let mut process = Command::new(env!("CARGO_BIN_EXE_turnstile"));
        process.args(args).env_clear().envs(&self.env);
        process
    }
}

/// Runs `process` as the pod's user and group (`securityContext`, the container's over the
/// pod's), as the kubelet does, when the test runs as root; the data dir `volume` owned by them
/// as `fsGroup` makes a volume. Elsewhere the process runs as the test's user.
fn as_pod_user(process: &mut Command, spec: &Value, container: &Value, volume: Option<&Path>) {
    let field = |name: &str| {
        container["securityContext"][name]
            .as_u64()
            .or_else(|| spec["securityContext"][name].as_u64())
    };
    let uid = field("runAsUser").expect("runAsUser") as u32;
    let gid = field("runAsGroup").expect("runAsGroup") as u32;
    assert_ne!(uid, 0, "the pods run as a user other than root");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the pods run as the test's user, not as {uid}");
        return;
    }
    if let Some(volume) = volume {
        let group = spec["securityContext"]["fsGroup"]
            .as_u64()
            .expect("fsGroup");
        std::fs::create_dir_all(volume).expect("the pod's volume");
        let owned = Command::new("chown")
            .arg(format!("{uid}:{group}"))
            .arg(volume)
            .status()
            .expect("chown");
        assert!(owned.success());
    }
    std::os::unix::process::CommandExt::uid(process, uid);
    std::os::unix::process::CommandExt::gid(process, gid);
}

/// The NetworkPolicies of `namespace` that select a pod labelled `labels`, for `direction`
/// (`Ingress` or `Egress`).
fn policies<'a>(
    manifests: &'a Manifests,
    namespace: &'a str,
    labels: &'a Value,
    direction: &'a str,
) -> impl Iterator<Item = &'a Value> {
    manifests
        .all("NetworkPolicy", namespace)
        .filter(move |p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
        .filter(move |p| {
            p["spec"]["policyTypes"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == direction))
        })
}

/// True when a rule of `rules` opens TCP `port` (a rule without ports opens every port).
fn opens(rule: &Value, port: u64) -> bool {
    rule["ports"].as_array().is_none_or(|ports| {
        ports
            .iter()
            .any(|p| p["port"].as_u64() == Some(port) && p["protocol"] != "UDP")
    })
}

/// A namespace's labels, as Kubernetes sets them.
fn namespace_labels(name: &str) -> Value {
    serde_json::json!({ "kubernetes.io/metadata.name": name })
}

/// True when `peer` (an entry of a rule's `to` or `from`, in a policy of `namespace`) selects a
/// pod labelled `pod` in namespace `other`.
fn peer_selects(peer: &Value, namespace: &str, other: &str, pod: &Value) -> bool {
    if peer.get("ipBlock").is_some() {
        return false;
    }
    let namespace_ok = match peer.get("namespaceSelector") {
        None => namespace == other,
        Some(selector) => selects(&selector["matchLabels"], &namespace_labels(other)),
    };
    let pod_ok = peer
        .get("podSelector")
        .is_none_or(|selector| selects(&selector["matchLabels"], pod));
    namespace_ok && pod_ok
}

/// True when the policies let a pod labelled `labels` in `namespace` send to, or (`Ingress`)
/// receive from, a pod labelled `peer` in `peer_namespace`, on TCP `port`. A pod no policy of
/// that direction selects is not isolated.
fn allows(
    manifests: &Manifests,
    direction: &str,
    (namespace, labels): (&str, &Value),
    (peer_namespace, peer): (&str, &Value),
    port: u64,
) -> bool {
    let (rules, peers) = match direction {
        "Egress" => ("egress", "to"),
        _ => ("ingress", "from"),
    };
    let mut selecting = policies(manifests, namespace, labels, direction).peekable();
    if selecting.peek().is_none() {
        return true;
    }
    selecting
        .flat_map(|p| p["spec"][rules].as_array().cloned().unwrap_or_default())
        .any(|rule| {
            opens(&rule, port)
                && rule[peers].as_array().is_none_or(|list| {
                    list.iter()
                        .any(|p| peer_selects(p, namespace, peer_namespace, peer))
                })
        })
}

/// True when the pods labelled `labels` in `namespace` may send to addresses outside the cluster
/// on TCP `port` (an `ipBlock` rule).
fn egress_outside(manifests: &Manifests, namespace: &str, labels: &Value, port: u64) -> bool {
    policies(manifests, namespace, labels, "Egress")
        .flat_map(|p| p["spec"]["egress"].as_array().cloned().unwrap_or_default())
        .any(|rule| {
            opens(&rule, port)
                && rule["to"]
                    .as_array()
                    .is_some_and(|to| to.iter().any(|peer| peer.get("ipBlock").is_some()))
        })
}

/// The port of a `scheme://[user@]host[:port][/...]` URL (`default` without one).
fn url_port(url: &str, default: u64) -> u64 {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    host.rsplit_once(':')
        .map_or(default, |(_, port)| port.parse().expect("a port"))
}

/// Every `TURNSTILE_*` variable `turnstile serve` reads, from its `--help`.
fn serve_options() -> HashSet<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["serve", "--help"])
        .output()
        .expect("turnstile serve --help");
    String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect()
}

/// Fails on a variable the test does not know: neither a `serve` option nor in [`NOT_OPTIONS`].
fn assert_known(env: &BTreeMap<String, String>, options: &HashSet<String>) {
    for name in env.keys() {
        assert!(
            options.contains(name) || NOT_OPTIONS.iter().any(|(known, _)| known == name),
            "the manifests set {name}, which `turnstile serve` does not read (not in its --help) \
             and tests/deploy.rs does not know"
        );
    }
    assert!(
        SUBSTITUTED.iter().all(|(name, _)| options.contains(*name)),
        "a substituted variable is no longer a serve option"
    );
}

/// The local services the substitutions point at.
struct Local {
    database: TestDatabase,
    redis: TestRedis,
    broker: TestBroker,
    sim: Sim,
    dir: tempfile::TempDir,
}

const CLUSTER_SECRET: &str = "deploy-test-cluster-secret";
const ADMIN_TOKEN: &str = "deploy-test-admin-token";

impl Local {
    /// [`SUBSTITUTED`], applied to pod `pod`'s environment, listening on `port`; `pod_dns` is
    /// the pod's address in the headless Service (`host:port`), `volume` its data mount.
    fn substitute(
        &self,
        env: &mut BTreeMap<String, String>,
        pod: &str,
        port: u16,
        pod_dns: &str,
        volume: &str,
    ) {
        let mut replace = |name: &str, expected: Option<&str>, local: String| {
            let given = env
                .get(name)
                .unwrap_or_else(|| panic!("the manifests no longer set {name}"));
            if let Some(expected) = expected {
                assert_eq!(given, expected, "{name} as the manifests give it");
            }
            env.insert(name.to_owned(), local);
        };
        let container_port = pod_dns.rsplit(':').next().expect("port");
        replace(
            "TURNSTILE_LISTEN",
            Some(&format!("0.0.0.0:{container_port}")),
            format!("127.0.0.1:{port}"),
        );
        replace(
            "TURNSTILE_DATA_DIR",
            Some(volume),
            self.dir.path().join(pod).display().to_string(),
        );
        replace(
            "TURNSTILE_ADVERTISE_URL",
            Some(&format!("http://{pod_dns}")),
            format!("http://127.0.0.1:{port}"),
        );
        replace("TURNSTILE_MYSQL_URL", None, self.database.url.clone());
        replace("TURNSTILE_REDIS_URL", None, REDIS_URL.to_owned());
        replace("TURNSTILE_REDIS_PREFIX", None, self.redis.prefix.clone());
        let broker = self.broker.args();
        replace("TURNSTILE_AMQP_URL", None, broker[1].clone());
        replace("TURNSTILE_AMQP_EXCHANGE", None, broker[3].clone());
        replace("TURNSTILE_GATEWAY_URL", None, self.sim.url());
        replace("TURNSTILE_CLUSTER_SECRET", None, CLUSTER_SECRET.to_owned());
        replace(
            "TURNSTILE_WEBHOOK_SECRET",
            None,
            helpers::WEBHOOK_SECRET.to_owned(),
        );
        replace("TURNSTILE_ADMIN_TOKEN", None, ADMIN_TOKEN.to_owned());
    }
}

/// A checkout's end as a buyer saw it.
#[derive(Debug, Clone)]
struct Attempt {
    pod: usize,
    key: String,
    sent: Instant,
    answer: Result<u16, String>,
    order_id: Option<String>,
}

/// Buyers sending one-unit checkouts of `sku` round-robin over the `pods` still in the Service's
/// endpoints, a new key per buyer; a transport error or a 503 is retried with the same key on the
/// next pod, as a buyer's retry through the Service would be. Stops once `stock` units are sold,
/// or after `ATTEMPTS_MAX` attempts or two minutes.
struct Buyers {
    stop: Arc<AtomicBool>,
    /// Pods taken out of the endpoints (a pod being deleted is, at once): no new request goes
    /// there; those already sent finish.
    out: Arc<Vec<AtomicBool>>,
    sold: Arc<AtomicUsize>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Buyers {
    fn start(pods: Vec<std::net::SocketAddr>, sku: &str, stock: usize, buyers: usize) -> Self {
        const ATTEMPTS_MAX: usize = 200_000;
        let stop = Arc::new(AtomicBool::new(false));
        let out: Arc<Vec<AtomicBool>> =
            Arc::new(pods.iter().map(|_| AtomicBool::new(false)).collect());
        let sold = Arc::new(AtomicUsize::new(0));
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::new(Mutex::new(Vec::new()));
        let next_key = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs(120);
        let tasks = (0..buyers)
            .map(|buyer| {
                let (stop, out, sold, attempts, next_key, pods) = (
                    Arc::clone(&stop),
                    Arc::clone(&out),
                    Arc::clone(&sold),
                    Arc::clone(&attempts),
                    Arc::clone(&next_key),
                    pods.clone(),
                );
                let sku = sku.to_owned();
                tokio::spawn(async move {
                    let mut clients: Vec<Client> = pods.iter().map(|&a| Client::new(a)).collect();
                    let mut pod = buyer % pods.len();
                    while !stop.load(Ordering::Acquire)
                        && sold.load(Ordering::Acquire) < stock
                        && Instant::now() < deadline
                    {
                        let key = format!("deploy-{}", next_key.fetch_add(1, Ordering::AcqRel));
                        for _ in 0..pods.len() * 4 {
                            pod = (pod + 1) % pods.len();
                            if out[pod].load(Ordering::Acquire) {
                                continue;
                            }
                            let sent = Instant::now();
                            let got = clients[pod].checkout(&key, &sku, 1, "tok_ok").await;
                            let answer = got.as_ref().map(|a| a.status).map_err(Clone::clone);
                            let order_id = got.as_ref().ok().and_then(|a| {
                                serde_json::from_slice::<Value>(&a.body).ok()?["order_id"]
                                    .as_str()
                                    .map(str::to_owned)
                            });
                            let done = matches!(answer, Ok(status) if status != 503);
                            if answer == Ok(201) {
                                sold.fetch_add(1, Ordering::AcqRel);
                            }
                            let mut all = attempts.lock().expect("attempts");
                            all.push(Attempt {
                                pod,
                                key: key.clone(),
                                sent,
                                answer,
                                order_id,
                            });
                            if done || all.len() >= ATTEMPTS_MAX {
                                break;
                            }
                        }
                        if attempts.lock().expect("attempts").len() >= ATTEMPTS_MAX {
                            return;
                        }
                    }
                })
            })
            .collect();
        Buyers {
            stop,
            out,
            sold,
            attempts,
            tasks,
        }
    }

    /// Takes `pod` out of the endpoints.
    fn remove(&self, pod: usize) {
        self.out[pod].store(true, Ordering::Release);
    }

    async fn finish(self) -> Vec<Attempt> {
        for task in self.tasks {
            task.await.expect("a buyer");
        }
        self.stop.store(true, Ordering::Release);
        let attempts = self.attempts.lock().expect("attempts").clone();
        attempts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_of_the_statefulset_sell_the_stock_and_one_sent_sigterm_drains_within_its_grace()
{
    const STOCK: usize = 600;
    let manifests = Manifests::render();
    let image = Image::read();
    let options = serve_options();
    let namespace = "turnstile";
    let set = manifests.get("StatefulSet", namespace, "turnstile");
    let spec = &set["spec"]["template"]["spec"];
    let labels = &set["spec"]["template"]["metadata"]["labels"];
    let container = &spec["containers"][0];
    assert_eq!(spec["containers"].as_array().map(Vec::len), Some(1));
    assert!(
        selects(&set["spec"]["selector"]["matchLabels"], labels),
        "the StatefulSet selects its pods"
    );
    assert_eq!(
        spec["enableServiceLinks"], false,
        "without it the kubelet adds TURNSTILE_SERVICE_HOST, TURNSTILE_PORT... (from the Service `turnstile`) to the pods' environment"
    );
    assert_eq!(
        Container::new(&image, &manifests, container, "turnstile-0", namespace).env
            ["TURNSTILE_MYSQL_WRITE_BEHIND"],
        "true",
        "the pods run in write-behind"
    );
    let port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a port named http")["containerPort"]
        .as_u64()
        .expect("containerPort");
    // The Services: the pods' DNS names from a headless one that publishes them before they
    // are ready; the buyers' one on the same port, both selecting the pods.
    let service = set["spec"]["serviceName"].as_str().expect("serviceName");
    let peers = manifests.get("Service", namespace, service);
    assert_eq!(peers["spec"]["clusterIP"], "None", "{service} is headless");
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
    let selecting: Vec<&Value> = manifests
        .all("Service", namespace)
        .filter(|s| selects(&s["spec"]["selector"], labels))
        .collect();
    assert!(
        selecting.iter().any(|s| s["spec"]["clusterIP"] != "None"),
        "a Service for buyers selects the pods"
    );
    for service in &selecting {
        for p in service["spec"]["ports"].as_array().expect("ports") {
            assert_eq!(
                p["targetPort"], "http",
                "{}'s targetPort",
                service["metadata"]["name"]
            );
        }
    }
    // The NetworkPolicies let the pods reach what their URLs name and one another.
    let secret = manifests.get("Secret", namespace, "turnstile-secrets");
    let config = Container::new(&image, &manifests, container, "turnstile-0", namespace);
    // Both sides of each connection the pods make: their own egress, and the ingress policies
    // of the data stores' namespace (data-stores/), each store by its label.
    let stores = "databases";
    let dns = serde_json::json!({ "k8s-app": "kube-dns" });
    let both_ways = |from: (&str, &Value), to: (&str, &Value), port: u64| {
        allows(&manifests, "Egress", from, to, port)
            && allows(&manifests, "Ingress", to, from, port)
    };
    for (what, url, default, store) in [
        (
            "mysql-url",
            secret["stringData"]["mysql-url"].as_str(),
            3306,
            "mysql",
        ),
        (
            "redis-url",
            secret["stringData"]["redis-url"].as_str(),
            6379,
            "redis",
        ),
        (
            "amqp-url",
            secret["stringData"]["amqp-url"].as_str(),
            5672,
            "rabbitmq",
        ),
    ] {
        let port = url_port(url.expect(what), default);
        let store_pods = serde_json::json!({ "app.kubernetes.io/name": store });
        assert!(
            both_ways((namespace, labels), (stores, &store_pods), port),
            "the policies do not let the pods reach {what} ({store} in {stores}) on {port}"
        );
    }
    let gateway = config
        .env
        .get("TURNSTILE_GATEWAY_URL")
        .expect("the gateway's URL");
    assert!(
        egress_outside(&manifests, namespace, labels, url_port(gateway, 443)),
        "no egress rule lets the pods reach the gateway"
    );
    assert!(
        allows(
            &manifests,
            "Egress",
            (namespace, labels),
            ("kube-system", &dns),
            53
        ),
        "no egress rule lets the pods reach DNS"
    );
    assert!(
        both_ways((namespace, labels), (namespace, labels), port),
        "the policies do not let the pods reach one another on {port}"
    );
    let volume = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"])
        .expect("the data volume is mounted");
    assert!(volume.get("subPath").is_none() && volume["readOnly"] != true);
    let volume = volume["mountPath"].as_str().expect("mountPath").to_owned();
    let grace = Duration::from_secs(
        spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let pre_stop = Duration::from_secs(
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .expect("a preStop sleep"),
    );
    let probe = |probe: &str| {
        assert_eq!(
            container[probe]["httpGet"]["port"], "http",
            "{probe}'s port"
        );
        container[probe]["httpGet"]["path"]
            .as_str()
            .expect("path")
            .to_owned()
    };
    let (startup, liveness, readiness) = (
        probe("startupProbe"),
        probe("livenessProbe"),
        probe("readinessProbe"),
    );

    let local = Local {
        database: TestDatabase::create_empty().await,
        redis: TestRedis::create("deploy").await,
        broker: TestBroker::create("deploy").await,
        sim: Sim::start(&format!("127.0.0.1:{}", free_port()), &[]),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    // Pods running as their own user reach their volumes under it.
    let opened = Command::new("chmod")
        .arg("755")
        .arg(local.dir.path())
        .status()
        .expect("chmod");
    assert!(opened.success());

    // The migrate Job first, as an upgrade runs it: its own command, environment and user.
    let job = manifests
        .all("Job", namespace)
        .find(|j| {
            j["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"
        })
        .expect("the migrate Job");
    let job_spec = &job["spec"]["template"]["spec"];
    let job_container = &job_spec["containers"][0];
    let job_labels = &job["spec"]["template"]["metadata"]["labels"];
    let mysql_pods = serde_json::json!({ "app.kubernetes.io/name": "mysql" });
    let mysql_port = url_port(
        secret["stringData"]["mysql-url"]
            .as_str()
            .expect("mysql-url"),
        3306,
    );
    assert!(
        allows(
            &manifests,
            "Egress",
            (namespace, job_labels),
            ("kube-system", &dns),
            53
        ) && both_ways((namespace, job_labels), (stores, &mysql_pods), mysql_port),
        "the policies do not let the migrate Job reach DNS and MySQL"
    );
    // Named after the version it migrates to, as deploy/README.md's upgrade asks, with the image.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        job["metadata"]["name"],
        format!("turnstile-migrate-{}", version.replace('.', "-")),
        "the migrate Job is named after the crate's version"
    );
    for image_of in [job_container, container] {
        let image = image_of["image"].as_str().expect("image");
        assert!(
            image.ends_with(&format!(":{version}")),
            "{image}: the image's tag is the crate's version"
        );
    }
    let mut job_run = Container::new(
        &image,
        &manifests,
        job_container,
        "turnstile-migrate-x",
        namespace,
    );
    assert_known(&job_run.env, &options);
    job_run
        .env
        .insert("TURNSTILE_MYSQL_URL".into(), local.database.url.clone());
    let mut migrate = job_run.command(&image, job_container);
    as_pod_user(&mut migrate, job_spec, job_container, None);
    let migrated = migrate.output().expect("run the migrate Job's command");
    assert!(
        migrated.status.success(),
        "the migrate Job failed: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    // Three pods, as the kubelet starts them.
    let set_name = set["metadata"]["name"].as_str().expect("name");
    let mut pods: Vec<TestApp> = (0..3)
        .map(|ordinal| {
            let pod = format!("{set_name}-{ordinal}");
            let mut run = Container::new(&image, &manifests, container, &pod, namespace);
            assert_known(&run.env, &options);
            let dns = format!("{pod}.{service}.{namespace}.svc.cluster.local:{port}");
            local.substitute(&mut run.env, &pod, free_port(), &dns, &volume);
            let mut command = run.command(&image, container);
            let data = local.dir.path().join(&pod);
            as_pod_user(&mut command, spec, container, Some(&data));
            start_command(command, &data)
        })
        .collect();
    for (pod, app) in pods.iter().enumerate() {
        let mut client = app.client();
        for path in [&startup, &liveness, &readiness] {
            eventually(
                &format!("pod {pod}'s probe {path} to pass"),
                Duration::from_secs(30),
                async || client.get(path).await.status == 200,
            )
            .await;
        }
    }
    let pool = local.database.pool().await;
    let modes: Vec<String> = sqlx::query_scalar("SELECT mode FROM cluster_nodes")
        .fetch_all(&pool)
        .await
        .expect("the nodes' modes");
    assert_eq!(
        modes, ["write-behind"; 3],
        "three nodes, each in write-behind"
    );

    assert_eq!(
        pods[0]
            .client()
            .put_product("DROP", 1_500, STOCK as i64)
            .await
            .status,
        200
    );
    for app in &pods {
        let mut client = app.client();
        eventually(
            "the product to reach every pod",
            Duration::from_secs(5),
            async || client.get("/v1/products/DROP").await.status == 200,
        )
        .await;
    }

    // Buyers through all three; once a third of the stock is sold, pod 2 is scaled away.
    let buyers = Buyers::start(pods.iter().map(|p| p.addr).collect(), "DROP", STOCK, 16);
    {
        let sold = Arc::clone(&buyers.sold);
        eventually(
            "a third of the stock to sell",
            Duration::from_secs(60),
            async || sold.load(Ordering::Acquire) >= STOCK / 3,
        )
        .await;
    }
    let stopping = 2;
    let (mut readyz, mut livez) = (pods[stopping].client(), pods[stopping].client());
    eventually(
        "pod 2 to be ready before its SIGTERM",
        Duration::from_secs(10),
        async || readyz.get(&readiness).await.status == 200,
    )
    .await;
    // Deleting the pod takes it out of the Service's endpoints (new checkouts go to the others)
    // and, after the preStop sleep, sends SIGTERM. The sleep changes nothing in the process, so
    // it is not repeated here.
    buyers.remove(stopping);
    let signalled = Instant::now();
    pods[stopping].send_sigterm();
    // The readiness probe turns 503 at once and stays so until the pod stops listening; the
    // liveness probe stays 200 meanwhile (a failing one would have the kubelet kill the drain).
    let mut answers = Vec::new();
    loop {
        match readyz.try_send("GET", &readiness, &[], "").await {
            Ok(answer) => {
                let stopping_said =
                    answer.status == 503 && answer.json()["checks"]["stopping"].as_str().is_some();
                answers.push((answer.status, stopping_said));
                if answers.len() >= 50 {
                    break;
                }
            }
            Err(_) => break,
        }
        if let Ok(alive) = livez.try_send("GET", &liveness, &[], "").await {
            assert_eq!(
                alive.status, 200,
                "the liveness probe failed during the drain"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (Answers before the first 503 may precede the signal's delivery to the process.)
    let first_503 = answers
        .iter()
        .position(|(status, _)| *status == 503)
        .unwrap_or_else(|| panic!("the readiness probe ({readiness}) never answered 503 after SIGTERM, while the pod still listened: {answers:?}"));
    assert!(
        answers[first_503..]
            .iter()
            .all(|&(status, said)| status == 503 && said),
        "the readiness probe ({readiness}) must stay 503, saying the node is stopping: {answers:?}"
    );

    // It exits 0 within the grace the manifest gives it after its preStop sleep.
    let bound = grace - pre_stop;
    let exited = loop {
        if let Some(status) = pods[stopping].try_wait() {
            break status;
        }
        if signalled.elapsed() > bound {
            pods[stopping].kill_9();
            panic!("pod 2 did not exit within terminationGracePeriodSeconds less its preStop sleep ({bound:?}): the kubelet would have killed it");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drained = signalled.elapsed();
    assert!(exited.success(), "pod 2's exit after SIGTERM: {exited:?}");

    let attempts = buyers.finish().await;
    // Every checkout pod 2 had taken before the signal was answered by it.
    let unanswered: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.pod == stopping && a.sent < signalled && a.answer.is_err())
        .collect();
    assert!(
        unanswered.is_empty(),
        "checkouts pod 2 took before SIGTERM and never answered: {unanswered:?}"
    );
    let sold_by_2 = attempts
        .iter()
        .filter(|a| a.pod == stopping && a.answer == Ok(201))
        .count();
    assert!(sold_by_2 > 0, "pod 2 sold nothing before it was stopped");
    eprintln!(
        "pod 2 sold {sold_by_2}, exited 0 {drained:?} after SIGTERM (bound {bound:?}); {} checkout attempts in all",
        attempts.len()
    );

    // Its leases are back in the pool: nothing left for sale in its lease, its row says it left.
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(units), 0) AS SIGNED), CAST(COALESCE(SUM(reserved + sold), 0) AS SIGNED) \
         FROM stock_leases WHERE node_id = ?",
    )
    .bind(format!("{set_name}-{stopping}"))
    .fetch_one(&pool)
    .await
    .expect("pod 2's leases");
    let (units, committed): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(units, committed, "pod 2 kept units for sale after it left");
    let state: String = sqlx::query_scalar("SELECT state FROM cluster_nodes WHERE node_id = ?")
        .bind(format!("{set_name}-{stopping}"))
        .fetch_one(&pool)
        .await
        .expect("pod 2's row");
    assert_eq!(state, "left");

    // The two left sold every unit: exactly the stock, one order per key (a retry of a key
    // whose answer was lost replays the same order).
    let mut orders: HashMap<String, String> = HashMap::new();
    record(&mut orders, &attempts);
    if orders.len() < STOCK {
        // Buyers ran out of attempts or time before the last units: a second wave, pods 0 and 1.
        let more = Buyers::start(
            pods[..2].iter().map(|p| p.addr).collect(),
            "DROP",
            STOCK - orders.len(),
            8,
        );
        record(&mut orders, &more.finish().await);
    }
    let orders: HashSet<String> = orders.into_values().collect();
    assert_eq!(orders.len(), STOCK, "every unit sold, never more");
    let (stock, in_pool, leased): (i64, i64, i64) = {
        let row = sqlx::query(
            "SELECT p.stock, sp.pool, \
               CAST((SELECT COALESCE(SUM(units), 0) FROM stock_leases l WHERE l.sku = p.sku) AS SIGNED) \
             FROM products p JOIN stock_pool sp ON sp.sku = p.sku WHERE p.sku = 'DROP'",
        )
        .fetch_one(&pool)
        .await
        .expect("the books");
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(in_pool + leased, stock, "pool + Σ leases == stock");
    assert_eq!(in_pool, 0, "the pool is empty once every unit is sold");
    for app in &pods[..2] {
        let mut client = app.client();
        eventually(
            "every pod left to see the stock sold out",
            Duration::from_secs(10),
            async || {
                let (stock, available, _, sold) = client.stock("DROP").await;
                available == 0 && sold == stock
            },
        )
        .await;
    }
    // MySQL holds every order as paid (pod 2's too), and the gateway captured each once.
    let mut paid: Vec<String> = Vec::new();
    eventually(
        "every paid order to reach MySQL",
        Duration::from_secs(60),
        async || {
            paid = sqlx::query_scalar(
                "SELECT CAST(order_id AS CHAR) FROM orders WHERE status = 'paid'",
            )
            .fetch_all(&pool)
            .await
            .expect("paid orders");
            paid.len() >= STOCK
        },
    )
    .await;
    let paid: HashSet<String> = paid.into_iter().collect();
    assert_eq!(
        paid, orders,
        "the paid orders in MySQL are the ones the buyers were sold"
    );
    let ledger = local.sim.ledger().await;
    let captured = ledger.iter().filter(|p| p["status"] == "captured").count();
    assert_eq!(captured, STOCK, "one capture per unit sold");
    pool.close().await;
    for pod in &mut pods {
        pod.kill_9();
    }
    let Local { broker, .. } = local;
    broker.delete().await;
}

/// Adds the orders of `attempts`' sales to `orders` by key: a key sold twice must name one order.
fn record(orders: &mut HashMap<String, String>, attempts: &[Attempt]) {
    for attempt in attempts.iter().filter(|a| a.answer == Ok(201)) {
        let order = attempt.order_id.clone().expect("a 201 names its order");
        let earlier = orders.insert(attempt.key.clone(), order.clone());
        assert!(
            earlier.is_none_or(|earlier| earlier == order),
            "two orders under {}",
            attempt.key
        );
    }
}

//! The fuzz targets' short run, in the test command: every target of `turnstile::fuzzing` over
//! its corpus (`fuzz/corpus/<target>/`, seeds and what longer `cargo fuzz` runs kept), then over
//! mutations of it (bit flips, byte changes, insertions, deletions, duplications and splices,
//! from a fixed seed, `TURNSTILE_FUZZ_MUTATIONS` per target, default 20,000). An input that makes
//! a target panic is written to `target/fuzz-failures/<target>/` and fails the test. The
//! coverage-guided runs are `cargo fuzz run <target>` (fuzz/README.md).
//!
//! `make_seeds` (ignored; `cargo test --test fuzz_corpus make_seeds -- --ignored`) writes the
//! journal's seeds from a real server's segment.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// A small deterministic generator (xorshift64*), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `input` changed in 1–4 ways, some with pieces of `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = [0, 0x7f, 0xff, b'\n', b'"', b',', b'='][rng.below(7)];
            }
            2 => out.insert(at, rng.next() as u8),
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(32)).min(out.len());
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            _ if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[start..end].iter().copied());
            }
            _ => out.push(rng.next() as u8),
        }
    }
    out
}

/// Runs `target` on `input`; on a panic, keeps the input and says where.
fn survive(name: &str, target: fn(&[u8]), input: &[u8]) -> Result<(), String> {
    let result = std::panic::catch_unwind(|| target(input));
    if result.is_ok() {
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/fuzz-failures")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!(
        "crash-{}",
        turnstile::random::hex(&input[..input.len().min(8)])
    ));
    let _ = std::fs::write(&path, input);
    Err(format!(
        "{name} panicked on {} (kept: {})",
        input.len(),
        path.display()
    ))
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations_of_it() {
    let mutations: usize = std::env::var("TURNSTILE_FUZZ_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let mut failures = Vec::new();
    for (name, target) in turnstile::fuzzing::TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for {name} at {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        let corpus: Vec<Vec<u8>> = files
            .iter()
            .map(|path| std::fs::read(path).expect("a corpus file"))
            .collect();
        assert!(!corpus.is_empty(), "the corpus of {name} is empty");
        for input in &corpus {
            if let Err(failure) = survive(name, *target, input) {
                failures.push(failure);
            }
        }
        let mut rng = Rng(0x5eed_u64 ^ (name.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for _ in 0..mutations {
            let input = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            let mutated = mutate(&mut rng, input, other);
            if let Err(failure) = survive(name, *target, &mutated) {
                failures.push(failure);
                break;
            }
        }
        eprintln!(
            "{name}: {} corpus inputs, {mutations} mutations",
            corpus.len()
        );
    }
    assert!(
        failures.is_empty(),
        "fuzz targets failed:\n{}",
        failures.join("\n")
    );
}

/// Writes the journal targets' seeds from a real server's segment: the whole segment
/// (`segment_reader`) and each frame's record (`record_codec`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn make_seeds() {
    let mut app = helpers::spawn_app(&["--sim-pending-delay", "50ms"]);
    let mut client = app.client();
    assert_eq!(client.put_product("SEED", 1_999, 100).await.status, 200);
    for (n, token) in ["tok_ok", "tok_pending", "tok_decline", "tok_ok"]
        .iter()
        .enumerate()
    {
        let _ = client
            .checkout(&format!("seed-{n}"), "SEED", 2, token)
            .await;
    }
    let paid = client
        .checkout("seed-cancel", "SEED", 1, "tok_ok")
        .await
        .expect("answer");
    let order: serde_json::Value = serde_json::from_slice(&paid.body).expect("JSON");
    let order_id = order["order_id"].as_str().expect("order_id");
    let _ = client
        .send("POST", &format!("/v1/orders/{order_id}/cancel"), &[], "")
        .await;
    assert!(app.terminate().success());
    let segment = std::fs::read_dir(&app.data_dir)
        .expect("the data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .expect("a segment");
    let bytes = std::fs::read(&segment).expect("the segment");
    std::fs::create_dir_all(corpus_dir("segment_reader")).expect("corpus dir");
    std::fs::write(corpus_dir("segment_reader").join("seed-segment"), &bytes).expect("seed");
    let scan = turnstile::journal::file::format::scan_segment(&bytes, 1);
    std::fs::create_dir_all(corpus_dir("record_codec")).expect("corpus dir");
    for frame in &scan.frames {
        std::fs::write(
            corpus_dir("record_codec").join(format!("seed-record-{}", frame.lsn)),
            frame.payload,
        )
        .expect("seed");
    }
    eprintln!("{} records", scan.frames.len());
}

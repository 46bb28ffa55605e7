//! Fault points for tests, so a test can `kill -9` the server at an exact step of the money flow.
//!
//! They exist only in builds with the `fault-points` feature, which the test build turns on by
//! itself (`Cargo.toml`: the crate is its own dev-dependency with that feature, so `cargo test`
//! builds the binary the tests start with it): a release build has neither the code nor the name
//! of its variable. With the feature, `TURNSTILE_TEST_PAUSE=<point>` in the environment stops the
//! money flow for an hour at that point (`after_authorize`, `before_capture`, `after_capture`),
//! and `TURNSTILE_TEST_FAIL_SYNC=<file>` makes every `fdatasync` of the embedded journal fail
//! while that file exists (the fault suite's failing disk). Read once; costs one load when
//! unset.

/// Stops here for an hour if the environment names `point` (only in builds with `fault-points`).
#[cfg(feature = "fault-points")]
pub async fn pause_at(point: &str) {
    static PAUSE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let configured = PAUSE.get_or_init(|| std::env::var("TURNSTILE_TEST_PAUSE").ok());
    if configured.as_deref() == Some(point) {
        tracing::warn!(point, "TURNSTILE_TEST_PAUSE: pausing the money flow here");
        tokio::time::sleep(std::time::Duration::from_secs(3_600)).await;
    }
}

/// Nothing: this build has no fault points.
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub async fn pause_at(_point: &str) {}

/// An `fdatasync` of the embedded journal fails here while the file `TURNSTILE_TEST_FAIL_SYNC`
/// names exists (only in builds with `fault-points`).
#[cfg(feature = "fault-points")]
pub fn sync_may_fail() -> std::io::Result<()> {
    static FLAG: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let flag = FLAG.get_or_init(|| std::env::var_os("TURNSTILE_TEST_FAIL_SYNC").map(Into::into));
    match flag {
        Some(path) if path.exists() => Err(std::io::Error::other(
            "TURNSTILE_TEST_FAIL_SYNC: fdatasync failing (a fault point of the tests)",
        )),
        _ => Ok(()),
    }
}

/// Nothing: this build has no fault points.
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn sync_may_fail() -> std::io::Result<()> {
    Ok(())
}

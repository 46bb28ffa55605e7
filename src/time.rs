//! Wall-clock time for the edges (the engine takes it as an argument) and RFC 3339 formatting
//! (`humantime`). Durations on the command line are parsed in [`crate::config::parse_duration`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Formats Unix milliseconds as an RFC 3339 UTC time with milliseconds: `2026-11-26T01:02:03.456Z`.
/// A time before 1970 (never produced by this server's clock) is shown as the epoch.
pub fn rfc3339(unix_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_654_923_456), "2026-11-26T01:02:03.456Z");
    }
}

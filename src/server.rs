//! Wiring: open the journal, rebuild the engine from it, and run until SIGTERM/SIGINT.
//!
//! The HTTP API is not served yet (it arrives with the HTTP issue): for now `serve` proves that the
//! engine starts on the embedded journal, recovers what it holds, and stops cleanly.

use crate::engine::{Engine, EngineConfig};
use crate::journal::file::{FileJournal, FileJournalConfig};
use crate::journal::{Journal, JournalError};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the embedded journal lives.
    pub data_dir: PathBuf,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The journal could not be opened or recovered.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal's content contradicts itself.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The async runtime or the signal handlers could not start.
    #[error("{context}: {source}")]
    Runtime {
        /// What was being started.
        context: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A prefix for this run's order ids: the start time in microseconds, so ids differ across runs.
pub fn order_id_prefix() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("ord_{micros:x}_")
}

/// Opens the journal, rebuilds the engine and waits for a stop signal.
pub fn run(options: ServeOptions) -> Result<(), ServeError> {
    let (journal, state) = FileJournal::open_dir(&options.data_dir, FileJournalConfig::default())?;
    let config = EngineConfig {
        order_id_prefix: order_id_prefix(),
        ..EngineConfig::default()
    };
    let engine = Engine::from_state(config, &state)?;
    drop(state);
    tracing::info!(
        data_dir = %options.data_dir.display(),
        skus = engine.inventory().len(),
        "engine ready on the embedded journal; the HTTP API is not served yet"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Runtime {
            context: "starting the async runtime",
            source,
        })?;
    runtime.block_on(wait_for_stop_signal())?;
    tracing::info!("stop signal received; flushing the journal");
    journal.close();
    Ok(())
}

async fn wait_for_stop_signal() -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| ServeError::Runtime {
        context: "installing the SIGTERM handler",
        source,
    })?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

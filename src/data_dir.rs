//! One data dir, one server: `serve` on the embedded journal holds an exclusive `flock` on a lock
//! file inside its data dir for as long as it runs, with its pid written in the file, so a second
//! server on the same dir is refused (naming the holder) instead of interleaving writes into the
//! same journal.
//!
//! `flock` locks belong to the open file, not to the file's existence: the kernel drops the lock
//! when the process ends however it ends (`kill -9` included), so a lock file left behind by a dead
//! process never blocks a new one; the new holder simply writes its own pid over the old.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data dir.
pub const LOCK_FILE_NAME: &str = "turnstile.lock";

/// Why the data dir could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process holds the dir.
    #[error("the data dir {} is in use by {} (it holds {LOCK_FILE_NAME} there); stop that process or pass another --data-dir", dir.display(), holder(*pid))]
    InUse {
        /// The data dir.
        dir: PathBuf,
        /// The holder's pid as written in the lock file (`None` if it has not written it yet).
        pid: Option<u32>,
    },
    /// The dir or its lock file could not be created, opened, locked or written.
    #[error("cannot take the data dir {}: {context}: {source}; pass a --data-dir this user may write to", dir.display())]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("process {pid}"),
        None => "another process (which has not written its pid yet)".to_owned(),
    }
}

/// The held lock: the dir stays ours until this is dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    /// The open lock file; closing it releases the lock.
    _file: File,
}

/// Creates `dir` if missing and takes its lock, writing this process's pid into the lock file.
pub fn lock(dir: &Path) -> Result<DataDirLock, DataDirError> {
    let io_error = |context: &'static str| {
        move |source| DataDirError::Io {
            dir: dir.to_path_buf(),
            context,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io_error("creating the directory"))?;
    // Not truncated on open: a refused second server must still be able to read the holder's pid.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE_NAME))
        .map_err(io_error("opening the lock file"))?;
    // SAFETY: flock takes a file descriptor that `file` owns and keeps open for this call.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            // The pid is only for the message: an unreadable file still means "in use".
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        return Err(io_error("locking the lock file")(error));
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io_error("writing the pid into the lock file"))?;
    Ok(DataDirLock { _file: file })
}

/// Writes `bytes` to `path` so that a crash leaves the old contents or the new, never a mix: a
/// temporary file beside it, `fsync`, rename, `fsync` of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The file in the data dir that names the node.
pub const NODE_NAME_FILE: &str = "node-id";

/// Writes `name` as this data dir's node name (the file journal's node; with MySQL as the journal
/// the name is the database's and the data dir is left alone).
fn keep_node_name(data_dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    write_atomic(
        &data_dir.join(NODE_NAME_FILE),
        format!("{name}\n").as_bytes(),
    )
}

/// Where earlier versions kept the node's name (for Redis only).
const LEGACY_NODE_NAME_FILE: &str = "redis-node-id";

/// This node's name, the same across its restarts and different between nodes: made at random
/// the first time (`node_` and 16 hex digits) and kept in [`NODE_NAME_FILE`] in the data dir (one
/// data dir serves one process at a time). It names the node in its Redis lock values and in the
/// idempotency keys of the authorisations it asks the payment gateway for, so nodes sharing one
/// gateway each reconcile only their own. A data dir of an earlier version keeps the name it had
/// for Redis (`redis-node-id`). A file that does not hold such a name is refused, not replaced.
pub fn node_name(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(NODE_NAME_FILE);
    let read = |path: &Path| -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let id = text.trim_end_matches('\n');
                if is_node_name(id) {
                    Ok(Some(id.to_owned()))
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} does not hold a node name (node_ and letters or digits); remove it to make a new one", path.display()),
                    ))
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    };
    if let Some(id) = read(&path)? {
        return Ok(id);
    }
    let id = match read(&data_dir.join(LEGACY_NODE_NAME_FILE))? {
        Some(id) => id,
        None => new_node_name()?,
    };
    keep_node_name(data_dir, &id)?;
    Ok(id)
}

/// Whether `name` is a node name: `node_` and then letters, digits or `_`, at most 64 bytes (it
/// goes into Redis values and gateway idempotency keys as it is).
pub fn is_node_name(name: &str) -> bool {
    name.len() > 5
        && name.len() <= 64
        && name.starts_with("node_")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A new node name, at random: `node_` and 16 hex digits.
pub fn new_node_name() -> std::io::Result<String> {
    let ids = crate::random::TokenGenerator::new().map_err(std::io::Error::other)?;
    Ok(ids.next("node_")[..21].to_owned())
}

/// The name to give a MySQL journal that keeps none yet: the one an earlier version's data dir
/// kept for Redis (`redis-node-id`, its Redis locks carry it) if the data dir has no
/// [`NODE_NAME_FILE`] yet, else a new one. Never the data dir's own name: that one belongs to the
/// journal it was made with (the file journal, or another database, whose next node must keep
/// it), and a data dir moved to a new database taking it along would give two live nodes one
/// name, each voiding the other's payments as orphans.
pub fn name_for_new_journal(data_dir: &Path) -> std::io::Result<String> {
    let legacy = if data_dir.join(NODE_NAME_FILE).exists() {
        None
    } else {
        match std::fs::read_to_string(data_dir.join(LEGACY_NODE_NAME_FILE)) {
            Ok(text) => Some(text.trim_end_matches('\n').to_owned()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error),
        }
    };
    match legacy {
        Some(name) if is_node_name(&name) => Ok(name),
        _ => new_node_name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_dir_is_refused_naming_the_holder_until_the_first_is_dropped() {
        // Proves: the lock file holds the holder's pid, a second lock is refused naming it, and
        // dropping the first lets a new one in.
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let first = lock(&dir).unwrap();
        let written = std::fs::read_to_string(dir.join(LOCK_FILE_NAME)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
        // flock locks belong to the open file, so a second open in the same process conflicts too.
        match lock(&dir) {
            Err(DataDirError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        lock(&dir).unwrap();
    }

    #[test]
    fn a_dir_that_cannot_be_created_is_an_io_error_naming_the_dir() {
        // Proves: a data dir that cannot be created is an I/O error whose message names it.
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("plain-file");
        std::fs::write(&file, b"not a dir").unwrap();
        let error = lock(&file.join("data")).unwrap_err();
        assert!(matches!(error, DataDirError::Io { .. }), "{error:?}");
        assert!(error.to_string().contains("plain-file"), "{error}");
    }

    #[test]
    fn a_new_journal_gets_an_earlier_versions_redis_name_or_a_new_one_never_the_data_dirs() {
        // Proves: a new MySQL journal takes the Redis name of a data dir an earlier version left
        // (no node-id yet), and a new name when the data dir already has one of its own (that
        // name belongs to the journal it was made with).
        let parent = tempfile::tempdir().unwrap();
        let earlier = parent.path().join("earlier");
        std::fs::create_dir_all(&earlier).unwrap();
        std::fs::write(
            earlier.join(LEGACY_NODE_NAME_FILE),
            "node_0123456789abcdef\n",
        )
        .unwrap();
        assert_eq!(
            name_for_new_journal(&earlier).unwrap(),
            "node_0123456789abcdef"
        );
        let own = node_name(&earlier).unwrap();
        let proposed = name_for_new_journal(&earlier).unwrap();
        assert!(is_node_name(&proposed), "{proposed}");
        assert_ne!(proposed, own);
        let empty = parent.path().join("empty");
        assert!(is_node_name(&name_for_new_journal(&empty).unwrap()));
    }

    #[test]
    fn a_nodes_name_is_made_once_kept_and_taken_over_from_its_redis_name() {
        // Proves: the name is made once and the same at every start; a data dir of an earlier
        // version keeps the name it had in Redis (its locks and its gateway keys stay its own);
        // a file that does not hold a name is refused, never replaced.
        let parent = tempfile::tempdir().unwrap();
        let fresh = parent.path().join("fresh");
        let name = node_name(&fresh).unwrap();
        assert!(name.starts_with("node_") && name.len() == 21, "{name}");
        assert_eq!(node_name(&fresh).unwrap(), name);
        let other = node_name(&parent.path().join("other")).unwrap();
        assert_ne!(other, name);

        let earlier = parent.path().join("earlier");
        std::fs::create_dir_all(&earlier).unwrap();
        std::fs::write(
            earlier.join(LEGACY_NODE_NAME_FILE),
            "node_0123456789abcdef\n",
        )
        .unwrap();
        assert_eq!(node_name(&earlier).unwrap(), "node_0123456789abcdef");
        let kept = std::fs::read_to_string(earlier.join(NODE_NAME_FILE)).unwrap();
        assert_eq!(kept, "node_0123456789abcdef\n");

        let junk = parent.path().join("junk");
        std::fs::create_dir_all(&junk).unwrap();
        std::fs::write(junk.join(NODE_NAME_FILE), "not a name").unwrap();
        let error = node_name(&junk).unwrap_err();
        assert!(error.to_string().contains(NODE_NAME_FILE), "{error}");
        assert_eq!(
            std::fs::read_to_string(junk.join(NODE_NAME_FILE)).unwrap(),
            "not a name"
        );
    }
}

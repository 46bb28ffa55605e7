//! The few file-system operations the file journal needs, behind a trait, with two implementations:
//! the real disk, and a simulated disk that models what survives a power cut (only synced bytes and
//! synced directory entries), used to prove that every acknowledged append survives one.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One open file the journal appends to.
pub trait StorageFile: Send {
    /// Appends all of `bytes` at the end.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes every appended byte durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// A directory of journal files.
pub trait Storage: Send + Sync {
    /// Where the files are, for messages.
    fn describe(&self, name: &str) -> String;
    /// The names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of a file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// `len` bytes of a file from `offset` (fewer at its end).
    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Creates an empty file (its directory entry is durable only after [`Storage::sync_dir`]).
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for appending.
    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Cuts a file to `len` bytes, durably.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    /// Makes created, renamed and removed entries durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// Replaces a file's content all at once, durably: written to a temporary file, synced,
    /// renamed over the old one, and the directory synced.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
}

/// How much of a large file is written between two syncs.
const WRITE_SYNC_BYTES: usize = 4 << 20;

/// The real disk: a directory.
#[derive(Debug, Clone)]
pub struct DiskStorage {
    dir: PathBuf,
}

impl DiskStorage {
    /// Uses `dir`, creating it if missing.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

struct DiskFile(File);

impl StorageFile for DiskFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        crate::fault::sync_may_fail()?;
        self.0.sync_data()
    }
}

impl Storage for DiskStorage {
    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.dir.join(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = File::open(self.dir.join(name))?;
        let mut bytes = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < bytes.len() {
            match file.read_at(&mut bytes[filled..], offset + filled as u64)? {
                0 => break,
                n => filled += n,
            }
        }
        bytes.truncate(filled);
        Ok(bytes)
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(DiskFile(file)))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().append(true).open(self.dir.join(name))?;
        Ok(Box::new(DiskFile(file)))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(self.dir.join(name))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let temporary = self.dir.join(format!("{name}.tmp"));
        let written = (|| {
            let mut file = File::create(&temporary)?;
            // Flushing a snapshot of hundreds of MiB at once would make the journal's own small
            // fdatasync calls queue behind it: sync as it goes, a few MiB at a time.
            for chunk in bytes.chunks(WRITE_SYNC_BYTES) {
                file.write_all(chunk)?;
                file.sync_data()?;
            }
            file.sync_all()
        })();
        if let Err(error) = written {
            // A half-written copy would only hold space (on a full disk, the space the journal
            // needs to recover).
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        fs::rename(&temporary, self.dir.join(name))?;
        self.sync_dir()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }
}

#[derive(Default)]
struct SimulatedFile {
    data: Vec<u8>,
    /// Bytes `0..synced_len` survive a power cut.
    synced_len: usize,
}

#[derive(Default)]
struct SimulatedState {
    files: HashMap<String, SimulatedFile>,
    /// Names whose directory entry survives a power cut.
    durable_names: HashSet<String>,
    /// Bumped by every power cut: handles opened before it fail, as a dead machine's would.
    generation: u64,
    /// Sync calls that will still succeed; `None`: all of them.
    syncs_left: Option<u64>,
    /// The next this many sync calls fail, then they succeed again.
    syncs_failing: u64,
    /// The most bytes all files may hold together; `None`: no limit. A write past it stores what
    /// fits and fails with "no space left", as a full disk does.
    capacity: Option<usize>,
}

impl SimulatedState {
    fn used(&self) -> usize {
        self.files.values().map(|f| f.data.len()).sum()
    }

    /// How many of `wanted` more bytes fit.
    fn room(&self, wanted: usize) -> usize {
        match self.capacity {
            Some(capacity) => wanted.min(capacity.saturating_sub(self.used())),
            None => wanted,
        }
    }
}

fn no_space() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "no space left on device (simulated)",
    )
}

/// A disk in memory that keeps, across [`SimulatedDisk::power_cut`], only what was synced.
///
/// Give the journal a [`SimulatedDisk::machine`] view: after a power cut every operation through
/// it fails, as a dead machine's would, while the test keeps using the disk itself.
#[derive(Clone, Default)]
pub struct SimulatedDisk {
    state: Arc<Mutex<SimulatedState>>,
    /// The power generation this view belongs to; `None` for the test's own view.
    bound: Option<u64>,
}

fn gone() -> io::Error {
    io::Error::other("the simulated machine lost power")
}

impl SimulatedDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimulatedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A view of the disk for one machine's life: it stops working at the next power cut.
    pub fn machine(&self) -> SimulatedDisk {
        SimulatedDisk {
            state: Arc::clone(&self.state),
            bound: Some(self.lock().generation),
        }
    }

    /// Locks the state for an operation of this view; fails once the view's machine lost power.
    fn alive(&self) -> io::Result<MutexGuard<'_, SimulatedState>> {
        let state = self.lock();
        match self.bound {
            Some(generation) if generation != state.generation => Err(gone()),
            _ => Ok(state),
        }
    }

    /// Cuts the power: every byte not synced and every directory entry not synced is lost, and
    /// every handle opened before fails from now on. With `keep_torn`, a prefix of each file's
    /// unsynced bytes (of the given length, at most all of them) survives, as a torn write would.
    pub fn power_cut(&self, keep_torn: usize) {
        let mut state = self.lock();
        state.generation += 1;
        let durable = state.durable_names.clone();
        state.files.retain(|name, _| durable.contains(name));
        for file in state.files.values_mut() {
            let keep = file
                .synced_len
                .saturating_add(keep_torn)
                .min(file.data.len());
            file.data.truncate(keep);
            file.synced_len = file.data.len();
        }
    }

    /// Makes every sync after the next `count` fail (an I/O error), to test how a failing disk is
    /// reported. `None` lets them all succeed again.
    pub fn fail_syncs_after(&self, count: Option<u64>) {
        self.lock().syncs_left = count;
    }

    /// Makes exactly the next `count` syncs fail (an I/O error); later ones succeed.
    pub fn fail_next_syncs(&self, count: u64) {
        self.lock().syncs_failing = count;
    }

    /// Limits the bytes all files may hold together (a full disk); `None` lifts the limit.
    pub fn set_capacity(&self, bytes: Option<usize>) {
        self.lock().capacity = bytes;
    }

    /// The bytes all files hold now.
    pub fn used(&self) -> usize {
        self.lock().used()
    }

    /// Flips one bit of a file (to test corruption detection).
    pub fn flip_bit(&self, name: &str, offset: usize) {
        if let Some(file) = self.lock().files.get_mut(name) {
            if let Some(byte) = file.data.get_mut(offset) {
                *byte ^= 0x10;
            }
        }
    }

    /// A handle to `name` for the machine alive at `generation`.
    fn handle(&self, name: &str, generation: u64) -> Box<dyn StorageFile> {
        Box::new(SimulatedHandle {
            disk: SimulatedDisk {
                state: Arc::clone(&self.state),
                bound: None,
            },
            name: name.to_owned(),
            generation,
        })
    }

    fn take_sync(state: &mut SimulatedState) -> io::Result<()> {
        if state.syncs_failing > 0 {
            state.syncs_failing -= 1;
            return Err(io::Error::other("injected sync failure"));
        }
        match &mut state.syncs_left {
            Some(0) => Err(io::Error::other("injected sync failure")),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

struct SimulatedHandle {
    disk: SimulatedDisk,
    name: String,
    generation: u64,
}

impl SimulatedHandle {
    fn with<T>(&self, f: impl FnOnce(&mut SimulatedState) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.disk.lock();
        if state.generation != self.generation {
            return Err(gone());
        }
        f(&mut state)
    }
}

impl StorageFile for SimulatedHandle {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let name = self.name.clone();
        self.with(|state| {
            let room = state.room(bytes.len());
            let file = state.files.get_mut(&name).ok_or_else(gone)?;
            file.data.extend_from_slice(&bytes[..room]);
            if room < bytes.len() {
                return Err(no_space());
            }
            Ok(())
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let name = self.name.clone();
        self.with(|state| {
            SimulatedDisk::take_sync(state)?;
            let file = state.files.get_mut(&name).ok_or_else(gone)?;
            file.synced_len = file.data.len();
            Ok(())
        })
    }
}

impl Storage for SimulatedDisk {
    fn describe(&self, name: &str) -> String {
        format!("simulated:{name}")
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = self.alive()?.files.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.alive()?
            .files
            .get(name)
            .map(|f| f.data.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let data = self.read(name)?;
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(len as usize).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let mut state = self.alive()?;
        if state.files.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_owned(),
            ));
        }
        state
            .files
            .insert(name.to_owned(), SimulatedFile::default());
        Ok(self.handle(name, state.generation))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let state = self.alive()?;
        if !state.files.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned()));
        }
        Ok(self.handle(name, state.generation))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut state = self.alive()?;
        let file = state
            .files
            .get_mut(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        file.data.truncate(len as usize);
        file.synced_len = file.data.len();
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.alive()?;
        Self::take_sync(&mut state)?;
        state.durable_names = state.files.keys().cloned().collect();
        Ok(())
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.alive()?;
        if state.room(bytes.len()) < bytes.len() {
            return Err(no_space());
        }
        Self::take_sync(&mut state)?;
        state.files.insert(
            name.to_owned(),
            SimulatedFile {
                data: bytes.to_vec(),
                synced_len: bytes.len(),
            },
        );
        state.durable_names.insert(name.to_owned());
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.alive()?;
        state.files.remove(name);
        state.durable_names.remove(name);
        Ok(())
    }
}

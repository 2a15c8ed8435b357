//! The agent's state on disk, in its data dir: identity key, network key, and a state file with the tree hints
//! (term, role, parent, peers to rejoin through), subnet grants and attached services.
//!
//! Every write is atomic (write a temporary file in the same directory, fsync, rename, fsync the directory), so a
//! crash or `kill -9` leaves either the old or the new version, never a torn file.

use anyhow::{Context, anyhow, bail};
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::admission::NetworkKey;

pub const IDENTITY_FILE: &str = "identity.key";
pub const NETWORK_KEY_FILE: &str = "network.key";
pub const STATE_FILE: &str = "state.json";

/// Writes `bytes` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    // Unique per write: two tasks of one process saving the same file must not share a temporary file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let serial = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp.{}.{serial}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
        // The rename itself must reach the disk too.
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates the data dir (mode 0700) if needed and checks that we can write to it.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create the data dir {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict permissions of the data dir {}", dir.display()))?;
    }
    if !dir.is_dir() {
        bail!("the data dir {} is not a directory", dir.display());
    }
    let probe = dir.join(format!(".write-probe.{}", std::process::id()));
    File::create(&probe).with_context(|| format!("the data dir {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Loads the node's identity (so a restarted agent keeps its peer id), creating it on first start.
pub fn load_or_create_identity(dir: &Path) -> anyhow::Result<Keypair> {
    let path = dir.join(IDENTITY_FILE);
    if path.exists() {
        let bytes = fs::read(&path).with_context(|| format!("cannot read the identity key {}", path.display()))?;
        return Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            anyhow!("the identity key {} is corrupt ({e}); move it away to get a new identity", path.display())
        });
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair.to_protobuf_encoding().context("encoding the new identity key")?;
    write_atomic(&path, &bytes, 0o600)?;
    Ok(keypair)
}

/// Where the network key comes from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Given with `--network-key-file`.
    File(PathBuf),
    /// Stored in the data dir by an earlier run.
    DataDir(PathBuf),
    /// Generated now (only `agent start` does this).
    Generated(PathBuf),
}

/// Resolves the network key: an explicit file wins (and is copied into the data dir, so a restart without the flag
/// still works); otherwise the data dir's copy; otherwise a new key if `may_generate`.
pub fn load_network_key(
    dir: &Path,
    explicit: Option<&Path>,
    may_generate: bool,
) -> anyhow::Result<(NetworkKey, KeySource)> {
    let stored = dir.join(NETWORK_KEY_FILE);
    if let Some(file) = explicit {
        let text =
            fs::read_to_string(file).with_context(|| format!("cannot read the network key file {}", file.display()))?;
        let key = NetworkKey::from_hex(text.trim())
            .with_context(|| format!("the network key file {} is not valid", file.display()))?;
        if fs::read_to_string(&stored).ok().as_deref().map(str::trim) != Some(key.to_hex().as_str()) {
            write_atomic(&stored, format!("{}\n", key.to_hex()).as_bytes(), 0o600)?;
        }
        return Ok((key, KeySource::File(file.to_path_buf())));
    }
    if stored.exists() {
        let text = fs::read_to_string(&stored).with_context(|| format!("cannot read {}", stored.display()))?;
        let key = NetworkKey::from_hex(text.trim())
            .with_context(|| format!("{} is not a valid network key", stored.display()))?;
        return Ok((key, KeySource::DataDir(stored)));
    }
    if !may_generate {
        bail!(
            "no network key: pass --network-key-file FILE with the key printed by `agent start` on the first node \
             (or its data dir's {NETWORK_KEY_FILE})"
        );
    }
    let key = NetworkKey::generate();
    write_atomic(&stored, format!("{}\n", key.to_hex()).as_bytes(), 0o600)?;
    Ok((key, KeySource::Generated(stored)))
}

/// A peer to rejoin through after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownPeer {
    pub peer_id: String,
    pub addrs: Vec<String>,
}

/// Hints and records that survive a restart. Unknown fields are kept as they are (other subsystems may add theirs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Last role and term seen, for logs and for the overlay to compare after a restart.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub term: u64,
    #[serde(default)]
    pub parent: Option<String>,
    /// Tree neighbours (parent, ancestors, children) with their addresses, tried in order on restart.
    #[serde(default)]
    pub known_peers: Vec<KnownPeer>,
    /// Subnet grants held by this node (written by the routes subsystem).
    #[serde(default)]
    pub grants: Vec<serde_json::Value>,
    /// Services attached to this node (written by the data plane), re-attached on restart.
    #[serde(default)]
    pub services: Vec<serde_json::Value>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Serializes the load-modify-save cycles on state files within this process.
static STATE_WRITES: Mutex<()> = Mutex::new(());

/// The state file in a data dir.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        Self { path: dir.join(STATE_FILE) }
    }

    /// The stored state; an absent file is an empty state, a corrupt one is an error (we will not silently forget
    /// grants).
    pub fn load(&self) -> anyhow::Result<State> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("the state file {} is corrupt; move it away to start afresh", self.path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(anyhow!("cannot read {}: {e}", self.path.display())),
        }
    }

    /// Loads, lets `change` edit, and saves if it returns true, with no other write of this process in between (the
    /// driver, the routes task and the services keeper each own some fields of the one file). Returns whether it
    /// saved.
    pub fn update(&self, change: impl FnOnce(&mut State) -> bool) -> anyhow::Result<bool> {
        let _writing = STATE_WRITES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut state = self.load()?;
        if !change(&mut state) {
            return Ok(false);
        }
        self.write(&state)?;
        Ok(true)
    }

    fn write(&self, state: &State) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(state)?;
        write_atomic(&self.path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("canopy-persist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn identity_survives_reload() {
        let dir = temp_dir("identity");
        prepare_data_dir(&dir).unwrap();
        let first = load_or_create_identity(&dir).unwrap();
        let second = load_or_create_identity(&dir).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        let mode = fs::metadata(dir.join(IDENTITY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_or_create_identity(&dir).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn network_key_sources() {
        let dir = temp_dir("netkey");
        prepare_data_dir(&dir).unwrap();
        let err = load_network_key(&dir, None, false).unwrap_err();
        assert!(err.to_string().contains("--network-key-file"), "{err}");
        let (generated, source) = load_network_key(&dir, None, true).unwrap();
        assert!(matches!(source, KeySource::Generated(_)));
        let (again, source) = load_network_key(&dir, None, false).unwrap();
        assert_eq!(generated, again);
        assert!(matches!(source, KeySource::DataDir(_)));

        let other = NetworkKey::generate();
        let file = dir.join("given.key");
        fs::write(&file, format!("  {}\n", other.to_hex())).unwrap();
        let (given, _) = load_network_key(&dir, Some(&file), false).unwrap();
        assert_eq!(given, other);
        // The explicit key replaced the stored copy.
        assert_eq!(load_network_key(&dir, None, false).unwrap().0, other);

        fs::write(&file, "not hex").unwrap();
        let err = load_network_key(&dir, Some(&file), false).unwrap_err();
        assert!(format!("{err:#}").contains("not valid"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The driver, the routes task and the services keeper write one file from different threads: no update may
    /// overwrite another's field.
    #[test]
    fn concurrent_updates_of_different_fields_all_land() {
        let dir = temp_dir("concurrent");
        prepare_data_dir(&dir).unwrap();
        let store = StateStore::new(&dir);
        std::thread::scope(|scope| {
            for writer in 0..4u64 {
                let store = store.clone();
                scope.spawn(move || {
                    for round in 0..50u64 {
                        store
                            .update(|state| {
                                match writer {
                                    0 => state.term = round,
                                    1 => state.grants = vec![serde_json::json!(round)],
                                    2 => state.services = vec![serde_json::json!(round)],
                                    _ => state.parent = Some(round.to_string()),
                                }
                                true
                            })
                            .unwrap();
                    }
                });
            }
        });
        let state = store.load().unwrap();
        assert_eq!(state.term, 49);
        assert_eq!(state.grants, vec![serde_json::json!(49)]);
        assert_eq!(state.services, vec![serde_json::json!(49)]);
        assert_eq!(state.parent.as_deref(), Some("49"));
        let leftovers: Vec<_> =
            fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name() != STATE_FILE).collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trip_keeps_unknown_fields() {
        let dir = temp_dir("state");
        prepare_data_dir(&dir).unwrap();
        let store = StateStore::new(&dir);
        assert_eq!(store.load().unwrap(), State::default());
        fs::write(dir.join(STATE_FILE), r#"{"term": 3, "routes_cache": [1, 2]}"#).unwrap();
        let peer = KnownPeer { peer_id: "p".into(), addrs: vec!["/ip4/1.2.3.4/tcp/1".into()] };
        assert!(
            store
                .update(|state| {
                    assert_eq!(state.term, 3);
                    state.known_peers.push(peer.clone());
                    true
                })
                .unwrap()
        );
        assert!(!store.update(|_| false).unwrap());
        let back = store.load().unwrap();
        assert_eq!((back.term, back.known_peers), (3, vec![peer]));
        assert!(back.other.contains_key("routes_cache"));
        fs::write(dir.join(STATE_FILE), "{").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("corrupt"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let err = prepare_data_dir(Path::new("/proc/canopy-cannot-exist")).unwrap_err();
        assert!(err.to_string().contains("cannot create the data dir"), "{err}");
    }
}

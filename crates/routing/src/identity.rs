//! The node's persistent identity (an ed25519 key in the data directory, so a restarted
//! agent keeps its peer id) and the optional private-network key.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// The identity file's name in the data directory.
pub const IDENTITY_FILE: &str = "identity.ed25519";

/// Why the identity or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The identity file does not hold a key.
    #[error("{path} does not hold a valid libp2p key (delete it to make a new identity): {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        reason: String,
    },
    /// The pre-shared key is malformed.
    #[error(
        "pre-shared key: {0} (expected 64 hex characters, or the /key/swarm/psk/1.0.0/ format)"
    )]
    BadPsk(String),
}

/// Loads the identity from `dir`, creating the directory and a new key (mode 0600) if
/// there is none.
pub fn load_or_create(dir: &Path) -> Result<Keypair, IdentityError> {
    let path = dir.join(IDENTITY_FILE);
    let io_err = |action, source| IdentityError::Io {
        action,
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::BadKey {
            path: path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io_err("creating the directory of", e))?;
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::BadKey {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io_err("creating", e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("writing", e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io_err("writing", e))?;
            Ok(key)
        }
        Err(e) => Err(io_err("reading", e)),
    }
}

/// Parses a pre-shared key: 64 hex characters, or libp2p's `swarm.key` file format.
pub fn parse_psk(text: &str) -> Result<PreSharedKey, IdentityError> {
    let text = text.trim();
    let full = if text.starts_with("/key/swarm/psk/") {
        text.to_owned()
    } else {
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{text}")
    };
    full.parse::<PreSharedKey>()
        .map_err(|e| IdentityError::BadPsk(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = load_or_create(&data).expect("create");
        let again = load_or_create(&data).expect("load");
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        let mode = std::fs::metadata(data.join(IDENTITY_FILE)).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::write(data.join(IDENTITY_FILE), b"garbage").expect("write");
        assert!(matches!(
            load_or_create(&data),
            Err(IdentityError::BadKey { .. })
        ));
    }

    #[test]
    fn psk_forms() {
        let hex = "ab".repeat(32);
        let a = parse_psk(&hex).expect("hex");
        let b = parse_psk(&format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")).expect("file form");
        assert_eq!(a.fingerprint().to_string(), b.fingerprint().to_string());
        assert!(parse_psk("abc").is_err());
        assert!(parse_psk(&"zz".repeat(32)).is_err());
    }
}

//! The cluster secret: a node proves it holds it before it may join, see
//! the plan or reach the data plane.

use std::path::Path;

use rand::RngCore;

/// Length of the secret, bytes (256 bits).
pub const CLUSTER_KEY_BYTES: usize = 32;

/// A shared cluster secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; CLUSTER_KEY_BYTES]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("cluster key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("cluster key file {path}: expected {} hex digits (make one with `shoal keygen PATH`)", CLUSTER_KEY_BYTES * 2)]
    Malformed {
        /// The file.
        path: String,
    },
    /// Other users of the machine may read (or write) the file.
    #[error("secret file {path} is readable or writable by others (mode {mode:o}): run `chmod 600 {path}`")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads a file holding a secret (a cluster or API key), refusing one that
/// other users of the machine can read or write: a key they can read is
/// theirs too.
pub fn read_private(path: &Path) -> Result<String, KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    use std::io::Read;
    let mut text = String::new();
    // A key is a line: anything much longer is not one.
    file.take(64 * 1024).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> ClusterKey {
        let mut k = [0u8; CLUSTER_KEY_BYTES];
        rand::rng().fill_bytes(&mut k);
        ClusterKey(k)
    }

    /// Parses hex text (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Option<ClusterKey> {
        let t = text.trim();
        if t.len() != CLUSTER_KEY_BYTES * 2 || !t.is_ascii() {
            return None;
        }
        let mut k = [0u8; CLUSTER_KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ClusterKey(k))
    }

    /// The key as hex, the format of key files.
    pub fn to_hex(&self) -> String {
        sharding::manifest::hex(&self.0)
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<ClusterKey, KeyError> {
        let text = read_private(path)?;
        ClusterKey::from_hex(&text).ok_or_else(|| KeyError::Malformed {
            path: path.display().to_string(),
        })
    }

    /// Reads the key file, or creates it with a new key when it does not
    /// exist yet (returns whether it was created, so the caller can say where).
    pub fn read_or_create(path: &Path) -> Result<(ClusterKey, bool), KeyError> {
        if path.exists() {
            return Ok((ClusterKey::read(path)?, false));
        }
        Ok((ClusterKey::create(path)?, true))
    }

    /// Writes a new random key to `path` (owner-only permissions, parent
    /// folders created); refuses to overwrite an existing file, since that
    /// would cut this machine off from its cluster.
    pub fn create(path: &Path) -> Result<ClusterKey, KeyError> {
        let key = ClusterKey::generate();
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_private(path, &format!("{}\n", key.to_hex())).map_err(io)?;
        Ok(key)
    }

    /// Proof that the sender of a join holds the key, bound to the cluster
    /// name and both peer ids so it cannot be replayed elsewhere.
    pub fn proof(&self, cluster: &str, from: &str, to: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal-join-v1\0");
        for part in [cluster, from, to] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// A holder's proof on an answer (a weight index, a chunk): bound to
    /// the cluster, the holder, the asker, the asker's nonce and what was
    /// answered, so a host without the key cannot serve one and a member's
    /// answer cannot be replayed to another asker or session.
    pub fn answer_proof(
        &self,
        cluster: &str,
        holder: &str,
        asker: &str,
        nonce: &[u8; 32],
        what: &[u8],
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal-answer-v1\0");
        for part in [
            cluster.as_bytes(),
            holder.as_bytes(),
            asker.as_bytes(),
            nonce,
            what,
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        *h.finalize().as_bytes()
    }

    /// Checks an [`ClusterKey::answer_proof`] in constant time.
    pub fn verify_answer(
        &self,
        proof: &[u8; 32],
        cluster: &str,
        holder: &str,
        asker: &str,
        nonce: &[u8; 32],
        what: &[u8],
    ) -> bool {
        blake3::Hash::from(self.answer_proof(cluster, holder, asker, nonce, what))
            == blake3::Hash::from(*proof)
    }

    /// Seals `plain` (an encoded Hello) for the node `to`: only a holder of
    /// this key can open it, and only as the message from `from` to `to`.
    pub fn seal_hello(
        &self,
        cluster: &str,
        from: &str,
        to: &str,
        plain: &[u8],
    ) -> protocol::SealedHello {
        use chacha20poly1305::aead::{Aead, KeyInit};
        let nonce: [u8; 12] = rand::random();
        let cipher =
            chacha20poly1305::ChaCha20Poly1305::new(&self.hello_key(cluster, from, to).into());
        let bytes = cipher
            .encrypt(&nonce.into(), plain)
            .expect("ChaCha20-Poly1305 seals any length we send");
        protocol::SealedHello { nonce, bytes }
    }

    /// Opens a [`ClusterKey::seal_hello`] from `from` to `to`; `None` when
    /// it was not sealed with this key for these two nodes.
    pub fn open_hello(
        &self,
        cluster: &str,
        from: &str,
        to: &str,
        sealed: &protocol::SealedHello,
    ) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit};
        let cipher =
            chacha20poly1305::ChaCha20Poly1305::new(&self.hello_key(cluster, from, to).into());
        cipher
            .decrypt(&sealed.nonce.into(), sealed.bytes.as_slice())
            .ok()
    }

    fn hello_key(&self, cluster: &str, from: &str, to: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"shoal-hello-seal-v1\0");
        for part in [cluster, from, to] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, proof: &[u8; 32], cluster: &str, from: &str, to: &str) -> bool {
        blake3::Hash::from(self.proof(cluster, from, to)) == blake3::Hash::from(*proof)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn key_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shoal-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        let _ = std::fs::remove_file(&path);
        let key = ClusterKey::create(&path).unwrap();
        assert_eq!(ClusterKey::read(&path).unwrap(), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterKey::read(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn answer_proofs_bind_key_holder_asker_nonce_and_content() {
        let k = ClusterKey::generate();
        let n = [7u8; 32];
        let p = k.answer_proof("office", "holder", "asker", &n, b"model");
        assert!(k.verify_answer(&p, "office", "holder", "asker", &n, b"model"));
        // Another key (a host outside the cluster), holder, asker, session or content: no.
        let other = ClusterKey::generate();
        assert!(!other.verify_answer(&p, "office", "holder", "asker", &n, b"model"));
        assert!(!k.verify_answer(&p, "office", "mallory", "asker", &n, b"model"));
        assert!(!k.verify_answer(&p, "office", "holder", "other", &n, b"model"));
        assert!(!k.verify_answer(&p, "office", "holder", "asker", &[8; 32], b"model"));
        assert!(!k.verify_answer(&p, "office", "holder", "asker", &n, b"other"));
        // Not the join proof either.
        assert_ne!(p, k.proof("office", "holder", "asker"));
    }

    #[test]
    fn a_sealed_hello_opens_only_with_the_key_for_its_two_nodes() {
        let k = ClusterKey::generate();
        let sealed = k.seal_hello("office", "a", "b", b"hello bytes");
        assert!(!sealed.bytes.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            k.open_hello("office", "a", "b", &sealed).unwrap(),
            b"hello bytes"
        );
        assert!(ClusterKey::generate()
            .open_hello("office", "a", "b", &sealed)
            .is_none());
        assert!(k.open_hello("office", "a", "c", &sealed).is_none());
        assert!(k.open_hello("other", "a", "b", &sealed).is_none());
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let k = ClusterKey::generate();
        assert_eq!(ClusterKey::from_hex(&format!(" {}\n", k.to_hex())), Some(k));
        assert!(ClusterKey::from_hex("abc").is_none());
        assert!(ClusterKey::from_hex(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn proofs_bind_key_cluster_and_peers() {
        let k = ClusterKey::generate();
        let p = k.proof("office", "a", "b");
        assert!(k.verify(&p, "office", "a", "b"));
        assert!(!k.verify(&p, "office", "b", "a"));
        assert!(!k.verify(&p, "lab", "a", "b"));
        assert!(!ClusterKey::generate().verify(&p, "office", "a", "b"));
    }
}

//! Content digests (`sha256:<hex>`), validated as the OCI image spec defines them.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// A digest algorithm this mirror can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, 64 lowercase hex characters.
    Sha256,
    /// SHA-512, 128 lowercase hex characters.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as it appears before the colon.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    #[error("digest {0:?} has no algorithm prefix")]
    MissingAlgorithm(String),
    /// An algorithm other than sha256 or sha512.
    #[error("digest {0:?} uses an unsupported algorithm")]
    UnsupportedAlgorithm(String),
    /// The encoded part is not lowercase hex of the right length.
    #[error("digest {0:?} is not lowercase hex of the algorithm's length")]
    BadEncoding(String),
}

/// A validated content digest such as `sha256:e3b0c442...`.
///
/// Only the registered algorithms `sha256` and `sha512` are accepted, with lowercase hex,
/// so that a digest can be verified and used safely as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    text: String,
}

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingAlgorithm(s.to_owned()))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(DigestError::UnsupportedAlgorithm(s.to_owned())),
        };
        let ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(DigestError::BadEncoding(s.to_owned()));
        }
        Ok(Self {
            algorithm,
            text: s.to_owned(),
        })
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self {
            algorithm: Algorithm::Sha256,
            text: format!("sha256:{}", hex::encode(Sha256::digest(data))),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex-encoded part after the colon.
    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    /// The whole digest, `algorithm:hex`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A hasher that checks streamed bytes against this digest.
    pub fn verifier(&self) -> Verifier {
        let state = match self.algorithm {
            Algorithm::Sha256 => HashState::Sha256(Sha256::new()),
            Algorithm::Sha512 => HashState::Sha512(Box::new(Sha512::new())),
        };
        Verifier {
            expected: self.clone(),
            state,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

enum HashState {
    Sha256(Sha256),
    Sha512(Box<Sha512>),
}

/// Incrementally hashes a stream and says whether it matched the expected digest.
pub struct Verifier {
    expected: Digest,
    state: HashState,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl Verifier {
    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            HashState::Sha256(h) => h.update(data),
            HashState::Sha512(h) => h.update(data),
        }
    }

    /// Whether everything fed so far hashes to the expected digest.
    pub fn matches(self) -> bool {
        let hex = match self.state {
            HashState::Sha256(h) => hex::encode(h.finalize()),
            HashState::Sha512(h) => hex::encode(h.finalize()),
        };
        hex == self.expected.hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_digests() {
        let d = Digest::parse(EMPTY).expect("valid");
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex().len(), 64);
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:abcd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd00000000000000000000000000000000000000000",
            "sha512:abc",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn verifier_detects_mismatch() {
        let d = Digest::sha256_of(b"hello world");
        let mut v = d.verifier();
        v.update(b"hello ");
        v.update(b"world");
        assert!(v.matches());
        let mut v = d.verifier();
        v.update(b"hello there");
        assert!(!v.matches());
    }
}

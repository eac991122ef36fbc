//! Peer authentication with a pre-shared key.
//!
//! The secondary keeps a random 32-byte key (`REPLICA/.hbrfs/auth.key`,
//! mode 0600, made on first start unless `--auth-key` names one); the
//! primary is given a copy. Every request carries a token: a time stamp and
//! the BLAKE3 keyed hash of it. The secondary checks the token in an
//! interceptor, before the request reaches any code that touches disk, and
//! accepts time stamps within five minutes of its clock. The key itself
//! never travels. The channel itself is TLS with certificates from an
//! authority derived from the same key (`tls`), so tokens and data are
//! encrypted and a peer without the key fails the handshake already; the
//! token stays as a second, independent check.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::error::{Error, IoContext, Result};
use crate::state::{hex, unhex};

/// Request metadata that carries the token.
const HEADER: &str = "x-hbrfs-auth";
/// How far a token's time may be from the secondary's clock.
const SKEW_SECS: u64 = 300;

/// A pair's pre-shared key.
#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AuthKey {
    /// Reads a key file (64 hex digits).
    pub fn load(path: &Path) -> Result<AuthKey> {
        let text = fs::read_to_string(path).at(path)?;
        let text = text.trim();
        unhex(text)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(AuthKey)
            .ok_or_else(|| Error::BadState {
                path: path.to_path_buf(),
                reason: "not an hbrfs auth key (64 hex digits)".into(),
            })
    }

    /// Reads the key file, making a new random key there if it is missing.
    pub fn load_or_create(path: &Path) -> Result<AuthKey> {
        if path.exists() {
            return Self::load(path);
        }
        let key: [u8; 32] = crate::sys::random_bytes().at("/dev/urandom")?;
        let mut f = crate::state::state_file_options()
            .write(true)
            .create_new(true)
            .open(path)
            .at(path)?;
        writeln!(f, "{}", hex(&key))
            .and_then(|_| f.sync_all())
            .at(path)?;
        Ok(AuthKey(key))
    }

    /// The key itself, for deriving the pair's TLS authority (`tls`).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from its bytes (tests).
    #[cfg(test)]
    pub(crate) fn from_secret(secret: [u8; 32]) -> AuthKey {
        AuthKey(secret)
    }

    fn mac(&self, time: u64) -> String {
        let hash = blake3::keyed_hash(&self.0, format!("hbrfs-auth {time}").as_bytes());
        hash.to_hex().to_string()
    }

    /// A token for a request sent now.
    pub fn token(&self) -> String {
        let time = now_secs();
        format!("{time}:{}", self.mac(time))
    }

    /// Checks a token; the error says why it is refused.
    pub fn verify(&self, token: &str) -> std::result::Result<(), TokenError> {
        let (time, mac) = token
            .split_once(':')
            .ok_or(TokenError::Malformed("token"))?;
        let time: u64 = time
            .parse()
            .map_err(|_| TokenError::Malformed("token time"))?;
        if now_secs().abs_diff(time) > SKEW_SECS {
            return Err(TokenError::Skewed(time));
        }
        let expected =
            blake3::Hash::from_hex(self.mac(time)).map_err(|_| TokenError::Malformed("mac"))?;
        let given = blake3::Hash::from_hex(mac).map_err(|_| TokenError::Malformed("token hash"))?;
        // blake3::Hash compares in constant time.
        if given != expected {
            return Err(TokenError::WrongKey);
        }
        Ok(())
    }
}

/// Why a peer's token was refused: said to the peer, so a wrong key and a
/// wrong clock are told apart.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not `time:mac`.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The token's time is too far from this clock (replay window).
    #[error("token time {0} is more than {SKEW_SECS} s from this clock")]
    Skewed(u64),
    /// The token was made with another key.
    #[error("wrong key")]
    WrongKey,
}

/// The secondary's check, run before any request is handled.
#[derive(Clone, Debug)]
pub struct RequireKey(pub AuthKey);

impl tonic::service::Interceptor for RequireKey {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated("no hbrfs auth token: pass --auth-key to the primary")
            })?;
        self.0
            .verify(token)
            .map_err(|why| Status::unauthenticated(format!("hbrfs auth token refused: {why}")))?;
        Ok(request)
    }
}

/// The primary's side: adds a fresh token to every request.
#[derive(Clone, Debug)]
pub struct PresentKey(pub AuthKey);

impl tonic::service::Interceptor for PresentKey {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let value =
            MetadataValue::try_from(self.0.token()).map_err(|e| Status::internal(e.to_string()))?;
        request.metadata_mut().insert(HEADER, value);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_the_same_key_and_a_close_time() {
        let a = AuthKey([1; 32]);
        let b = AuthKey([2; 32]);
        assert!(a.verify(&a.token()).is_ok());
        assert_eq!(b.verify(&a.token()), Err(TokenError::WrongKey));
        let old = now_secs() - 1000;
        let stale = format!("{old}:{}", a.mac(old));
        assert!(
            a.verify(&stale)
                .unwrap_err()
                .to_string()
                .contains("from this clock")
        );
        assert!(a.verify("garbage").is_err());
        assert!(a.verify("1:zz").is_err());
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = std::env::temp_dir().join(format!("hbrfs-auth-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.key");
        let made = AuthKey::load_or_create(&path).unwrap();
        let again = AuthKey::load(&path).unwrap();
        assert!(again.verify(&made.token()).is_ok());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(dir.join("bad.key"), "xyz").unwrap();
        assert!(AuthKey::load(&dir.join("bad.key")).is_err());
    }
}

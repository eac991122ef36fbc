//! Encryption and mutual authentication of the replication channel, made
//! from the pair's pre-shared key so that nothing but the key file has to
//! be copied between the sites (and `hbrfs up` needs no setup at all).
//!
//! Both sides derive the same Ed25519 key from the pre-shared key and make
//! from it the same certificate authority, the pair's own. Each side then
//! issues itself a certificate from it with a fresh key: the secondary a
//! server certificate for the name [`SERVER_NAME`], the primary a client
//! certificate. The secondary accepts only clients whose certificate
//! chains to the pair's authority, the primary only such a server: a peer
//! without the key fails the TLS handshake, before any request exists.
//! (The key's token in every request, `auth`, is checked as well.)
//!
//! Certificates are made in memory at every start and never written out;
//! their validity (rcgen's default, 1975 to 4096) keeps clock skew out of
//! the handshake. Whoever holds the key can act as either side, exactly as
//! with the key alone: keep the key file private.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::auth::AuthKey;
use crate::error::{Error, Result};

/// The name the secondary's certificate is issued for and the primary
/// checks; addresses vary, the pair's authority is what is trusted.
pub const SERVER_NAME: &str = "hbrfs-secondary";

/// The PKCS#8 (v1) wrapping of a raw Ed25519 seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn tls_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("TLS {what}: {e}"))
}

/// The pair's authority: its parameters and the key derived from `key`.
fn authority(key: &AuthKey) -> Result<(CertificateParams, KeyPair)> {
    let seed = blake3::derive_key("hbrfs 2026 pair certificate authority", key.secret());
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let ca_key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_slice().into(), &PKCS_ED25519)
        .map_err(|e| tls_error("authority key", e))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "hbrfs pair authority");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    Ok((params, ca_key))
}

/// The pair's authority certificate and a fresh certificate issued by it
/// for one side (PEM: certificate, key).
fn issue(key: &AuthKey, usage: ExtendedKeyUsagePurpose) -> Result<(String, String, String)> {
    let (ca_params, ca_key) = authority(key)?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| tls_error("authority certificate", e))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| tls_error("certificate", e))?;
    params.extended_key_usages = vec![usage];
    let leaf_key = KeyPair::generate_for(&PKCS_ED25519).map_err(|e| tls_error("key", e))?;
    let leaf = params
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| tls_error("certificate", e))?;
    Ok((ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem()))
}

/// The secondary's TLS: its server certificate, and clients must present
/// one from the pair's authority.
pub fn server_config(key: &AuthKey) -> Result<ServerTlsConfig> {
    let (ca, cert, private) = issue(key, ExtendedKeyUsagePurpose::ServerAuth)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, private))
        .client_ca_root(Certificate::from_pem(ca)))
}

/// The primary's TLS: its client certificate, and the server must present
/// one from the pair's authority.
pub fn client_config(key: &AuthKey) -> Result<ClientTlsConfig> {
    let (ca, cert, private) = issue(key, ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, private))
        .domain_name(SERVER_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_makes_the_same_authority_and_another_key_another() {
        let key = |b| AuthKey::from_secret([b; 32]);
        let der = |k: &AuthKey| {
            let (params, ca) = authority(k).unwrap();
            (ca.public_key_raw().to_vec(), params.distinguished_name)
        };
        assert_eq!(der(&key(1)), der(&key(1)));
        assert_ne!(der(&key(1)).0, der(&key(2)).0);
    }
}

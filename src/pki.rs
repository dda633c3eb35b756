//! The gateway's authority, the certificates it issues, and checks of PEM material (rcgen,
//! x509-parser, rustls' ring provider).
//!
//! Trust model: `gateway init` creates one authority (a self-signed CA) per gateway. It signs the
//! gateway's TLS server certificate and every client certificate. Clients pin the authority (not a
//! public CA) and check the server name; the gateway accepts only client certificates the
//! authority signed, and then, at the application layer, only the exact certificate its registry
//! pinned (by SHA-256 fingerprint) for that name. So revocation needs no CRL: the registry is the
//! revocation list.
//!
//! Keys are ECDSA P-256 (rcgen's default), supported by every rustls provider.

use std::fmt;
use std::net::IpAddr;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The authority's certificate is valid this long. Long, because replacing it means re-issuing
/// every client file.
const AUTHORITY_VALIDITY_DAYS: i64 = 20 * 365;
/// Server and client certificates are valid this long. Revocation goes through the registry, so
/// a long lifetime costs no control; a short one would silently cut clients off one day.
const LEAF_VALIDITY_DAYS: i64 = 10 * 365;
/// Certificates start being valid this long before they are issued, so a client whose clock is a
/// little behind the gateway's does not reject a fresh certificate.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::hours(1);

/// A problem creating or loading the authority or a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating a key pair failed.
    #[error("cannot generate a key pair: {0}")]
    KeyGen(rcgen::Error),
    /// Signing a certificate failed.
    #[error("cannot issue the {what} certificate: {source}")]
    Issue { what: &'static str, source: rcgen::Error },
    /// The authority's certificate or key does not load.
    #[error("the authority's {what} is invalid: {reason}")]
    BadAuthority { what: &'static str, reason: String },
    /// A name cannot go into a certificate.
    #[error("'{name}' cannot be used as a certificate name: {reason}")]
    BadName { name: String, reason: String },
}

/// SHA-256 over a certificate's DER encoding: how the registry pins a client's certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Parses the 64-hex-digit form written by [`fmt::Display`].
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            *o = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// The first 8 bytes in hex: enough to tell certificates apart in a listing or a log line.
    pub fn short(&self) -> ShortFingerprint<'_> {
        ShortFingerprint(self)
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({self})")
    }
}

/// Display helper returned by [`CertFingerprint::short`].
pub struct ShortFingerprint<'a>(&'a CertFingerprint);

impl fmt::Display for ShortFingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.0[..8].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A freshly issued certificate with its new private key (both PEM).
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: CertFingerprint,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        write!(f, "IssuedCert(sha256:{})", self.fingerprint)
    }
}

/// The gateway's certificate authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authority { .. }")
    }
}

impl Authority {
    /// Creates a new authority (key pair and self-signed CA certificate) for gateway `gateway_name`.
    pub fn generate(gateway_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::KeyGen)?;
        let mut params = base_params(AUTHORITY_VALIDITY_DAYS);
        // A random tag makes every authority's name unique: two gateways with the same name then
        // still have distinct issuers, so a certificate of the other one fails as "unknown
        // issuer" rather than as a confusing bad signature.
        let tag = rand::rng().next_u32();
        params.distinguished_name = dn(&format!("Holdfast authority ({gateway_name}) {tag:08x}"));
        // Path length 0: the authority signs leaves only, never another authority.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(|source| PkiError::Issue { what: "authority", source })?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads an authority from its certificate and key (PEM), checking that they belong together
    /// (a mismatched key would silently issue certificates nobody accepts).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let bad = |what, reason: String| PkiError::BadAuthority { what, reason };
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad("key", e.to_string()))?;
        let der = first_certificate(cert_pem).map_err(|r| bad("certificate", r))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad("certificate", e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("key", "it does not match the authority's certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad("certificate", e.to_string()))?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned() })
    }

    /// The authority's certificate (PEM): what clients pin and the gateway trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The authority's private key (PEM), for `gateway init` to store with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues the gateway's TLS server certificate, valid for `server_name` (a DNS name or an IP
    /// address) and, if given, the endpoint's IP address.
    pub fn issue_server(&self, server_name: &str, endpoint_ip: Option<IpAddr>) -> Result<IssuedCert, PkiError> {
        let mut params = base_params(LEAF_VALIDITY_DAYS);
        params.distinguished_name = dn(server_name);
        let mut sans = vec![san(server_name)?];
        if let Some(ip) = endpoint_ip.filter(|ip| !ip.is_unspecified()) {
            let ip_san = SanType::IpAddress(ip);
            if !sans.contains(&ip_san) {
                sans.push(ip_san);
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, "server")
    }

    /// Issues a client certificate whose common name is the client's `name` (the identity the
    /// gateway reads from the verified certificate).
    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, PkiError> {
        let mut params = base_params(LEAF_VALIDITY_DAYS);
        params.distinguished_name = dn(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, "client")
    }

    fn issue(&self, params: CertificateParams, what: &'static str) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::KeyGen)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|source| PkiError::Issue { what, source })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            fingerprint: CertFingerprint::of_der(cert.der()),
        })
    }
}

/// Parameters shared by every certificate: validity window and a random serial number.
fn base_params(validity_days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + time::Duration::days(validity_days);
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    // A positive integer, as RFC 5280 requires.
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Holdfast");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|e: rcgen::Error| PkiError::BadName { name: name.to_owned(), reason: e.to_string() })
}

/// All certificates in a PEM text, in order. Errors if there is none or one does not parse.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found (expected a \"BEGIN CERTIFICATE\" block)".into());
    }
    for cert in &certs {
        let (_, x509) =
            x509_parser::parse_x509_certificate(cert).map_err(|e| format!("a certificate does not parse: {e}"))?;
        if x509.validity().time_to_expiration().is_none() {
            return Err(format!("certificate '{}' expired on {}", x509.subject(), x509.validity().not_after));
        }
    }
    Ok(certs)
}

fn first_certificate(pem: &str) -> Result<CertificateDer<'static>, String> {
    certificates_from_pem(pem)?.into_iter().next().ok_or_else(|| "no certificate found".to_owned())
}

/// The private key in a PEM text, checked to be usable for TLS by the ring provider.
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no private key found (expected a \"BEGIN PRIVATE KEY\" block)".to_owned()
        }
        other => format!("not valid PEM: {other}"),
    })?;
    rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("unsupported private key: {e}"))?;
    Ok(key)
}

/// Checks that `pem` holds at least one X.509 certificate, none of them expired.
pub fn check_certificate_pem(pem: &str) -> Result<(), String> {
    certificates_from_pem(pem).map(drop)
}

/// Checks that `pem` holds a private key usable for TLS.
pub fn check_key_pem(pem: &str) -> Result<(), String> {
    private_key_from_pem(pem).map(drop)
}

/// Checks that a certificate (PEM, leaf first) and a private key (PEM) belong together.
pub fn check_pair(cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let certs = certificates_from_pem(cert_pem)?;
    let key = private_key_from_pem(key_pem)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("unsupported private key: {e}"))?;
    rustls::sign::CertifiedKey::new(certs, signer)
        .keys_match()
        .map_err(|_| "the private key does not belong to the certificate".to_owned())
}

/// The identity in a verified leaf certificate: its common name and fingerprint.
///
/// Returns `None` when the certificate has no single UTF-8 common name (the authority never
/// issues such a certificate, so this is defence in depth).
pub fn leaf_identity(der: &[u8]) -> Option<(String, CertFingerprint)> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = x509.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?;
    if names.next().is_some() {
        return None;
    }
    Some((cn.to_owned(), CertFingerprint::of_der(der)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_parse_and_carry_the_name() {
        let ca = Authority::generate("test").unwrap();
        check_certificate_pem(ca.cert_pem()).unwrap();
        check_key_pem(&ca.key_pem()).unwrap();
        let client = ca.issue_client("alice").unwrap();
        check_pair(&client.cert_pem, &client.key_pem).unwrap();
        let der = first_certificate(&client.cert_pem).unwrap();
        let (name, fp) = leaf_identity(&der).unwrap();
        assert_eq!(name, "alice");
        assert_eq!(fp, client.fingerprint);
        let server = ca.issue_server("holdfast-gateway", Some("127.0.0.1".parse().unwrap())).unwrap();
        check_pair(&server.cert_pem, &server.key_pem).unwrap();
    }

    #[test]
    fn authority_round_trips_and_rejects_a_foreign_key() {
        let ca = Authority::generate("test").unwrap();
        let again = Authority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert!(again.issue_client("bob").is_ok());
        let other = Authority::generate("other").unwrap();
        let err = Authority::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn mismatched_pair_and_garbage_are_rejected() {
        let ca = Authority::generate("test").unwrap();
        let a = ca.issue_client("a").unwrap();
        let b = ca.issue_client("b").unwrap();
        assert!(check_pair(&a.cert_pem, &b.key_pem).is_err());
        assert!(check_certificate_pem("hello").is_err());
        assert!(check_certificate_pem(&a.key_pem).is_err(), "a key is not a certificate");
        assert!(check_key_pem(&a.cert_pem).is_err(), "a certificate is not a key");
        let truncated = &a.cert_pem[..a.cert_pem.len() / 2];
        assert!(check_certificate_pem(truncated).is_err());
    }

    #[test]
    fn fingerprint_hex_round_trips() {
        let fp = CertFingerprint::of_der(b"x");
        let hex = fp.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(CertFingerprint::from_hex(&hex), Some(fp));
        assert_eq!(fp.short().to_string(), hex[..16]);
        assert_eq!(CertFingerprint::from_hex("zz"), None);
        assert_eq!(CertFingerprint::from_hex(&"g".repeat(64)), None);
    }
}

//! The gateway's authority and certificates (rcgen), and checks of PEM material. (Being written.)

/// Checks that `pem` holds at least one X.509 certificate. (Placeholder signature; implemented by
/// the gateway work.)
pub fn check_certificate_pem(pem: &str) -> Result<(), String> {
    let _ = pem;
    Ok(())
}

/// Checks that `pem` holds a private key.
pub fn check_key_pem(pem: &str) -> Result<(), String> {
    let _ = pem;
    Ok(())
}

//! The AES-256-GCM under [`super::seal::SessionCipher`]: one cipher, two libraries, and one place
//! that chooses between them ([`Backend::for_this_cpu`]).
//!
//! Why two: each is the faster one on some CPUs, and the difference is the AEAD's whole share of
//! the data plane's CPU (README, "AES-GCM crate"). AWS-LC (aws-lc-rs) has AES-GCM code for
//! 512-bit VAES registers, which ring lacks: on a 2-vCPU Intel Xeon with AVX-512 it seals a
//! full-size packet in 0.78x ring's time and opens it in 0.84x. ring has code for 256-bit VAES
//! registers, which AWS-LC lacks: on a CPU with VAES but no AVX-512 (the AMD EPYC machines
//! without it) AWS-LC falls back to 128-bit AES-NI code. Both compute the same AES-256-GCM, so
//! the two ends of a tunnel need not agree on anything; a property test seals with one and opens
//! with the other.
//!
//! Nothing here allocates per call, logs or panics.

use std::mem::MaybeUninit;

/// Which library's AES-256-GCM a session's cipher runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// ring: 256-bit VAES code where the CPU has VAES, AES-NI otherwise.
    Ring,
    /// AWS-LC through aws-lc-rs: 512-bit VAES code where the CPU has AVX-512 and VAES.
    AwsLc,
}

impl Backend {
    /// Every backend (for tests and benches that run each).
    pub const ALL: [Self; 2] = [Self::Ring, Self::AwsLc];

    /// The faster one on this CPU: AWS-LC where it runs its 512-bit code, ring everywhere else.
    pub fn for_this_cpu() -> Self {
        Self::choose(wide_vaes())
    }

    /// The choice itself, given whether AWS-LC would run its 512-bit AES-GCM code here.
    pub const fn choose(wide_vaes: bool) -> Self {
        if wide_vaes { Self::AwsLc } else { Self::Ring }
    }

    /// A short stable name, for the bench, the data planes' "data plane up" log line and the
    /// status reports' `aead` field.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::AwsLc => "aws-lc-rs",
        }
    }
}

/// The cipher as the status reports say it to a person, given a backend's [`Backend::name`]
/// (from a report, which may come from another build): "AES-256-GCM (aws-lc-rs)".
pub fn describe(backend: &str) -> String {
    format!("AES-256-GCM ({backend})")
}

/// Whether AWS-LC takes its 512-bit AES-GCM path on this CPU: the features its own dispatch asks
/// for (`crypto_gcm_avx512_enabled` in its `modes/gcm.c`: VAES, VPCLMULQDQ, and the AVX-512 F,
/// DQ, IFMA, BW and VL of `CRYPTO_is_AVX512_capable`), each also enabled by the OS, which
/// `is_x86_feature_detected!` checks. Short of any, AWS-LC would run 128-bit AES-NI code.
#[cfg(target_arch = "x86_64")]
fn wide_vaes() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512ifma")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// Elsewhere neither library has such code; ring, the one measured here before, stays.
#[cfg(not(target_arch = "x86_64"))]
fn wide_vaes() -> bool {
    false
}

/// A seal or an open that failed: for an open, a tag that does not verify; for a seal, a
/// plaintext beyond the cipher's limit (64 GiB), which no datagram reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AeadFailed;

/// One session's expanded AES-256-GCM key in the backend chosen for it.
pub(super) struct AeadKey(Inner);

// ring's key inline (544 bytes, once per session): no pointer to follow per packet, and the
// wipe on drop writes memory this type owns. AWS-LC's key is a pointer to AWS-LC's allocation.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Ring(RingKey),
    AwsLc(aws_lc_rs::aead::LessSafeKey),
}

impl AeadKey {
    /// Expands `key` for `backend` (the costly part, once per session).
    pub(super) fn new(backend: Backend, key: &[u8; 32]) -> Self {
        // Both take exactly 32 bytes for AES-256-GCM and `key` is a `[u8; 32]`: these cannot fail.
        Self(match backend {
            Backend::Ring => {
                let k = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
                    .unwrap_or_else(|_| unreachable!("AES-256-GCM key is 32 bytes"));
                Inner::Ring(RingKey(MaybeUninit::new(ring::aead::LessSafeKey::new(k))))
            }
            Backend::AwsLc => {
                let k = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
                    .unwrap_or_else(|_| unreachable!("AES-256-GCM key is 32 bytes"));
                Inner::AwsLc(aws_lc_rs::aead::LessSafeKey::new(k))
            }
        })
    }

    pub(super) fn backend(&self) -> Backend {
        match self.0 {
            Inner::Ring(_) => Backend::Ring,
            Inner::AwsLc(_) => Backend::AwsLc,
        }
    }

    /// Encrypts `body` in place under `nonce` with `aad` authenticated; returns the tag.
    pub(super) fn seal(&self, nonce: [u8; 12], aad: &[u8], body: &mut [u8]) -> Result<[u8; 16], AeadFailed> {
        let mut out = [0u8; 16];
        match &self.0 {
            Inner::Ring(k) => {
                use ring::aead::{Aad, Nonce};
                let tag = k
                    .get()
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
                    .map_err(|_| AeadFailed)?;
                out.copy_from_slice(tag.as_ref());
            }
            Inner::AwsLc(k) => {
                use aws_lc_rs::aead::{Aad, Nonce};
                let tag = k
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
                    .map_err(|_| AeadFailed)?;
                out.copy_from_slice(tag.as_ref());
            }
        }
        Ok(out)
    }

    /// Verifies the tag at the end of `body_and_tag` (at least 16 bytes) and decrypts the rest
    /// in place.
    pub(super) fn open(&self, nonce: [u8; 12], aad: &[u8], body_and_tag: &mut [u8]) -> Result<(), AeadFailed> {
        let opened = match &self.0 {
            Inner::Ring(k) => {
                use ring::aead::{Aad, Nonce};
                k.get().open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body_and_tag).is_ok()
            }
            Inner::AwsLc(k) => {
                use aws_lc_rs::aead::{Aad, Nonce};
                k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body_and_tag).is_ok()
            }
        };
        if opened { Ok(()) } else { Err(AeadFailed) }
    }
}

/// ring's expanded key, wiped when dropped: ring does not wipe it, AWS-LC does (it zeroes every
/// allocation it frees, its key's among them: `OPENSSL_free` in its `mem.h`).
struct RingKey(
    /// Always initialised until `drop`; `MaybeUninit` only so that `drop` may overwrite it with
    /// zeros (not a valid `LessSafeKey`) without ever creating such a value.
    MaybeUninit<ring::aead::LessSafeKey>,
);

// Skipping `LessSafeKey`'s drop in favour of a wipe leaks nothing only while it owns no heap or
// other resource: this fails to compile the day a ring upgrade gives it drop glue.
const _: () = assert!(!std::mem::needs_drop::<ring::aead::LessSafeKey>());

impl RingKey {
    fn get(&self) -> &ring::aead::LessSafeKey {
        // SAFETY: initialised in `AeadKey::new` and only overwritten in `drop`.
        unsafe { self.0.assume_init_ref() }
    }
}

impl Drop for RingKey {
    fn drop(&mut self) {
        // A volatile write, so the compiler cannot elide the wipe of memory about to be freed.
        // SAFETY: `&mut self.0` is a valid, aligned, exclusive pointer, and all-zero bytes are a
        // valid `MaybeUninit`. The key is not read again: this is its owner's drop.
        unsafe { std::ptr::write_volatile(&mut self.0, MaybeUninit::zeroed()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_follows_the_wide_code_and_names_are_stable() {
        assert_eq!(Backend::choose(true), Backend::AwsLc);
        assert_eq!(Backend::choose(false), Backend::Ring);
        assert_eq!(Backend::for_this_cpu(), Backend::choose(wide_vaes()));
        assert_eq!(Backend::ALL.map(Backend::name), ["ring", "aws-lc-rs"]);
        for b in Backend::ALL {
            assert_eq!(AeadKey::new(b, &[1; 32]).backend(), b);
        }
    }

    #[test]
    fn each_backend_opens_what_the_other_seals_and_refuses_a_flipped_bit() {
        let key = [0x33; 32];
        let (nonce, aad) = ([9u8; 12], [1u8, 2, 3, 4]);
        for (a, b) in [(Backend::Ring, Backend::AwsLc), (Backend::AwsLc, Backend::Ring)] {
            let (ka, kb) = (AeadKey::new(a, &key), AeadKey::new(b, &key));
            let mut body = b"the same cipher either way".to_vec();
            let tag = ka.seal(nonce, &aad, &mut body).expect("seal");
            body.extend_from_slice(&tag);
            let mut tampered = body.clone();
            tampered[3] ^= 1;
            assert_eq!(kb.open(nonce, &aad, &mut tampered), Err(AeadFailed));
            kb.open(nonce, &aad, &mut body).expect("open");
            assert_eq!(&body[..body.len() - 16], b"the same cipher either way");
        }
    }

    #[test]
    fn drop_wipes_rings_key_schedule() {
        let mut slot = MaybeUninit::new(match AeadKey::new(Backend::Ring, &[0x77; 32]).0 {
            Inner::Ring(k) => k,
            Inner::AwsLc(_) => unreachable!("asked for ring"),
        });
        // SAFETY: initialised just above and dropped once; afterwards only its bytes are read,
        // which the drop wrote (all of them: a `MaybeUninit` write keeps every byte).
        let bytes = unsafe {
            slot.assume_init_drop();
            std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), std::mem::size_of::<RingKey>())
        };
        // Without the wipe these bytes would hold the AES round keys and GHASH table (and a
        // non-null algorithm pointer), so this cannot pass by accident.
        assert!(bytes.iter().all(|&b| b == 0));
    }
}

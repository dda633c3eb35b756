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
//! Where AWS-LC is the faster one, short packets still go to ring ([`Backend::Split`]): warm, the
//! two are level at 64 bytes, but the lone packet of a quiet spell (a ping, a DNS query, an ACK)
//! meets a cold CPU, and there AWS-LC's open took 9.2-11.2 µs against ring's 6.6-6.8 (medians of
//! 422 gateway receives each, rdtsc probes; README, "Ping, session 21").
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
    /// AWS-LC for bodies longer than [`SHORT`] bytes, ring for the rest: both keys expanded.
    Split,
}

/// The longest body [`Backend::Split`] gives to ring. Up to here the two libraries are level warm
/// (64 bytes: within 5 ns of each other either way), so nothing under load pays for the choice,
/// while a cold lone packet takes ring's shorter path; a full-size packet goes to AWS-LC, 50 ns
/// faster per seal warm. Pings, ACKs, keepalives, probes and most DNS fall under it.
pub const SHORT: usize = 256;

impl Backend {
    /// Every backend (for tests and benches that run each).
    pub const ALL: [Self; 3] = [Self::Ring, Self::AwsLc, Self::Split];

    /// The faster one on this CPU: AWS-LC where it runs its 512-bit code (with ring for short
    /// bodies), ring everywhere else.
    pub fn for_this_cpu() -> Self {
        Self::choose(wide_vaes())
    }

    /// The choice itself, given whether AWS-LC would run its 512-bit AES-GCM code here.
    pub const fn choose(wide_vaes: bool) -> Self {
        if wide_vaes { Self::Split } else { Self::Ring }
    }

    /// The library that seals or opens a body of `len` bytes (the tag not counted).
    pub const fn for_len(self, len: usize) -> Self {
        match self {
            Self::Split if len <= SHORT => Self::Ring,
            Self::Split => Self::AwsLc,
            b => b,
        }
    }

    /// A short stable name, for the bench, the data planes' "data plane up" log line and the
    /// status reports' `aead` field.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::AwsLc => "aws-lc-rs",
            Self::Split => "aws-lc-rs+ring",
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
    /// [`Backend::Split`]: both expansions of the one key.
    Split(RingKey, aws_lc_rs::aead::LessSafeKey),
}

/// The key one call uses: `Inner::Split` resolved by the body's length.
enum One<'a> {
    Ring(&'a ring::aead::LessSafeKey),
    AwsLc(&'a aws_lc_rs::aead::LessSafeKey),
}

impl AeadKey {
    /// Expands `key` for `backend` (the costly part, once per session).
    pub(super) fn new(backend: Backend, key: &[u8; 32]) -> Self {
        Self(match backend {
            Backend::Ring => Inner::Ring(ring_key(key)),
            Backend::AwsLc => Inner::AwsLc(aws_lc_key(key)),
            Backend::Split => Inner::Split(ring_key(key), aws_lc_key(key)),
        })
    }

    pub(super) fn backend(&self) -> Backend {
        match self.0 {
            Inner::Ring(_) => Backend::Ring,
            Inner::AwsLc(_) => Backend::AwsLc,
            Inner::Split(..) => Backend::Split,
        }
    }

    /// The expanded key that handles a body of `len` bytes.
    #[inline]
    fn one(&self, len: usize) -> One<'_> {
        match &self.0 {
            Inner::Ring(k) => One::Ring(k.get()),
            Inner::AwsLc(k) => One::AwsLc(k),
            Inner::Split(r, _) if Backend::Split.for_len(len) == Backend::Ring => One::Ring(r.get()),
            Inner::Split(_, a) => One::AwsLc(a),
        }
    }

    /// Encrypts `body` in place under `nonce` with `aad` authenticated; returns the tag.
    pub(super) fn seal(&self, nonce: [u8; 12], aad: &[u8], body: &mut [u8]) -> Result<[u8; 16], AeadFailed> {
        let mut out = [0u8; 16];
        match self.one(body.len()) {
            One::Ring(k) => {
                use ring::aead::{Aad, Nonce};
                let tag = k
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
                    .map_err(|_| AeadFailed)?;
                out.copy_from_slice(tag.as_ref());
            }
            One::AwsLc(k) => {
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
        let body = body_and_tag.len().saturating_sub(16);
        let opened = match self.one(body) {
            One::Ring(k) => {
                use ring::aead::{Aad, Nonce};
                k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body_and_tag).is_ok()
            }
            One::AwsLc(k) => {
                use aws_lc_rs::aead::{Aad, Nonce};
                k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body_and_tag).is_ok()
            }
        };
        if opened { Ok(()) } else { Err(AeadFailed) }
    }
}

fn ring_key(key: &[u8; 32]) -> RingKey {
    // Both libraries take exactly 32 bytes for AES-256-GCM and `key` is a `[u8; 32]`: the
    // expansions cannot fail.
    let k = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
        .unwrap_or_else(|_| unreachable!("AES-256-GCM key is 32 bytes"));
    RingKey(MaybeUninit::new(ring::aead::LessSafeKey::new(k)))
}

fn aws_lc_key(key: &[u8; 32]) -> aws_lc_rs::aead::LessSafeKey {
    let k = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
        .unwrap_or_else(|_| unreachable!("AES-256-GCM key is 32 bytes"));
    aws_lc_rs::aead::LessSafeKey::new(k)
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
        assert_eq!(Backend::choose(true), Backend::Split);
        assert_eq!(Backend::choose(false), Backend::Ring);
        assert_eq!(Backend::for_this_cpu(), Backend::choose(wide_vaes()));
        assert_eq!(Backend::ALL.map(Backend::name), ["ring", "aws-lc-rs", "aws-lc-rs+ring"]);
        for b in Backend::ALL {
            assert_eq!(AeadKey::new(b, &[1; 32]).backend(), b);
        }
    }

    #[test]
    fn the_split_gives_short_bodies_to_ring_and_long_ones_to_aws_lc() {
        assert_eq!(Backend::Split.for_len(0), Backend::Ring);
        assert_eq!(Backend::Split.for_len(SHORT), Backend::Ring);
        assert_eq!(Backend::Split.for_len(SHORT + 1), Backend::AwsLc);
        assert_eq!(Backend::Split.for_len(1400), Backend::AwsLc);
        for len in [0, SHORT, SHORT + 1, 65535] {
            assert_eq!(Backend::Ring.for_len(len), Backend::Ring);
            assert_eq!(Backend::AwsLc.for_len(len), Backend::AwsLc);
        }
        // The key each call takes, on both sides of the boundary, seal and open alike.
        let k = AeadKey::new(Backend::Split, &[5; 32]);
        assert!(matches!(k.one(SHORT), One::Ring(_)));
        assert!(matches!(k.one(SHORT + 1), One::AwsLc(_)));
    }

    #[test]
    fn each_backend_opens_what_the_others_seal_and_refuses_a_flipped_bit() {
        let key = [0x33; 32];
        let (nonce, aad) = ([9u8; 12], [1u8, 2, 3, 4]);
        // Both sides of the split's boundary, so that each of its keys meets each library.
        for len in [26, SHORT, SHORT + 1, 1400] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for a in Backend::ALL {
                for b in Backend::ALL {
                    let (ka, kb) = (AeadKey::new(a, &key), AeadKey::new(b, &key));
                    let mut body = plain.clone();
                    let tag = ka.seal(nonce, &aad, &mut body).expect("seal");
                    assert_ne!(body, plain, "{a:?} sealed nothing");
                    body.extend_from_slice(&tag);
                    let mut tampered = body.clone();
                    tampered[len / 2] ^= 1;
                    assert_eq!(kb.open(nonce, &aad, &mut tampered), Err(AeadFailed), "{a:?} -> {b:?}, {len} B");
                    kb.open(nonce, &aad, &mut body).expect("open");
                    assert_eq!(&body[..len], &plain[..], "{a:?} -> {b:?}, {len} B");
                }
            }
        }
    }

    #[test]
    fn drop_wipes_rings_key_schedule() {
        let mut slot = MaybeUninit::new(match AeadKey::new(Backend::Ring, &[0x77; 32]).0 {
            Inner::Ring(k) => k,
            Inner::AwsLc(_) | Inner::Split(..) => unreachable!("asked for ring"),
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

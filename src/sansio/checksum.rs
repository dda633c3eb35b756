//! The Internet checksum (RFC 1071), one implementation for every packet this crate checks or
//! builds: TCP/IP checksums verified and fixed by the coalescer, ICMP answers built by
//! [`super::icmp`].

/// The ones'-complement sum of `data` read as big-endian 16-bit words (a last odd byte padded
/// with zero), folded to 16 bits but returned wide so sums can be added before [`fold`].
///
/// It adds the 32-bit halves of native 64-bit words, which the compiler vectorises, and swaps
/// to big-endian once at the end: the end-around carry makes the byte order of the words
/// commute with the sum. (Measured: about 1% of the data plane's CPU at 5 Gbit/s.) On a CPU
/// with AVX2 the same loop runs compiled for it: 18 against 32 ns for a 1436-byte segment
/// (2026-11-30, AMD EPYC), once per received segment.
pub fn sum(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { sum_avx2(data) };
    }
    sum_portable(data)
}

/// [`sum`] compiled for AVX2 (wider vectors for the same loop).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[u8]) -> u64 {
    sum_words(data)
}

/// [`sum`] for any CPU.
fn sum_portable(data: &[u8]) -> u64 {
    sum_words(data)
}

#[inline(always)]
fn sum_words(data: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let v = u64::from_ne_bytes(b);
        // At most 2^33 per step: 65535 bytes cannot overflow 64 bits.
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    u64::from(u16::from_be(fold(acc)))
}

/// Folds a ones'-complement sum to 16 bits with end-around carries (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` with `initial` (a pseudo-header's [`sum`]) added: the value to
/// write into a checksum field that was zero while summing. 0 over data that carries a valid one.
pub fn internet(initial: u64, data: &[u8]) -> u16 {
    !fold(initial + sum(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both builds of the loop agree with each other on every length and alignment (the
    /// coalescer's tests check `sum` against a word-by-word reference).
    #[test]
    fn the_avx2_build_sums_as_the_portable_one() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        for start in 0..8 {
            for len in (0..300).chain([1436, 1500, 1992 - start]) {
                let d = &data[start..start + len];
                assert_eq!(fold(sum(d)), fold(sum_portable(d)), "start {start} len {len}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: checked just above.
                    assert_eq!(unsafe { sum_avx2(d) }, sum_portable(d), "start {start} len {len}");
                }
            }
        }
    }
}

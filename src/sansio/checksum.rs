//! The Internet checksum (RFC 1071), one implementation for every packet this crate checks or
//! builds: TCP/IP checksums verified and fixed by the coalescer, ICMP answers built by
//! [`super::icmp`].

/// The ones'-complement sum of `data` read as big-endian 16-bit words (a last odd byte padded
/// with zero), folded to 16 bits but returned wide so sums can be added before [`fold`].
///
/// It adds the 32-bit halves of native 64-bit words, which the compiler vectorises, and swaps
/// to big-endian once at the end: the end-around carry makes the byte order of the words
/// commute with the sum. (Measured: about 1% of the data plane's CPU at 5 Gbit/s.)
pub fn sum(data: &[u8]) -> u64 {
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

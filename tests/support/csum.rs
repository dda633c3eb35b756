//! The reference Internet checksum for the property tests of the crate's own (`coalesce_props`,
//! `segment_props`): ones'-complement sum over big-endian words, one word at a time, as RFC 1071
//! writes it; deliberately not the crate's vectorised code.

/// The folded sum of `data` added to `initial` (not complemented).
pub fn csum(data: &[u8], initial: u32) -> u16 {
    let mut acc = initial;
    for w in data.chunks(2) {
        let v = if w.len() == 2 { u16::from_be_bytes([w[0], w[1]]) } else { u16::from(w[0]) << 8 };
        acc += u32::from(v);
        acc = (acc & 0xffff) + (acc >> 16);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

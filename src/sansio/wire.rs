//! The data-plane datagram format: parsing and writing the fixed header, no crypto, no IO.
//!
//! Every datagram starts with the same 20-byte header (all integers big-endian):
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +-------+-------+-----------------------------------------------+
//! |version| type  |            reserved (must be zero)            |  bytes  0..4
//! +-------+-------+-----------------------------------------------+
//! |                   session id (64 bits)                        |  bytes  4..12
//! |                                                               |
//! +---------------------------------------------------------------+
//! |                   counter (64 bits)                           |  bytes 12..20
//! |                                                               |
//! +---------------------------------------------------------------+
//! |          ciphertext of the inner IP packet (0..n bytes)       |  Data only
//! +---------------------------------------------------------------+
//! |                 AES-256-GCM tag (16 bytes)                    |  Data, Keepalive
//! +---------------------------------------------------------------+
//! ```
//!
//! - Byte 0 holds two 4-bit fields: the high nibble (`byte0 >> 4`) is the format version
//!   ([`VERSION`] = 1), the low nibble (`byte0 & 0x0f`) is the [`MsgType`]. A Data datagram of
//!   version 1 therefore starts with the byte 0x11, a Keepalive with 0x12, an UnknownSession
//!   notice with 0x13. Type 0 is never valid, so an all-zero buffer never parses.
//! - The three reserved bytes keep the two 64-bit fields 4-byte aligned and the inner IP packet
//!   at a 4-byte aligned offset. They must be zero: a receiver rejects anything else, so a later
//!   version can give them a meaning without old peers misreading it. For sealed types they are
//!   covered by the AAD like the rest of the header.
//! - [`MsgType::Data`] and [`MsgType::Keepalive`] are sealed (see [`crate::sansio::seal`]): the
//!   whole 20-byte header is the AEAD associated data. A keepalive has an empty payload, so it is
//!   exactly `HEADER_LEN + TAG_LEN` bytes.
//! - [`MsgType::UnknownSession`] is the gateway's notice "I don't know session X". It is exactly
//!   `HEADER_LEN` bytes, has no tag and cannot have one (the gateway has no key for a session it
//!   doesn't know), so a receiver may use it only as a hint. Its counter field echoes the counter
//!   of the datagram that triggered it. It is smaller than any datagram that can trigger it, so it
//!   cannot be used for amplification.

use thiserror::Error;

use super::session::SessionId;

/// The format version carried in the high nibble of byte 0.
pub const VERSION: u8 = 1;

/// Length of the fixed header, which is also the AEAD associated data of sealed datagrams.
pub const HEADER_LEN: usize = 20;

/// Length of the AES-GCM authentication tag appended to sealed datagrams.
pub const TAG_LEN: usize = 16;

/// Bytes a sealed datagram adds to the inner packet.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Bytes of an IPv4 header without options plus a UDP header: what the underlay adds on top of
/// our datagram.
pub const IPV4_UDP_HEADERS: usize = 28;

/// Bytes of an IPv6 header plus a UDP header: the underlay's cost when it is IPv6.
pub const IPV6_UDP_HEADERS: usize = 48;

/// The smallest MTU an IPv4 link must support (RFC 791); a TUN MTU below it is useless.
const MIN_IPV4_MTU: u16 = 68;

/// The byte offsets of the header fields.
const RESERVED: std::ops::Range<usize> = 1..4;
const SESSION_ID: std::ops::Range<usize> = 4..12;
const COUNTER: std::ops::Range<usize> = 12..20;

/// [`tun_mtu_for`] over an underlay of either family: an IPv6 underlay costs 20 bytes more.
pub const fn tun_mtu_over(underlay_mtu: u16, underlay: super::inner::IpFamily) -> Option<u16> {
    match underlay {
        super::inner::IpFamily::V4 => tun_mtu_for(underlay_mtu),
        // The difference is a small constant (20), so the cast cannot truncate.
        super::inner::IpFamily::V6 => match underlay_mtu
            .checked_sub((IPV6_UDP_HEADERS - IPV4_UDP_HEADERS) as u16)
        {
            Some(m) => tun_mtu_for(m),
            None => None,
        },
    }
}

/// The MTU to give the TUN device so that one inner packet, sealed, fits in one underlay packet
/// of `underlay_mtu` bytes (IPv4 + UDP). `None` if what would remain is below the IPv4 minimum.
pub const fn tun_mtu_for(underlay_mtu: u16) -> Option<u16> {
    // The sum is a small constant (64), so the cast cannot truncate.
    const COST: u16 = (IPV4_UDP_HEADERS + OVERHEAD) as u16;
    match underlay_mtu.checked_sub(COST) {
        Some(mtu) if mtu >= MIN_IPV4_MTU => Some(mtu),
        _ => None,
    }
}

/// What a datagram is; the low nibble of byte 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    /// A sealed inner IP packet, in either direction.
    Data = 1,
    /// A sealed empty payload: keeps NAT mappings open and tells the gateway the client's
    /// current endpoint.
    Keepalive = 2,
    /// Gateway to client, unauthenticated: "I don't know this session id".
    UnknownSession = 3,
}

impl MsgType {
    /// Byte 0 of a datagram of this type.
    pub const fn first_byte(self) -> u8 {
        (VERSION << 4) | self as u8
    }

    fn from_nibble(n: u8) -> Option<Self> {
        match n {
            1 => Some(Self::Data),
            2 => Some(Self::Keepalive),
            3 => Some(Self::UnknownSession),
            _ => None,
        }
    }
}

/// Why a datagram's header was refused. Each variant is a counter the shell keeps; none is ever
/// logged per packet.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// Shorter than the header (or than header + tag for a sealed type).
    #[error("datagram truncated")]
    Truncated,
    /// The version nibble is not [`VERSION`].
    #[error("unsupported format version")]
    BadVersion,
    /// The type nibble names no [`MsgType`].
    #[error("unknown message type")]
    UnknownType,
    /// A reserved byte is not zero.
    #[error("reserved header bytes are not zero")]
    BadReserved,
    /// Longer than its fixed-size type allows (a keepalive with a payload, a notice with a tail).
    #[error("datagram length does not fit its message type")]
    BadLength,
}

/// A parsed header. Parsing checks the datagram's whole length against its type, so a `Header`
/// of a sealed type guarantees room for the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the datagram is.
    pub msg_type: MsgType,
    /// The session it belongs to (for a notice: the session the gateway does not know).
    pub session_id: SessionId,
    /// The sender's per-direction counter (for a notice: the triggering datagram's counter).
    pub counter: u64,
}

impl Header {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.msg_type.first_byte();
        out[SESSION_ID].copy_from_slice(&self.session_id.0.to_be_bytes());
        out[COUNTER].copy_from_slice(&self.counter.to_be_bytes());
        out
    }
}

fn be_u64(bytes: &[u8; HEADER_LEN], range: std::ops::Range<usize>) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[range]);
    u64::from_be_bytes(b)
}

/// Parses and checks the header of a whole received datagram (not just its first 20 bytes: the
/// total length is checked against the type). Never allocates, never panics.
pub fn parse_header(datagram: &[u8]) -> Result<Header, WireError> {
    let Some(head) = datagram.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated);
    };
    if head[0] >> 4 != VERSION {
        return Err(WireError::BadVersion);
    }
    let msg_type = MsgType::from_nibble(head[0] & 0x0f).ok_or(WireError::UnknownType)?;
    if head[RESERVED].iter().any(|&b| b != 0) {
        return Err(WireError::BadReserved);
    }
    let len = datagram.len();
    match msg_type {
        MsgType::Data if len < OVERHEAD => return Err(WireError::Truncated),
        MsgType::Keepalive if len < OVERHEAD => return Err(WireError::Truncated),
        MsgType::Keepalive if len > OVERHEAD => return Err(WireError::BadLength),
        MsgType::UnknownSession if len > HEADER_LEN => return Err(WireError::BadLength),
        _ => {}
    }
    Ok(Header {
        msg_type,
        session_id: SessionId(be_u64(head, SESSION_ID)),
        counter: be_u64(head, COUNTER),
    })
}

/// The "unknown session" notice for `session_id`: the whole datagram, [`HEADER_LEN`] bytes.
///
/// The gateway sends it (rate-limited, the shell's job) in answer to a well-formed Data or
/// Keepalive datagram whose session id it does not know, never in answer to a notice, so two
/// gateways cannot ping-pong notices. `echoed_counter` is the triggering datagram's counter.
pub fn unknown_session_notice(session_id: SessionId, echoed_counter: u64) -> [u8; HEADER_LEN] {
    Header {
        msg_type: MsgType::UnknownSession,
        session_id,
        counter: echoed_counter,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_len(msg_type: MsgType, payload: usize) -> Vec<u8> {
        let mut d = vec![0u8; HEADER_LEN + payload + TAG_LEN];
        d[..HEADER_LEN].copy_from_slice(
            &Header {
                msg_type,
                session_id: SessionId(0x0102_0304_0506_0708),
                counter: 0x1112_1314_1516_1718,
            }
            .to_bytes(),
        );
        d
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let d = sealed_len(MsgType::Data, 0);
        assert_eq!(
            &d[..HEADER_LEN],
            &[
                0x11, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
                0x18
            ]
        );
        assert_eq!(MsgType::Keepalive.first_byte(), 0x12);
        assert_eq!(MsgType::UnknownSession.first_byte(), 0x13);
    }

    #[test]
    fn round_trips_every_type() {
        for (t, payload) in [
            (MsgType::Data, 100),
            (MsgType::Data, 0),
            (MsgType::Keepalive, 0),
        ] {
            let d = sealed_len(t, payload);
            let h = parse_header(&d).expect("valid");
            assert_eq!(h.msg_type, t);
            assert_eq!(h.session_id, SessionId(0x0102_0304_0506_0708));
            assert_eq!(h.counter, 0x1112_1314_1516_1718);
        }
        let h = parse_header(&unknown_session_notice(SessionId(42), 7)).expect("valid notice");
        assert_eq!(
            h,
            Header {
                msg_type: MsgType::UnknownSession,
                session_id: SessionId(42),
                counter: 7
            }
        );
    }

    #[test]
    fn refuses_each_malformation_with_its_own_error() {
        let good = sealed_len(MsgType::Data, 4);
        assert_eq!(parse_header(&[]), Err(WireError::Truncated));
        assert_eq!(
            parse_header(&good[..HEADER_LEN - 1]),
            Err(WireError::Truncated)
        );
        // A Data header without room for the tag.
        assert_eq!(
            parse_header(&good[..OVERHEAD - 1]),
            Err(WireError::Truncated)
        );

        let mut d = good.clone();
        d[0] = 0x21;
        assert_eq!(parse_header(&d), Err(WireError::BadVersion));
        d[0] = 0x01;
        assert_eq!(parse_header(&d), Err(WireError::BadVersion));
        for nibble in [0u8, 4, 0xf] {
            d[0] = 0x10 | nibble;
            assert_eq!(parse_header(&d), Err(WireError::UnknownType), "{nibble}");
        }
        for i in 1..4 {
            let mut d = good.clone();
            d[i] = 0x80;
            assert_eq!(parse_header(&d), Err(WireError::BadReserved), "byte {i}");
        }

        let mut ka = sealed_len(MsgType::Keepalive, 1);
        assert_eq!(parse_header(&ka), Err(WireError::BadLength));
        ka.truncate(OVERHEAD - 1);
        assert_eq!(parse_header(&ka), Err(WireError::Truncated));

        let mut notice = unknown_session_notice(SessionId(1), 0).to_vec();
        notice.push(0);
        assert_eq!(parse_header(&notice), Err(WireError::BadLength));
    }

    #[test]
    fn tun_mtu_subtracts_udp_ipv4_and_overhead() {
        assert_eq!(OVERHEAD, 36);
        assert_eq!(tun_mtu_for(1500), Some(1436));
        assert_eq!(tun_mtu_for(9000), Some(8936));
        assert_eq!(tun_mtu_for(64 + 68), Some(68));
        assert_eq!(tun_mtu_for(64 + 67), None);
        assert_eq!(tun_mtu_for(0), None);
        use crate::sansio::inner::IpFamily;
        assert_eq!(tun_mtu_over(1500, IpFamily::V4), Some(1436));
        assert_eq!(tun_mtu_over(1500, IpFamily::V6), Some(1416));
        assert_eq!(tun_mtu_over(84 + 68, IpFamily::V6), Some(68));
        assert_eq!(tun_mtu_over(10, IpFamily::V6), None);
    }
}

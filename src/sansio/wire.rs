//! The data-plane datagram format: parsing and writing the fixed header, no crypto, no IO.
//!
//! Every datagram starts with the same 20-byte header (all integers big-endian):
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +-------+-------+-----------------------------------------------+
//! |version| type  |     flags     |    reserved (must be zero)    |  bytes  0..4
//! +-------+-------+---------------+-------------------------------+
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
//! - Bytes 1..4 keep the two 64-bit fields 4-byte aligned and the inner IP packet at a 4-byte
//!   aligned offset. Byte 1 holds flags, bytes 2 and 3 are reserved. Both must be zero unless a
//!   flag below says otherwise: a receiver rejects anything else, so a later version can give
//!   them a meaning without old peers misreading it. For sealed types they are covered by the
//!   AAD like the rest of the header.
//! - [`FLAG_CSUM_PARTIAL`] (Data only): the inner packet is a TCP segment directly behind its IP
//!   header (IPv4, or IPv6 without extension headers) whose checksum field holds only the sum of
//!   the TCP pseudo-header, for the receiver's kernel to finish (a TUN write with
//!   `VIRTIO_NET_HDR_F_NEEDS_CSUM`). A sender cutting a TSO packet into segments then copies
//!   their payload without summing it, and the receiver merges them without checking a sum
//!   nobody computed. Each side sets it only towards a peer that said in `Authenticate` that it
//!   takes it (`accepts_partial_checksums`), so a peer from before the flag never sees it.
//! - [`MsgType::Data`] and [`MsgType::Keepalive`] are sealed (see [`crate::sansio::seal`]): the
//!   whole 20-byte header is the AEAD associated data. A keepalive has an empty payload, so it is
//!   exactly `HEADER_LEN + TAG_LEN` bytes.
//! - [`MsgType::UnknownSession`] is the gateway's notice "I don't know session X". It is exactly
//!   `HEADER_LEN` bytes, has no tag and cannot have one (the gateway has no key for a session it
//!   doesn't know), so a receiver may use it only as a hint. Its counter field echoes the counter
//!   of the datagram that triggered it. It is smaller than any datagram that can trigger it, so it
//!   cannot be used for amplification.
//! - [`MsgType::Probe`] (client to gateway, 0x14) and [`MsgType::ProbeAck`] (gateway to client,
//!   0x15) carry path MTU discovery (see [`crate::sansio::pmtud`]). Both are sealed like a
//!   keepalive, so the gateway answers only a probe that opened under its session's key (never
//!   an unauthenticated datagram), and their payload is a [`ProbeBody`] /
//!   [`ProbeAckBody`] of [`PROBE_BODY_LEN`] bytes followed by zero padding:
//!
//! ```text
//!  Probe payload                              ProbeAck payload
//!  0..4   probe id (echoed by the ack)         0..4   probe id (the probe's)
//!  4      kind: 1 up, 2 down                   4      kind (the probe's)
//!  5      reserved (zero)                      5      reserved (zero)
//!  6..8   ack_len: the datagram length the     6..8   probe_len: the length of the probe
//!         ack must have (down; 0 for up)              datagram as it arrived
//!  8..10  down_ok: the largest datagram        8..12  reserved (zero)
//!         length that fits the path from the
//!         gateway to the client (0: unknown)
//!  10..12 reserved (zero)
//!  12..   zero padding                         12..   zero padding, up to the probe's ack_len
//! ```
//!
//!   The client drives discovery of both directions, so the gateway keeps no timer per session:
//!   an *up* probe is padded to the size under test and answered with a minimal ack; a *down*
//!   probe is minimal and asks for an ack padded to the size under test. Every probe carries
//!   `down_ok`, which tells the gateway what fits the path to this client. An ack is never
//!   longer than the probe asked for and never longer than [`MAX_PROBE_LEN`]; a padded ack is
//!   only ever sent to an authenticated session (its own key), so it cannot amplify a spoofed
//!   flood, and the gateway rate-limits them in total.

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

/// The smallest inner MTU the tunnel is ever sized to, on either side, whatever the path or a
/// probe says: IPv4's minimum datagram that every host must accept (RFC 791). A path smaller
/// than that cannot carry the tunnel at all; too-big answers then say 576 and the outer packets
/// fragment.
pub const MIN_INNER_MTU: u16 = 576;

/// The smallest MTU an IPv4 link must support (RFC 791); a TUN MTU below it is useless.
const MIN_IPV4_MTU: u16 = 68;

/// The byte offsets of the header fields.
const FLAGS: usize = 1;
const RESERVED: std::ops::Range<usize> = 2..4;
const SESSION_ID: std::ops::Range<usize> = 4..12;
const COUNTER: std::ops::Range<usize> = 12..20;

/// The bytes the underlay adds in front of a datagram: its IP and UDP headers.
pub const fn underlay_headers(underlay: super::inner::IpFamily) -> u16 {
    // Small constants (28, 48): the casts cannot truncate.
    match underlay {
        super::inner::IpFamily::V4 => IPV4_UDP_HEADERS as u16,
        super::inner::IpFamily::V6 => IPV6_UDP_HEADERS as u16,
    }
}

/// [`tun_mtu_for`] over an underlay of either family: an IPv6 underlay costs 20 bytes more.
pub const fn tun_mtu_over(underlay_mtu: u16, underlay: super::inner::IpFamily) -> Option<u16> {
    match underlay {
        super::inner::IpFamily::V4 => tun_mtu_for(underlay_mtu),
        // The difference is a small constant (20), so the cast cannot truncate.
        super::inner::IpFamily::V6 => match underlay_mtu.checked_sub((IPV6_UDP_HEADERS - IPV4_UDP_HEADERS) as u16) {
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

/// A flag of byte 1, for Data only: the inner TCP segment's checksum is partial (see the
/// module's documentation).
pub const FLAG_CSUM_PARTIAL: u8 = 0x01;

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
    /// Client to gateway, sealed: a path MTU probe ([`ProbeBody`] + padding).
    Probe = 4,
    /// Gateway to client, sealed: the answer to a probe ([`ProbeAckBody`] + padding).
    ProbeAck = 5,
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
            4 => Some(Self::Probe),
            5 => Some(Self::ProbeAck),
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
    /// A reserved byte is not zero, or a flag is set that the type does not have.
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
    /// Data only: [`FLAG_CSUM_PARTIAL`].
    pub csum_partial: bool,
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
        out[FLAGS] = if self.csum_partial { FLAG_CSUM_PARTIAL } else { 0 };
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
    let flags = head[FLAGS];
    let known = if msg_type == MsgType::Data { FLAG_CSUM_PARTIAL } else { 0 };
    if flags & !known != 0 || head[RESERVED].iter().any(|&b| b != 0) {
        return Err(WireError::BadReserved);
    }
    let len = datagram.len();
    match msg_type {
        MsgType::Data if len < OVERHEAD => return Err(WireError::Truncated),
        MsgType::Keepalive if len < OVERHEAD => return Err(WireError::Truncated),
        MsgType::Keepalive if len > OVERHEAD => return Err(WireError::BadLength),
        MsgType::UnknownSession if len > HEADER_LEN => return Err(WireError::BadLength),
        MsgType::Probe | MsgType::ProbeAck if len < MIN_PROBE_LEN => return Err(WireError::Truncated),
        MsgType::Probe | MsgType::ProbeAck if len > MAX_PROBE_LEN => return Err(WireError::BadLength),
        _ => {}
    }
    Ok(Header {
        msg_type,
        csum_partial: flags & FLAG_CSUM_PARTIAL != 0,
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
    Header { msg_type: MsgType::UnknownSession, csum_partial: false, session_id, counter: echoed_counter }.to_bytes()
}

/// Bytes of a probe's or an ack's body before its padding.
pub const PROBE_BODY_LEN: usize = 12;

/// The shortest probe or ack datagram: header, body, tag.
pub const MIN_PROBE_LEN: usize = OVERHEAD + PROBE_BODY_LEN;

/// The longest probe or ack datagram: a jumbo frame's worth. Bounds what a session can make the
/// gateway send, whatever it asks.
pub const MAX_PROBE_LEN: usize = 9000;

/// Which direction a probe tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Client to gateway: the probe itself is padded to the size under test.
    Up,
    /// Gateway to client: the ack is padded to the size under test.
    Down,
}

impl ProbeKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Up => 1,
            Self::Down => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            1 => Ok(Self::Up),
            2 => Ok(Self::Down),
            // A kind this version does not know is, to it, a message type it does not know.
            _ => Err(WireError::UnknownType),
        }
    }
}

/// The body of a [`MsgType::Probe`] payload (the padding behind it is not part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeBody {
    pub id: u32,
    pub kind: ProbeKind,
    /// The datagram length the ack must have (0: as short as it can be).
    pub ack_len: u16,
    /// The largest datagram length that fits the path from the gateway to the client (its
    /// confirmed size, or its link's while nothing says the path is smaller); 0: unknown (the
    /// gateway's own link decides).
    pub down_ok: u16,
}

/// The body of a [`MsgType::ProbeAck`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeAckBody {
    pub id: u32,
    pub kind: ProbeKind,
    /// The length of the probe datagram as the gateway received it.
    pub probe_len: u16,
}

fn body(payload: &[u8]) -> Result<&[u8; PROBE_BODY_LEN], WireError> {
    payload.first_chunk::<PROBE_BODY_LEN>().ok_or(WireError::Truncated)
}

impl ProbeBody {
    /// Parses an opened probe's payload (body and padding). Never panics.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let b = body(payload)?;
        if b[5] != 0 || b[10] != 0 || b[11] != 0 {
            return Err(WireError::BadReserved);
        }
        Ok(Self {
            id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            kind: ProbeKind::from_byte(b[4])?,
            ack_len: u16::from_be_bytes([b[6], b[7]]),
            down_ok: u16::from_be_bytes([b[8], b[9]]),
        })
    }

    /// Writes the body and zero padding into `payload` (all of it: its length is the padded
    /// payload's). `Truncated` if it cannot hold the body.
    pub fn write(&self, payload: &mut [u8]) -> Result<(), WireError> {
        let b = payload.first_chunk_mut::<PROBE_BODY_LEN>().ok_or(WireError::Truncated)?;
        b[0..4].copy_from_slice(&self.id.to_be_bytes());
        b[4] = self.kind.to_byte();
        b[5] = 0;
        b[6..8].copy_from_slice(&self.ack_len.to_be_bytes());
        b[8..10].copy_from_slice(&self.down_ok.to_be_bytes());
        b[10..12].fill(0);
        payload[PROBE_BODY_LEN..].fill(0);
        Ok(())
    }
}

impl ProbeAckBody {
    /// Parses an opened ack's payload (body and padding). Never panics.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let b = body(payload)?;
        if b[5] != 0 || b[8..12].iter().any(|&x| x != 0) {
            return Err(WireError::BadReserved);
        }
        Ok(Self {
            id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            kind: ProbeKind::from_byte(b[4])?,
            probe_len: u16::from_be_bytes([b[6], b[7]]),
        })
    }

    /// Writes the body and zero padding into `payload` (all of it).
    pub fn write(&self, payload: &mut [u8]) -> Result<(), WireError> {
        let b = payload.first_chunk_mut::<PROBE_BODY_LEN>().ok_or(WireError::Truncated)?;
        b[0..4].copy_from_slice(&self.id.to_be_bytes());
        b[4] = self.kind.to_byte();
        b[5] = 0;
        b[6..8].copy_from_slice(&self.probe_len.to_be_bytes());
        b[8..12].fill(0);
        payload[PROBE_BODY_LEN..].fill(0);
        Ok(())
    }
}

/// The length of the ack the gateway sends for `probe`: what it asked for, within
/// [`MIN_PROBE_LEN`]..=[`MAX_PROBE_LEN`] (an up probe's ack is the shortest).
pub fn ack_len_for(probe: &ProbeBody) -> usize {
    match probe.kind {
        ProbeKind::Up => MIN_PROBE_LEN,
        ProbeKind::Down => usize::from(probe.ack_len).clamp(MIN_PROBE_LEN, MAX_PROBE_LEN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_len(msg_type: MsgType, payload: usize) -> Vec<u8> {
        let mut d = vec![0u8; HEADER_LEN + payload + TAG_LEN];
        d[..HEADER_LEN].copy_from_slice(
            &Header {
                msg_type,
                csum_partial: false,
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
            &[0x11, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(MsgType::Keepalive.first_byte(), 0x12);
        assert_eq!(MsgType::UnknownSession.first_byte(), 0x13);
    }

    #[test]
    fn round_trips_every_type() {
        for (t, payload) in [(MsgType::Data, 100), (MsgType::Data, 0), (MsgType::Keepalive, 0)] {
            let d = sealed_len(t, payload);
            let h = parse_header(&d).expect("valid");
            assert_eq!(h.msg_type, t);
            assert_eq!(h.session_id, SessionId(0x0102_0304_0506_0708));
            assert_eq!(h.counter, 0x1112_1314_1516_1718);
        }
        let h = parse_header(&unknown_session_notice(SessionId(42), 7)).expect("valid notice");
        assert_eq!(
            h,
            Header { msg_type: MsgType::UnknownSession, csum_partial: false, session_id: SessionId(42), counter: 7 }
        );
    }

    #[test]
    fn the_partial_checksum_flag_is_bit_0_of_byte_1_and_only_data_has_it() {
        let mut d = sealed_len(MsgType::Data, 4);
        assert!(!parse_header(&d).expect("plain data").csum_partial);
        d[1] = FLAG_CSUM_PARTIAL;
        let h = parse_header(&d).expect("flagged data");
        assert!(h.csum_partial);
        assert_eq!(h.to_bytes()[..], d[..HEADER_LEN], "written back as it was read");
        // Any other bit of the flags byte is still reserved.
        for bit in 1..8 {
            d[1] = FLAG_CSUM_PARTIAL | 1 << bit;
            assert_eq!(parse_header(&d), Err(WireError::BadReserved), "bit {bit}");
        }
        for t in [MsgType::Keepalive, MsgType::Probe, MsgType::ProbeAck] {
            let payload = if matches!(t, MsgType::Keepalive) { 0 } else { MIN_PROBE_LEN - OVERHEAD };
            let mut d = sealed_len(t, payload);
            d[1] = FLAG_CSUM_PARTIAL;
            assert_eq!(parse_header(&d), Err(WireError::BadReserved), "{t:?}");
        }
        let mut notice = unknown_session_notice(SessionId(1), 0);
        notice[1] = FLAG_CSUM_PARTIAL;
        assert_eq!(parse_header(&notice), Err(WireError::BadReserved));
    }

    #[test]
    fn refuses_each_malformation_with_its_own_error() {
        let good = sealed_len(MsgType::Data, 4);
        assert_eq!(parse_header(&[]), Err(WireError::Truncated));
        assert_eq!(parse_header(&good[..HEADER_LEN - 1]), Err(WireError::Truncated));
        // A Data header without room for the tag.
        assert_eq!(parse_header(&good[..OVERHEAD - 1]), Err(WireError::Truncated));

        let mut d = good.clone();
        d[0] = 0x21;
        assert_eq!(parse_header(&d), Err(WireError::BadVersion));
        d[0] = 0x01;
        assert_eq!(parse_header(&d), Err(WireError::BadVersion));
        for nibble in [0u8, 6, 0xf] {
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
    fn probe_bodies_round_trip_and_refuse_garbage() {
        let p = ProbeBody { id: 0xdead_beef, kind: ProbeKind::Down, ack_len: 1400, down_ok: 1372 };
        let mut payload = [0xffu8; 40];
        p.write(&mut payload).expect("fits");
        assert!(payload[PROBE_BODY_LEN..].iter().all(|&b| b == 0), "padding is zeros");
        assert_eq!(ProbeBody::parse(&payload), Ok(p));
        assert_eq!(ack_len_for(&p), 1400);
        assert_eq!(ack_len_for(&ProbeBody { ack_len: 60000, ..p }), MAX_PROBE_LEN);
        assert_eq!(ack_len_for(&ProbeBody { ack_len: 0, ..p }), MIN_PROBE_LEN);
        assert_eq!(ack_len_for(&ProbeBody { kind: ProbeKind::Up, ..p }), MIN_PROBE_LEN);
        let a = ProbeAckBody { id: 7, kind: ProbeKind::Up, probe_len: 1452 };
        let mut ack = [0u8; PROBE_BODY_LEN];
        a.write(&mut ack).expect("fits");
        assert_eq!(ProbeAckBody::parse(&ack), Ok(a));

        assert_eq!(ProbeBody::parse(&payload[..PROBE_BODY_LEN - 1]), Err(WireError::Truncated));
        assert_eq!(ProbeAckBody::parse(&[]), Err(WireError::Truncated));
        assert_eq!(p.write(&mut [0u8; 3]), Err(WireError::Truncated));
        let mut bad = payload;
        bad[4] = 9;
        assert_eq!(ProbeBody::parse(&bad), Err(WireError::UnknownType));
        let mut bad = payload;
        bad[11] = 1;
        assert_eq!(ProbeBody::parse(&bad), Err(WireError::BadReserved));
        let mut bad = ack;
        bad[9] = 1;
        assert_eq!(ProbeAckBody::parse(&bad), Err(WireError::BadReserved));

        // Header: a probe shorter than its body, or longer than the bound, never parses.
        for t in [MsgType::Probe, MsgType::ProbeAck] {
            assert_eq!(parse_header(&sealed_len(t, PROBE_BODY_LEN)).map(|h| h.msg_type), Ok(t));
            assert_eq!(parse_header(&sealed_len(t, PROBE_BODY_LEN - 1)), Err(WireError::Truncated));
            assert_eq!(parse_header(&sealed_len(t, MAX_PROBE_LEN)), Err(WireError::BadLength));
        }
        assert_eq!(MsgType::Probe.first_byte(), 0x14);
        assert_eq!(MsgType::ProbeAck.first_byte(), 0x15);
    }

    proptest::proptest! {
        /// Any bytes as an opened probe or ack payload: an error or a body that writes back to
        /// the same bytes (zero padding included); never a panic.
        #[test]
        fn probe_bodies_parse_any_bytes_and_round_trip(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(p) = ProbeBody::parse(&bytes) {
                let mut again = vec![0xaa; bytes.len()];
                p.write(&mut again).expect("room");
                proptest::prop_assert_eq!(&again[..PROBE_BODY_LEN], &bytes[..PROBE_BODY_LEN]);
                proptest::prop_assert_eq!(ProbeBody::parse(&again), Ok(p));
            }
            if let Ok(a) = ProbeAckBody::parse(&bytes) {
                let mut again = vec![0xaa; bytes.len()];
                a.write(&mut again).expect("room");
                proptest::prop_assert_eq!(&again[..PROBE_BODY_LEN], &bytes[..PROBE_BODY_LEN]);
                proptest::prop_assert_eq!(ProbeAckBody::parse(&again), Ok(a));
            }
        }
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

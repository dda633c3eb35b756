//! The data plane's receive path: `wire::parse_header`, `SessionCipher::open` and
//! `SessionCipher::open_checked` with a `ReplayWindow`.
//!
//! Every datagram a UDP socket hands us is attacker-chosen, so besides "never panics" the
//! harnesses check what the module docs promise:
//! - a parsed header is exactly the documented layout (an independent reading of the format);
//! - an opened datagram is authentic: sealing its plaintext again gives back the very bytes
//!   received, and neither the other direction nor another key opens it;
//! - `open_checked` agrees, datagram by datagram, with a plain-set model of the replay window
//!   (every counter accepted once, refused `WINDOW` or more behind the highest), and a datagram
//!   that fails its tag never moves the window.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use holdfast::sansio::replay::{ReplayError, ReplayWindow, WINDOW};
use holdfast::sansio::seal::{Direction, MAX_COUNTER, OpenError, Opened, SealError, SealedKind, SessionCipher};
use holdfast::sansio::wire::{self, HEADER_LEN, Header, MsgType, OVERHEAD, TAG_LEN, WireError};
use holdfast::snapshot::{SessionId, SessionKey};

use super::input::Reader;

/// The session key every datagram target and seed uses. Fixed, so that sealed seeds stay
/// authentic and libFuzzer can mutate them around a datagram that opens.
pub const FUZZ_KEY: [u8; 32] = *b"holdfast fuzz key, not a secret!";
/// The session id of the seeds ("Holdfast" in ASCII).
pub const FUZZ_SESSION: SessionId = SessionId(0x486f_6c64_6661_7374);
/// A second key: nothing sealed under [`FUZZ_KEY`] may open under it.
const OTHER_KEY: [u8; 32] = [0xa5; 32];

/// Largest burst of one `Burst` op; keeps a single input's run time bounded.
const MAX_BURST: u64 = 64;

/// The ciphers, expanded once per process (key expansion is the costly part of a cipher).
pub fn cipher() -> &'static SessionCipher {
    static C: OnceLock<SessionCipher> = OnceLock::new();
    C.get_or_init(|| SessionCipher::new(&SessionKey::new(FUZZ_KEY)))
}

fn other_cipher() -> &'static SessionCipher {
    static C: OnceLock<SessionCipher> = OnceLock::new();
    C.get_or_init(|| SessionCipher::new(&SessionKey::new(OTHER_KEY)))
}

fn flip(dir: Direction) -> Direction {
    match dir {
        Direction::ClientToGateway => Direction::GatewayToClient,
        Direction::GatewayToClient => Direction::ClientToGateway,
    }
}

fn direction(bit: bool) -> Direction {
    if bit { Direction::GatewayToClient } else { Direction::ClientToGateway }
}

/// Seals `payload` (a keepalive if `kind` says so) into a fresh datagram.
pub fn seal(
    dir: Direction,
    kind: SealedKind,
    session: SessionId,
    counter: u64,
    payload: &[u8],
) -> Result<Vec<u8>, SealError> {
    let c = cipher();
    let mut buf = vec![0u8; payload.len() + OVERHEAD];
    let n = match kind {
        SealedKind::Data => {
            buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
            c.seal_data(dir, session, counter, &mut buf, payload.len())?
        }
        SealedKind::Keepalive => c.seal_keepalive(dir, session, counter, &mut buf)?,
        SealedKind::Probe | SealedKind::ProbeAck => {
            buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
            let ack = kind == SealedKind::ProbeAck;
            c.seal_probe(dir, ack, session, counter, &mut buf, payload.len())?
        }
    };
    buf.truncate(n);
    Ok(buf)
}

/// The header format as the `wire` module documents it, read independently of `parse_header`.
fn documented_header(d: &[u8]) -> Result<Header, WireError> {
    if d.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    if d[0] >> 4 != 1 {
        return Err(WireError::BadVersion);
    }
    let msg_type = match d[0] & 0x0f {
        1 => MsgType::Data,
        2 => MsgType::Keepalive,
        3 => MsgType::UnknownSession,
        4 => MsgType::Probe,
        5 => MsgType::ProbeAck,
        _ => return Err(WireError::UnknownType),
    };
    // Byte 1: flags, of which Data has one (bit 0, a partial inner checksum); 2 and 3 reserved.
    let flag_ok = d[1] == 0 || (d[1] == 1 && msg_type == MsgType::Data);
    if !flag_ok || d[2..4] != [0, 0] {
        return Err(WireError::BadReserved);
    }
    let sealed_len = HEADER_LEN + TAG_LEN;
    match msg_type {
        MsgType::Data | MsgType::Keepalive if d.len() < sealed_len => Err(WireError::Truncated)?,
        MsgType::Keepalive if d.len() != sealed_len => Err(WireError::BadLength)?,
        MsgType::UnknownSession if d.len() != HEADER_LEN => Err(WireError::BadLength)?,
        // A probe or ack: header, a 12-byte body and the tag at least, 9000 bytes at most.
        MsgType::Probe | MsgType::ProbeAck if d.len() < sealed_len + 12 => Err(WireError::Truncated)?,
        MsgType::Probe | MsgType::ProbeAck if d.len() > 9000 => Err(WireError::BadLength)?,
        _ => {}
    }
    let be = |r: std::ops::Range<usize>| d[r].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
    Ok(Header { msg_type, csum_partial: d[1] == 1, session_id: SessionId(be(4..12)), counter: be(12..20) })
}

/// Target `datagram_parse`: any bytes as a received datagram.
pub fn datagram_parse(data: &[u8]) {
    let parsed = wire::parse_header(data);
    assert_eq!(parsed, documented_header(data), "parse_header disagrees with the documented format");
    if let Ok(h) = parsed {
        // Parsing loses nothing: the reserved bytes are zero, so the header is its fields.
        assert_eq!(h.to_bytes()[..], data[..HEADER_LEN]);
        if h.msg_type == MsgType::UnknownSession {
            assert_eq!(wire::unknown_session_notice(h.session_id, h.counter)[..], *data);
        }
    }
}

/// Checks a successful open: the payload range is the documented one and the datagram is
/// authentic (sealing the plaintext again reproduces it; no other direction or key opens it).
fn assert_authentic(dir: Direction, original: &[u8], opened: &Opened, plain_buf: &[u8]) {
    let header = wire::parse_header(original).expect("an opened datagram parses");
    assert_eq!(opened.payload, HEADER_LEN..original.len() - TAG_LEN);
    assert_eq!((opened.session_id, opened.counter), (header.session_id, header.counter));
    let kind = match header.msg_type {
        MsgType::Data => SealedKind::Data,
        MsgType::Keepalive => SealedKind::Keepalive,
        MsgType::Probe => SealedKind::Probe,
        MsgType::ProbeAck => SealedKind::ProbeAck,
        MsgType::UnknownSession => panic!("a notice opened as {opened:?}"),
    };
    assert_eq!(opened.kind, kind);
    let plain = &plain_buf[opened.payload.clone()];
    let again = seal(dir, kind, opened.session_id, opened.counter, plain)
        .expect("an authentic datagram's counter is one a sender may seal");
    assert_eq!(again, original, "open accepted bytes that are not what sealing produces");
    for (c, d) in [(cipher(), flip(dir)), (other_cipher(), dir)] {
        let mut copy = original.to_vec();
        assert_eq!(c.open(d, &mut copy), Err(OpenError::Decrypt), "opened under another direction or key");
    }
}

/// The replay window as a plain set: what `ReplayWindow` must behave like.
#[derive(Debug, Default)]
struct WindowModel {
    top: Option<u64>,
    seen: BTreeSet<u64>,
}

impl WindowModel {
    fn check(&self, c: u64) -> Result<(), ReplayError> {
        match self.top {
            None => Ok(()),
            Some(top) if c > top => Ok(()),
            Some(top) if top - c >= WINDOW => Err(ReplayError::TooOld),
            Some(_) if self.seen.contains(&c) => Err(ReplayError::Replay),
            Some(_) => Ok(()),
        }
    }

    fn accept(&mut self, c: u64) {
        self.seen.insert(c);
        self.top = self.top.max(Some(c));
    }
}

/// What the harness knows about a datagram it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known<'a> {
    /// Sealed by us under the right key and direction: opens unless the window refuses it.
    Authentic(SealedKind, &'a [u8]),
    /// Tampered with, or sealed for the other direction or under another key: never opens.
    Forged,
    /// Raw fuzz bytes: open or not, the checks of `assert_authentic` decide.
    Unknown,
}

/// One receiving side: a window and its model.
#[derive(Debug, Default)]
struct Receiver {
    window: ReplayWindow,
    model: WindowModel,
}

impl Receiver {
    /// Delivers `original` to `open_checked` and checks the outcome against the model.
    fn deliver(&mut self, dir: Direction, original: &[u8], known: Known<'_>) {
        let mut buf = original.to_vec();
        let got = cipher().open_checked(dir, &mut buf, &mut self.window);
        // open_checked's documented order: parse, cheap window check, tag, accept.
        let refused = match wire::parse_header(original) {
            Err(e) => Some(OpenError::Malformed(e)),
            Ok(h) => match self.model.check(h.counter) {
                Err(r) => Some(OpenError::Replayed(r)),
                Ok(()) if h.msg_type == MsgType::UnknownSession => Some(OpenError::NotSealed),
                Ok(()) => None,
            },
        };
        match (refused, known, &got) {
            (Some(want), _, _) => assert_eq!(got, Err(want)),
            (None, Known::Forged, _) => assert_eq!(got, Err(OpenError::Decrypt)),
            (None, Known::Authentic(kind, payload), Ok(o)) => {
                assert_eq!((o.kind, &buf[o.payload.clone()]), (kind, payload));
                assert_eq!(o.session_id, FUZZ_SESSION);
            }
            (None, Known::Authentic(..), Err(e)) => panic!("authentic datagram refused: {e:?}"),
            (None, Known::Unknown, Err(e)) => assert_eq!(*e, OpenError::Decrypt),
            // Raw bytes that opened: prove they are authentic. (For datagrams we sealed that is
            // known already, and repeating the proof would triple the cost of a burst.)
            (None, Known::Unknown, Ok(o)) => assert_authentic(dir, original, o, &buf),
        }
        if let Ok(o) = &got {
            self.model.accept(o.counter);
        }
        assert_eq!(self.window.highest(), self.model.top, "window top moved wrongly");
    }
}

/// Target `datagram_open`: byte 0 = flags (bit 0: gateway-to-client, bit 1: the window already
/// accepted the counter that follows as 8 bytes), then the received datagram.
pub fn datagram_open(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let dir = direction(flags & 1 != 0);
    let mut rx = Receiver::default();
    if flags & 2 != 0 {
        let c = r.u64();
        rx.window.accept(c).expect("an empty window accepts any counter");
        rx.model.accept(c);
    }
    let datagram = r.rest();

    let mut buf = datagram.to_vec();
    match cipher().open(dir, &mut buf) {
        Ok(o) => assert_authentic(dir, datagram, &o, &buf),
        Err(e) => {
            let want = match wire::parse_header(datagram) {
                Err(w) => OpenError::Malformed(w),
                Ok(h) if h.msg_type == MsgType::UnknownSession => OpenError::NotSealed,
                Ok(_) => OpenError::Decrypt,
            };
            assert_eq!(e, want);
        }
    }
    rx.deliver(dir, datagram, Known::Unknown);
    // The same bytes again are a replay if they opened, and the same refusal if not.
    rx.deliver(dir, datagram, Known::Unknown);
}

/// Reads a counter relative to the receiver's current top, so short inputs reach the window's
/// edges (just ahead, just behind, around `top - WINDOW`) and not only random 64-bit values.
fn counter(r: &mut Reader<'_>, top: Option<u64>) -> u64 {
    let top = top.unwrap_or(0);
    match r.u8() % 4 {
        0 => r.u64(),
        1 => top.saturating_add(u64::from(r.u16())),
        2 => top.saturating_sub(u64::from(r.u16())),
        _ => top.saturating_sub(WINDOW).saturating_add(u64::from(r.u16())).saturating_sub(0x8000),
    }
}

/// Op codes of `datagram_sequence` (the low 2 bits of an op's first byte).
pub mod op {
    /// flags (bit 0 g->c, bit 1 keepalive, bit 2 deliver to the other direction, bit 3 seal
    /// under another key), counter, payload, tamper position (u16) and xor mask (u8, 0 = none).
    pub const SEAL: u8 = 0;
    /// index (u8) of an earlier sealed datagram to deliver again, unchanged.
    pub const REPLAY: u8 = 1;
    /// flags (bit 0 g->c), raw bytes delivered as they are.
    pub const RAW: u8 = 2;
    /// flags (bit 0 g->c), first counter, count (u8): consecutive counters delivered newest first.
    pub const BURST: u8 = 3;
}

/// A datagram sealed during the run, for `REPLAY`.
struct Sent {
    dir: Direction,
    bytes: Vec<u8>,
    kind: SealedKind,
    payload: Vec<u8>,
}

/// Target `datagram_sequence`: a sequence of sealed, tampered, replayed, reordered and raw
/// datagrams through `open_checked`, one window per direction, checked against the model.
pub fn datagram_sequence(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut rx = [Receiver::default(), Receiver::default()];
    let idx = |d: Direction| usize::from(d == Direction::GatewayToClient);
    let mut sent: Vec<Sent> = Vec::new();
    while !r.is_empty() {
        match r.u8() & 3 {
            op::SEAL => {
                let flags = r.u8();
                let dir = direction(flags & 1 != 0);
                let kind = if flags & 2 != 0 { SealedKind::Keepalive } else { SealedKind::Data };
                let c = counter(&mut r, rx[idx(dir)].model.top);
                let payload = r.bytes();
                let (pos, mask) = (usize::from(r.u16()), r.u8());
                let payload = if kind == SealedKind::Keepalive { &[][..] } else { payload };
                let mut bytes = match seal(dir, kind, FUZZ_SESSION, c, payload) {
                    Ok(b) => b,
                    Err(e) => {
                        assert!(c > MAX_COUNTER && e == SealError::CounterExhausted, "{e:?} at {c}");
                        continue;
                    }
                };
                let wrong_key = flags & 8 != 0;
                if wrong_key {
                    // Same plaintext, header and nonce, another key: only the tag differs.
                    let mut other = vec![0u8; bytes.len()];
                    other[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
                    let n = match kind {
                        SealedKind::Data => other_cipher().seal_data(dir, FUZZ_SESSION, c, &mut other, payload.len()),
                        SealedKind::Keepalive => other_cipher().seal_keepalive(dir, FUZZ_SESSION, c, &mut other),
                        SealedKind::Probe | SealedKind::ProbeAck => other_cipher().seal_probe(
                            dir,
                            kind == SealedKind::ProbeAck,
                            FUZZ_SESSION,
                            c,
                            &mut other,
                            payload.len(),
                        ),
                    }
                    .expect("sealable under one key, sealable under another");
                    other.truncate(n);
                    bytes = other;
                }
                let tampered = mask != 0;
                if tampered {
                    let at = pos % bytes.len();
                    bytes[at] ^= mask;
                }
                let to = if flags & 4 != 0 { flip(dir) } else { dir };
                let known =
                    if tampered || wrong_key || to != dir { Known::Forged } else { Known::Authentic(kind, payload) };
                rx[idx(to)].deliver(to, &bytes, known);
                if !tampered && !wrong_key {
                    sent.push(Sent { dir, bytes, kind, payload: payload.to_vec() });
                }
            }
            op::REPLAY => {
                let i = usize::from(r.u8());
                if let Some(s) = sent.get(i % sent.len().max(1)) {
                    rx[idx(s.dir)].deliver(s.dir, &s.bytes, Known::Authentic(s.kind, &s.payload));
                }
            }
            op::RAW => {
                let dir = direction(r.u8() & 1 != 0);
                let bytes = r.bytes();
                rx[idx(dir)].deliver(dir, bytes, Known::Unknown);
            }
            _ => {
                let dir = direction(r.u8() & 1 != 0);
                let first = counter(&mut r, rx[idx(dir)].model.top);
                let n = u64::from(r.u8()) % MAX_BURST + 1;
                let last = first.saturating_add(n - 1).min(MAX_COUNTER);
                for c in (first..=last).rev() {
                    let payload = c.to_be_bytes();
                    let bytes = seal(dir, SealedKind::Data, FUZZ_SESSION, c, &payload)
                        .expect("counters up to MAX_COUNTER seal");
                    rx[idx(dir)].deliver(dir, &bytes, Known::Authentic(SealedKind::Data, &payload));
                }
            }
        }
    }
}

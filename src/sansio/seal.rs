//! Sealing and opening datagrams with AES-256-GCM, in place, in buffers the caller owns.
//!
//! Designed for hot loops that reuse one buffer per loop:
//! - the sender reads the inner packet straight into `buf[HEADER_LEN..]`, then calls
//!   [`SessionCipher::seal_data`], which writes the header in front and the tag behind and
//!   returns the datagram length;
//! - the receiver hands the received bytes to [`SessionCipher::open`], which decrypts them where
//!   they lie and returns the range of the inner packet.
//!
//! Nothing here allocates, logs or panics on any input; failures are small `Copy` enums meant to
//! be counted (see [`OpenError::index`]).
//!
//! # Nonces
//! The 96-bit nonce is `direction tag (4 bytes) || counter (8 bytes, big-endian)`. Both
//! directions of a session share one key, so the direction tag is what keeps the client's
//! counter 5 and the gateway's counter 5 from being the same nonce. Within a direction the
//! sender's [`TxCounter`] never repeats and never wraps, and `u64::MAX` is never sealed.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use super::aead::{AeadKey, Backend};
use super::replay::{ReplayError, ReplayWindow};
use super::session::{KeyFingerprint, SessionId, SessionKey};
use super::wire::{self, HEADER_LEN, Header, MsgType, OVERHEAD, TAG_LEN, WireError};

/// Which way a datagram travels. Part of the nonce, so the two directions of one session never
/// share a nonce under their shared key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to gateway: the client seals, the gateway opens.
    ClientToGateway,
    /// Gateway to client: the gateway seals, the client opens.
    GatewayToClient,
}

impl Direction {
    /// The 4-byte tag that starts the nonce. ASCII, so it is recognisable in a debugger.
    const fn tag(self) -> [u8; 4] {
        match self {
            Self::ClientToGateway => *b"c->g",
            Self::GatewayToClient => *b"g->c",
        }
    }

    /// The 96-bit AES-GCM nonce for `counter` in this direction.
    pub fn nonce(self, counter: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.tag());
        n[4..].copy_from_slice(&counter.to_be_bytes());
        n
    }
}

/// The highest counter that may be sealed. `u64::MAX` is kept back so that [`TxCounter`] can
/// refuse instead of wrapping.
pub const MAX_COUNTER: u64 = u64::MAX - 1;

/// Why a datagram could not be sealed.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SealError {
    /// The session's counter space is used up; the session must be re-keyed (re-authenticated).
    #[error("counter exhausted: the session needs a new key")]
    CounterExhausted,
    /// `buf` cannot hold header + payload + tag.
    #[error("buffer too small for header, payload and tag")]
    BufferTooSmall,
}

/// Why a received datagram was dropped: a small `Copy` value the shell counts (one counter per
/// [`OpenError::index`]), never logs per packet.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenError {
    /// The header or length is malformed; nothing was decrypted.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// A well-formed datagram of a type that carries no tag (an unknown-session notice), so
    /// there is nothing to open.
    #[error("message type is not sealed")]
    NotSealed,
    /// Tag verification failed: wrong key, wrong direction, or tampered bytes.
    #[error("authentication failed")]
    Decrypt,
    /// Authentic, but refused by the replay window.
    #[error(transparent)]
    Replayed(#[from] ReplayError),
}

impl OpenError {
    /// Every value, in [`OpenError::index`] order (for building a counter array or its labels).
    pub const ALL: [Self; 9] = [
        Self::Malformed(WireError::Truncated),
        Self::Malformed(WireError::BadVersion),
        Self::Malformed(WireError::UnknownType),
        Self::Malformed(WireError::BadReserved),
        Self::Malformed(WireError::BadLength),
        Self::NotSealed,
        Self::Decrypt,
        Self::Replayed(ReplayError::Replay),
        Self::Replayed(ReplayError::TooOld),
    ];

    /// A dense index in `0..ALL.len()`, for a per-reason drop counter array.
    pub const fn index(self) -> usize {
        match self {
            Self::Malformed(WireError::Truncated) => 0,
            Self::Malformed(WireError::BadVersion) => 1,
            Self::Malformed(WireError::UnknownType) => 2,
            Self::Malformed(WireError::BadReserved) => 3,
            Self::Malformed(WireError::BadLength) => 4,
            Self::NotSealed => 5,
            Self::Decrypt => 6,
            Self::Replayed(ReplayError::Replay) => 7,
            Self::Replayed(ReplayError::TooOld) => 8,
        }
    }

    /// A short stable name, for metrics and the dashboard.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed(WireError::Truncated) => "truncated",
            Self::Malformed(WireError::BadVersion) => "bad_version",
            Self::Malformed(WireError::UnknownType) => "unknown_type",
            Self::Malformed(WireError::BadReserved) => "bad_reserved",
            Self::Malformed(WireError::BadLength) => "bad_length",
            Self::NotSealed => "not_sealed",
            Self::Decrypt => "decrypt",
            Self::Replayed(ReplayError::Replay) => "replay",
            Self::Replayed(ReplayError::TooOld) => "too_old",
        }
    }
}

/// The sealed message types: what [`Opened::kind`] can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SealedKind {
    /// An inner IP packet.
    Data,
    /// An empty keepalive.
    Keepalive,
    /// A path MTU probe (client to gateway): `payload` is a [`wire::ProbeBody`] and padding.
    Probe,
    /// The answer to a probe (gateway to client): a [`wire::ProbeAckBody`] and padding.
    ProbeAck,
}

/// A datagram that opened: authentic, decrypted in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Data or keepalive.
    pub kind: SealedKind,
    /// The session id from the (now authenticated) header.
    pub session_id: SessionId,
    /// The sender's counter, authenticated; feed it to the replay window.
    pub counter: u64,
    /// Where the inner packet lies in the datagram buffer (empty for a keepalive).
    pub payload: Range<usize>,
    /// Data only: the inner TCP segment's checksum is partial ([`wire::FLAG_CSUM_PARTIAL`]);
    /// authenticated with the header.
    pub csum_partial: bool,
}

/// The AES-256-GCM state of one session: the expanded key schedule and GHASH key.
///
/// Build it once per session (key expansion is the expensive part) and share it by reference:
/// `seal` and `open` take `&self`, and the type is `Send + Sync`.
///
/// The AES-256-GCM itself is ring's or AWS-LC's, whichever is faster on this CPU
/// ([`Backend::for_this_cpu`]; README, "AES-GCM crate"). Either wipes the key schedule when the
/// cipher is dropped.
pub struct SessionCipher {
    key: AeadKey,
    /// Kept so that `Debug` can name the key without exposing it.
    fingerprint: KeyFingerprint,
}

impl std::fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionCipher(fp:{})", self.fingerprint)
    }
}

impl SessionCipher {
    /// Expands `key` (once per session: this is the costly part) for the backend that is faster
    /// on this CPU. The key bytes are borrowed in place, not copied to a temporary that would
    /// outlive the call unwiped.
    pub fn new(key: &SessionKey) -> Self {
        Self::with_backend(key, Backend::for_this_cpu())
    }

    /// [`SessionCipher::new`] on a given backend (for the tests and benches that run each; the
    /// data plane takes [`SessionCipher::new`]'s choice).
    pub fn with_backend(key: &SessionKey, backend: Backend) -> Self {
        Self { key: AeadKey::new(backend, key.expose()), fingerprint: key.fingerprint() }
    }

    /// Which library's AES-256-GCM this cipher runs.
    pub fn backend(&self) -> Backend {
        self.key.backend()
    }

    /// Seals the inner packet already placed at `buf[HEADER_LEN..HEADER_LEN + payload_len]`:
    /// writes the header in front, encrypts in place, writes the tag behind. Returns the length
    /// of the datagram, which is `buf[..len]`.
    pub fn seal_data(
        &self,
        dir: Direction,
        session_id: SessionId,
        counter: u64,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, SealError> {
        self.seal(dir, MsgType::Data, false, session_id, counter, buf, payload_len)
    }

    /// [`SessionCipher::seal_data`] with [`wire::FLAG_CSUM_PARTIAL`] set as `csum_partial` says:
    /// for a TCP segment whose checksum holds the pseudo-header's sum only, sealed for a peer
    /// that takes such segments.
    pub fn seal_data_with(
        &self,
        dir: Direction,
        session_id: SessionId,
        counter: u64,
        buf: &mut [u8],
        payload_len: usize,
        csum_partial: bool,
    ) -> Result<usize, SealError> {
        self.seal(dir, MsgType::Data, csum_partial, session_id, counter, buf, payload_len)
    }

    /// Seals a keepalive (empty payload) into `buf` and returns its length, [`OVERHEAD`].
    /// It uses a counter like any datagram, so it is replay-protected too.
    pub fn seal_keepalive(
        &self,
        dir: Direction,
        session_id: SessionId,
        counter: u64,
        buf: &mut [u8],
    ) -> Result<usize, SealError> {
        self.seal(dir, MsgType::Keepalive, false, session_id, counter, buf, 0)
    }

    /// Seals a path MTU probe or ack whose payload (body and padding, see [`wire::ProbeBody`])
    /// is already at `buf[HEADER_LEN..HEADER_LEN + payload_len]`; returns the datagram length.
    pub fn seal_probe(
        &self,
        dir: Direction,
        ack: bool,
        session_id: SessionId,
        counter: u64,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, SealError> {
        let msg_type = if ack { MsgType::ProbeAck } else { MsgType::Probe };
        self.seal(dir, msg_type, false, session_id, counter, buf, payload_len)
    }

    #[allow(clippy::too_many_arguments)]
    fn seal(
        &self,
        dir: Direction,
        msg_type: MsgType,
        csum_partial: bool,
        session_id: SessionId,
        counter: u64,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, SealError> {
        if counter > MAX_COUNTER {
            return Err(SealError::CounterExhausted);
        }
        let total = payload_len.checked_add(OVERHEAD).filter(|&t| t <= buf.len()).ok_or(SealError::BufferTooSmall)?;
        let (head, rest) = buf[..total].split_at_mut(HEADER_LEN);
        let (body, tag_out) = rest.split_at_mut(payload_len);
        head.copy_from_slice(&Header { msg_type, csum_partial, session_id, counter }.to_bytes());
        let tag = self
            .key
            .seal(dir.nonce(counter), head, body)
            // Only fails for plaintexts over 64 GiB; `total` fitting in the buffer and a usize
            // rules that out in practice, and the honest answer if it ever happened is that the
            // buffer (payload) is too large.
            .map_err(|_| SealError::BufferTooSmall)?;
        tag_out.copy_from_slice(&tag);
        Ok(total)
    }

    /// Authenticates and decrypts `datagram` in place (all of it: pass exactly the received
    /// bytes). On success the inner packet is `datagram[opened.payload]`.
    ///
    /// This does not consult a replay window: use [`SessionCipher::open_checked`], or call
    /// [`ReplayWindow::accept`] with `opened.counter` yourself before using the payload. On
    /// failure the buffer's contents are unspecified (the ciphertext is left as it was when the
    /// tag fails, but don't rely on it).
    pub fn open(&self, dir: Direction, datagram: &mut [u8]) -> Result<Opened, OpenError> {
        let header = wire::parse_header(datagram)?;
        let kind = match header.msg_type {
            MsgType::Data => SealedKind::Data,
            MsgType::Keepalive => SealedKind::Keepalive,
            MsgType::Probe => SealedKind::Probe,
            MsgType::ProbeAck => SealedKind::ProbeAck,
            MsgType::UnknownSession => return Err(OpenError::NotSealed),
        };
        // parse_header guarantees len >= OVERHEAD for sealed types; checked anyway so that a
        // future change there can't turn into a panic here.
        let body_end = datagram.len().checked_sub(TAG_LEN).filter(|&e| e >= HEADER_LEN).ok_or(WireError::Truncated)?;
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        // The backend splits the tag off the end of `rest` itself (`rest` is at least TAG_LEN
        // long, checked above) and decrypts the body where it lies.
        self.key.open(dir.nonce(header.counter), head, rest).map_err(|_| OpenError::Decrypt)?;
        Ok(Opened {
            kind,
            session_id: header.session_id,
            counter: header.counter,
            payload: HEADER_LEN..body_end,
            csum_partial: header.csum_partial,
        })
    }

    /// [`SessionCipher::open`] with the replay window applied in the safe order: a cheap check
    /// first (a replayed datagram costs no AES work), the tag verified, and only then the window
    /// updated, so a forged datagram can never advance it.
    ///
    /// Holding a lock on `window` across this call serialises decryption per session and
    /// direction; a shell with several receivers per session can instead call `check`, `open`
    /// and `accept` itself and hold the lock only around `check` and `accept`.
    pub fn open_checked(
        &self,
        dir: Direction,
        datagram: &mut [u8],
        window: &mut ReplayWindow,
    ) -> Result<Opened, OpenError> {
        let header = wire::parse_header(datagram)?;
        window.check(header.counter)?;
        let opened = self.open(dir, datagram)?;
        window.accept(opened.counter)?;
        Ok(opened)
    }
}

/// The send counter of one session and direction, shareable between threads (`&self`).
///
/// Every value it hands out is distinct, so no nonce repeats under the session key even when
/// several loops seal for the same session. It never wraps: once [`MAX_COUNTER`] is handed out,
/// every later call fails with [`SealError::CounterExhausted`].
#[derive(Debug, Default)]
pub struct TxCounter {
    next: AtomicU64,
}

impl TxCounter {
    /// A counter whose first value is 0.
    pub const fn new() -> Self {
        Self::starting_at(0)
    }

    /// A counter whose first value is `first` (for tests of exhaustion, mostly).
    pub const fn starting_at(first: u64) -> Self {
        Self { next: AtomicU64::new(first) }
    }

    /// The next counter to seal with.
    pub fn next(&self) -> Result<u64, SealError> {
        // A CAS loop rather than `fetch_add`, because `fetch_add` would wrap to 0 at the top and
        // hand out a used counter again. Relaxed is enough: uniqueness comes from the atomicity
        // of the read-modify-write on this one location, not from ordering with other memory.
        // (`then`, not `then_some`: the latter would compute `c + 1` at `u64::MAX` too.)
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| (c <= MAX_COUNTER).then(|| c + 1))
            .map_err(|_| SealError::CounterExhausted)
    }

    /// How many counters have been handed out (the next value), for status displays.
    pub fn peek(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: SessionId = SessionId(0xfeed_f00d_dead_beef);

    fn cipher(b: u8) -> SessionCipher {
        SessionCipher::new(&SessionKey::new([b; 32]))
    }

    fn sealed(c: &SessionCipher, dir: Direction, counter: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; payload.len() + OVERHEAD + 7];
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = c.seal_data(dir, SID, counter, &mut buf, payload.len()).expect("seal");
        buf.truncate(n);
        buf
    }

    #[test]
    fn round_trip_in_place() {
        let c = cipher(1);
        let payload = b"an inner ip packet".as_slice();
        let mut d = sealed(&c, Direction::ClientToGateway, 9, payload);
        assert_eq!(d.len(), payload.len() + OVERHEAD);
        assert_ne!(&d[HEADER_LEN..HEADER_LEN + payload.len()], payload);
        let o = c.open(Direction::ClientToGateway, &mut d).expect("open");
        assert_eq!(o.kind, SealedKind::Data);
        assert_eq!(o.session_id, SID);
        assert_eq!(o.counter, 9);
        assert!(!o.csum_partial);
        assert_eq!(&d[o.payload], payload);
    }

    #[test]
    fn the_partial_checksum_flag_is_sealed_with_the_header() {
        let c = cipher(4);
        let payload = b"a tcp segment".as_slice();
        let mut buf = vec![0u8; payload.len() + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = c.seal_data_with(Direction::GatewayToClient, SID, 5, &mut buf, payload.len(), true).expect("seal");
        assert_eq!(buf[1], wire::FLAG_CSUM_PARTIAL);
        let mut d = buf[..n].to_vec();
        let o = c.open(Direction::GatewayToClient, &mut d).expect("open");
        assert!(o.csum_partial);
        assert_eq!(&d[o.payload], payload);
        // Clearing the flag on the way (or setting it on a plain datagram) fails the tag.
        let mut cleared = buf[..n].to_vec();
        cleared[1] = 0;
        assert_eq!(c.open(Direction::GatewayToClient, &mut cleared), Err(OpenError::Decrypt));
        let mut set = sealed(&c, Direction::GatewayToClient, 6, payload);
        set[1] = wire::FLAG_CSUM_PARTIAL;
        assert_eq!(c.open(Direction::GatewayToClient, &mut set), Err(OpenError::Decrypt));
    }

    #[test]
    fn keepalive_is_fixed_size_and_authentic() {
        let c = cipher(2);
        let mut buf = [0u8; 64];
        let n = c.seal_keepalive(Direction::ClientToGateway, SID, 3, &mut buf).expect("seal");
        assert_eq!(n, OVERHEAD);
        let o = c.open(Direction::ClientToGateway, &mut buf[..n]).expect("open");
        assert_eq!((o.kind, o.counter, o.payload.len()), (SealedKind::Keepalive, 3, 0));
        // Turning a Data datagram with empty payload into a Keepalive changes the AAD.
        let mut d = sealed(&c, Direction::ClientToGateway, 4, &[]);
        d[0] = MsgType::Keepalive.first_byte();
        assert_eq!(c.open(Direction::ClientToGateway, &mut d), Err(OpenError::Decrypt));
    }

    #[test]
    fn probes_and_acks_round_trip_padded_and_cannot_pass_for_data() {
        use crate::sansio::wire::{ProbeAckBody, ProbeBody, ProbeKind};
        let c = cipher(3);
        let mut buf = vec![0u8; 1500];
        let probe = ProbeBody { id: 5, kind: ProbeKind::Up, ack_len: 0, down_ok: 1400 };
        let padded = 1400 - OVERHEAD;
        probe.write(&mut buf[HEADER_LEN..HEADER_LEN + padded]).expect("body");
        let n = c.seal_probe(Direction::ClientToGateway, false, SID, 8, &mut buf, padded).expect("seal");
        assert_eq!(n, 1400, "padded to the size under test");
        let o = c.open(Direction::ClientToGateway, &mut buf[..n]).expect("open");
        assert_eq!(o.kind, SealedKind::Probe);
        assert_eq!(ProbeBody::parse(&buf[o.payload]), Ok(probe));

        let ack = ProbeAckBody { id: 5, kind: ProbeKind::Up, probe_len: 1400 };
        ack.write(&mut buf[HEADER_LEN..HEADER_LEN + wire::PROBE_BODY_LEN]).expect("body");
        let n = c.seal_probe(Direction::GatewayToClient, true, SID, 1, &mut buf, wire::PROBE_BODY_LEN).expect("seal");
        assert_eq!(n, wire::MIN_PROBE_LEN);
        let mut d = buf[..n].to_vec();
        // The type is in the AAD: an ack cannot be replayed as data or as a probe.
        for t in [MsgType::Data, MsgType::Probe] {
            let mut forged = d.clone();
            forged[0] = t.first_byte();
            assert_eq!(c.open(Direction::GatewayToClient, &mut forged), Err(OpenError::Decrypt));
        }
        let o = c.open(Direction::GatewayToClient, &mut d).expect("open");
        assert_eq!(o.kind, SealedKind::ProbeAck);
        assert_eq!(ProbeAckBody::parse(&d[o.payload]), Ok(ack));
        // Garbage after the header of a probe type: refused before any crypto.
        let mut short = d[..wire::MIN_PROBE_LEN - 1].to_vec();
        assert_eq!(c.open(Direction::GatewayToClient, &mut short), Err(OpenError::Malformed(WireError::Truncated)));
    }

    #[test]
    fn known_answer_pins_the_format() {
        // Pins the nonce layout, the AAD and the byte order: any accidental change to the wire
        // format fails here. Key = 32 x 0x00, counter 1, session SID, empty payload.
        let c = cipher(0);
        let d = sealed(&c, Direction::GatewayToClient, 1, &[]);
        assert_eq!(
            &d[..HEADER_LEN],
            &[0x11, 0, 0, 0, 0xfe, 0xed, 0xf0, 0x0d, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(Direction::GatewayToClient.nonce(1), *b"g->c\0\0\0\0\0\0\0\x01");
        // The tag is GHASH over the header alone; checked against independent
        // implementations (ring, aes-gcm) in tests/dataplane_props.rs.
        assert_eq!(d.len(), OVERHEAD);
    }

    #[test]
    fn seal_refuses_small_buffers_and_the_last_counter() {
        let c = cipher(3);
        let mut buf = [0u8; OVERHEAD + 10];
        assert_eq!(c.seal_data(Direction::ClientToGateway, SID, 0, &mut buf, 11), Err(SealError::BufferTooSmall));
        assert_eq!(
            c.seal_data(Direction::ClientToGateway, SID, 0, &mut buf, usize::MAX),
            Err(SealError::BufferTooSmall)
        );
        assert_eq!(c.seal_data(Direction::ClientToGateway, SID, 0, &mut buf, 10), Ok(OVERHEAD + 10));
        assert_eq!(
            c.seal_keepalive(Direction::ClientToGateway, SID, u64::MAX, &mut buf),
            Err(SealError::CounterExhausted)
        );
        assert!(c.seal_keepalive(Direction::ClientToGateway, SID, MAX_COUNTER, &mut buf).is_ok());
    }

    #[test]
    fn notice_cannot_be_opened() {
        let mut buf = wire::unknown_session_notice(SID, 1);
        assert_eq!(cipher(4).open(Direction::GatewayToClient, &mut buf), Err(OpenError::NotSealed));
    }

    #[test]
    fn open_checked_refuses_replays_but_forgeries_do_not_move_the_window() {
        let c = cipher(5);
        let mut w = ReplayWindow::new();
        let d = sealed(&c, Direction::ClientToGateway, 100, b"x");
        assert!(c.open_checked(Direction::ClientToGateway, &mut d.clone(), &mut w).is_ok());
        assert_eq!(
            c.open_checked(Direction::ClientToGateway, &mut d.clone(), &mut w),
            Err(OpenError::Replayed(ReplayError::Replay))
        );
        // A forged datagram with a far-ahead counter fails the tag and leaves the window alone.
        let mut forged = sealed(&c, Direction::ClientToGateway, 1 << 40, b"x");
        forged[HEADER_LEN] ^= 1;
        assert_eq!(c.open_checked(Direction::ClientToGateway, &mut forged, &mut w), Err(OpenError::Decrypt));
        assert_eq!(w.highest(), Some(100));
        let older = sealed(&c, Direction::ClientToGateway, 99, b"y");
        assert!(c.open_checked(Direction::ClientToGateway, &mut older.clone(), &mut w).is_ok());
    }

    #[test]
    fn tx_counter_counts_up_and_never_wraps() {
        let t = TxCounter::new();
        assert_eq!(t.next(), Ok(0));
        assert_eq!(t.next(), Ok(1));
        assert_eq!(t.peek(), 2);
        let t = TxCounter::starting_at(MAX_COUNTER - 1);
        assert_eq!(t.next(), Ok(MAX_COUNTER - 1));
        assert_eq!(t.next(), Ok(MAX_COUNTER));
        for _ in 0..3 {
            assert_eq!(t.next(), Err(SealError::CounterExhausted));
        }
        assert_eq!(t.peek(), u64::MAX);
    }

    #[test]
    fn tx_counter_is_unique_across_threads() {
        let t = TxCounter::new();
        let per = 10_000;
        let mut all: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..per).map(|_| t.next().expect("fresh")).collect::<Vec<_>>())).collect();
            hs.into_iter().flat_map(|h| h.join().expect("join")).collect()
        });
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4 * per);
        assert_eq!(all.last(), Some(&(4 * per as u64 - 1)));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = SessionKey::new([0x5a; 32]);
        let s = format!("{:?}", SessionCipher::new(&key));
        assert_eq!(s, format!("SessionCipher(fp:{})", key.fingerprint()));
    }

    #[test]
    fn open_error_indices_and_names_are_dense_and_distinct() {
        let mut names = std::collections::HashSet::new();
        for (i, e) in OpenError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert!(names.insert(e.name()), "{e:?}");
        }
    }
}

//! Property tests of the pure data plane: wire format, seal/open, replay window.
//!
//! The seal/open properties run against independent AES-GCMs (ring, the backend before
//! aws-lc-rs, and the RustCrypto aes-gcm crate, the one before ring; neither shares code with
//! AWS-LC's AES-GCM) as well as against ourselves, so a bug that is symmetric in seal and open (a wrong nonce
//! layout, a wrong AAD) or in one backend cannot pass unnoticed.

use std::collections::BTreeSet;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use holdfast::sansio::aead::Backend;
use holdfast::sansio::replay::{ReplayError, ReplayWindow, WINDOW};
use holdfast::sansio::seal::{Direction, MAX_COUNTER, OpenError, SealedKind, SessionCipher, TxCounter};
use holdfast::sansio::wire::{self, HEADER_LEN, MsgType, OVERHEAD, TAG_LEN, WireError, parse_header};
use holdfast::snapshot::{SessionId, SessionKey};
use proptest::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Large enough for the biggest payload the strategies produce.
const MAX_PAYLOAD: usize = 1600;

/// Every AES-GCM backend, whichever this CPU would choose: each must meet every property.
fn backend() -> impl Strategy<Value = Backend> {
    prop_oneof![Just(Backend::Ring), Just(Backend::AwsLc), Just(Backend::Split)]
}

fn dir() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::ClientToGateway), Just(Direction::GatewayToClient)]
}

fn other(d: Direction) -> Direction {
    match d {
        Direction::ClientToGateway => Direction::GatewayToClient,
        Direction::GatewayToClient => Direction::ClientToGateway,
    }
}

/// Counters from the whole range, with extra weight on the edges.
fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(MAX_COUNTER), 0u64..1 << 20, 0..=MAX_COUNTER,]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(Vec::new()), prop::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),]
}

/// Seals `payload` the way the TUN loop will: read into `buf[HEADER_LEN..]`, seal in place.
fn seal(c: &SessionCipher, d: Direction, sid: SessionId, counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_PAYLOAD + OVERHEAD];
    buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let n = c.seal_data(d, sid, counter, &mut buf, payload.len()).expect("seal");
    buf.truncate(n);
    buf
}

fn ring_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_open_round_trip(
        bk in backend(), key in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(), ctr in counter(), p in payload()
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let mut dg = seal(&c, d, SessionId(sid), ctr, &p);
        prop_assert_eq!(dg.len(), p.len() + OVERHEAD);
        let o = c.open(d, &mut dg).expect("open");
        prop_assert_eq!(o.kind, SealedKind::Data);
        prop_assert_eq!(o.session_id, SessionId(sid));
        prop_assert_eq!(o.counter, ctr);
        prop_assert_eq!(&dg[o.payload], &p[..]);
    }

    /// Our datagrams are standard AES-256-GCM with nonce = direction tag || counter and AAD =
    /// the header: ring opens what we seal, and we open what ring seals.
    #[test]
    fn interoperates_with_an_independent_aes_gcm(
        bk in backend(), key in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(), ctr in counter(), p in payload()
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let rk = ring_key(&key);

        let mut dg = seal(&c, d, SessionId(sid), ctr, &p);
        let (head, body) = dg.split_at_mut(HEADER_LEN);
        let plain = rk
            .open_in_place(Nonce::assume_unique_for_key(d.nonce(ctr)), Aad::from(&*head), body)
            .expect("ring opens ours");
        prop_assert_eq!(&*plain, &p[..]);

        let head = parse_header(&seal(&c, d, SessionId(sid), ctr, &p)).expect("ours parses");
        let mut theirs = head.to_bytes().to_vec();
        let mut body = p.clone();
        let tag = rk
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(d.nonce(ctr)),
                Aad::from(&theirs[..]),
                &mut body,
            )
            .expect("ring seals");
        theirs.extend_from_slice(&body);
        theirs.extend_from_slice(tag.as_ref());
        let o = c.open(d, &mut theirs).expect("we open ring's");
        prop_assert_eq!(&theirs[o.payload], &p[..]);
    }

    /// The same against the RustCrypto aes-gcm crate (the backend before ring), which shares no
    /// code with ring or AWS-LC: aes-gcm opens what we seal, and we open what aes-gcm seals.
    #[test]
    fn interoperates_with_the_aes_gcm_crate(
        bk in backend(), key in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(), ctr in counter(), p in payload()
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let theirs_key = Aes256Gcm::new(&key.into());
        let nonce = d.nonce(ctr).into();

        let mut dg = seal(&c, d, SessionId(sid), ctr, &p);
        let (head, rest) = dg.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(p.len());
        let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("tag length");
        theirs_key
            .decrypt_inout_detached(&nonce, head, body.into(), &tag.into())
            .expect("aes-gcm opens ours");
        prop_assert_eq!(&*body, &p[..]);

        let mut theirs = parse_header(&seal(&c, d, SessionId(sid), ctr, &p))
            .expect("ours parses")
            .to_bytes()
            .to_vec();
        let mut body = p.clone();
        let tag = theirs_key
            .encrypt_inout_detached(&nonce, &theirs, body.as_mut_slice().into())
            .expect("aes-gcm seals");
        theirs.extend_from_slice(&body);
        theirs.extend_from_slice(&tag);
        let o = c.open(d, &mut theirs).expect("we open aes-gcm's");
        prop_assert_eq!(&theirs[o.payload], &p[..]);
    }

    /// The two backends are one cipher: each opens what the other seals, so the two ends of a
    /// tunnel may choose differently (each by its own CPU).
    #[test]
    fn the_backends_open_each_others_datagrams(
        key in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(), ctr in counter(), p in payload()
    ) {
        let ours = SessionCipher::with_backend(&SessionKey::new(key), Backend::Ring);
        let theirs = SessionCipher::with_backend(&SessionKey::new(key), Backend::AwsLc);
        for (a, b) in [(&ours, &theirs), (&theirs, &ours)] {
            let mut dg = seal(a, d, SessionId(sid), ctr, &p);
            prop_assert_eq!(&dg, &seal(b, d, SessionId(sid), ctr, &p), "the same bytes");
            let o = b.open(d, &mut dg).expect("opens the other's");
            prop_assert_eq!(&dg[o.payload], &p[..]);
        }
    }

    /// Flipping bits in any one byte (header, ciphertext or tag) makes the datagram fail, and
    /// so does cutting it short anywhere.
    #[test]
    fn every_tampered_byte_is_rejected(
        bk in backend(), key in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(), ctr in counter(),
        p in prop::collection::vec(any::<u8>(), 0..=256), mask in 1u8..=255
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let good = seal(&c, d, SessionId(sid), ctr, &p);
        for i in 0..good.len() {
            let mut bad = good.clone();
            // Vary which bits flip with the position; rotating a non-zero byte keeps it non-zero.
            bad[i] ^= mask.rotate_left(i as u32 % 8);
            let r = c.open(d, &mut bad).map(|_| ());
            prop_assert!(r.is_err(), "byte {} flipped still opened", i);
            if i == 1 && bad[1] == wire::FLAG_CSUM_PARTIAL {
                // A flag Data may carry: it parses, and the tag (it is in the AAD) fails.
                prop_assert_eq!(r, Err(OpenError::Decrypt));
            } else if (1..4).contains(&i) {
                prop_assert_eq!(r, Err(OpenError::Malformed(WireError::BadReserved)));
            }
            if i >= 4 {
                prop_assert_eq!(r, Err(OpenError::Decrypt), "byte {}", i);
            }
        }
        for len in 0..good.len() {
            prop_assert!(c.open(d, &mut good[..len].to_vec()).is_err(), "prefix {}", len);
        }
        // Appending bytes moves the tag: also rejected.
        let mut longer = good.clone();
        longer.push(0);
        prop_assert_eq!(c.open(d, &mut longer), Err(OpenError::Decrypt));
    }

    #[test]
    fn wrong_key_and_wrong_direction_are_rejected(
        bk in backend(), k1 in any::<[u8; 32]>(), k2 in any::<[u8; 32]>(), d in dir(), sid in any::<u64>(),
        ctr in counter(), p in payload()
    ) {
        prop_assume!(k1 != k2);
        let c1 = SessionCipher::with_backend(&SessionKey::new(k1), bk);
        let c2 = SessionCipher::with_backend(&SessionKey::new(k2), bk);
        let dg = seal(&c1, d, SessionId(sid), ctr, &p);
        prop_assert_eq!(c2.open(d, &mut dg.clone()), Err(OpenError::Decrypt));
        // A gateway->client datagram cannot be reflected back to the gateway as client->gateway.
        prop_assert_eq!(c1.open(other(d), &mut dg.clone()), Err(OpenError::Decrypt));
        prop_assert!(c1.open(d, &mut dg.clone()).is_ok());
    }

    /// Distinct (direction, counter) pairs never share a nonce, and the two directions of one
    /// session really use different keystreams for the same counter.
    #[test]
    fn nonces_are_unique_across_directions(
        bk in backend(), key in any::<[u8; 32]>(), d1 in dir(), d2 in dir(), c1 in counter(), c2 in counter()
    ) {
        prop_assert_eq!(d1.nonce(c1) == d2.nonce(c2), (d1, c1) == (d2, c2));
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let zeros = [0u8; 64];
        let a = seal(&c, Direction::ClientToGateway, SessionId(1), c1, &zeros);
        let b = seal(&c, Direction::GatewayToClient, SessionId(1), c1, &zeros);
        // Same key, header and plaintext: only the nonce differs, so the ciphertexts must.
        prop_assert_ne!(&a[HEADER_LEN..HEADER_LEN + 64], &b[HEADER_LEN..HEADER_LEN + 64]);
    }

    /// Any bytes at all: parse and open return (they never panic), a parsed header re-encodes
    /// to the same bytes, and nothing random opens.
    #[test]
    fn garbage_never_panics_and_never_opens(
        bk in backend(), key in any::<[u8; 32]>(), bytes in prop::collection::vec(any::<u8>(), 0..2000)
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        if let Ok(h) = parse_header(&bytes) {
            prop_assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_LEN]);
        }
        for d in [Direction::ClientToGateway, Direction::GatewayToClient] {
            prop_assert!(c.open(d, &mut bytes.clone()).is_err());
            let mut w = ReplayWindow::new();
            prop_assert!(c.open_checked(d, &mut bytes.clone(), &mut w).is_err());
            prop_assert_eq!(w.highest(), None, "garbage moved the window");
        }
    }

    /// Garbage behind a valid header, the likelier attack: always a tag failure.
    #[test]
    fn valid_header_with_garbage_body_is_a_decrypt_error(
        bk in backend(), key in any::<[u8; 32]>(), sid in any::<u64>(), ctr in any::<u64>(),
        body in prop::collection::vec(any::<u8>(), TAG_LEN..1600)
    ) {
        let c = SessionCipher::with_backend(&SessionKey::new(key), bk);
        let head = parse_header(&{
            let mut d = vec![MsgType::Data.first_byte(), 0, 0, 0];
            d.extend_from_slice(&sid.to_be_bytes());
            d.extend_from_slice(&ctr.to_be_bytes());
            d.extend_from_slice(&[0; TAG_LEN]);
            d
        }).expect("valid header");
        let mut dg = head.to_bytes().to_vec();
        dg.extend_from_slice(&body);
        prop_assert_eq!(c.open(Direction::GatewayToClient, &mut dg), Err(OpenError::Decrypt));
    }
}

/// The reference the window is checked against: every accepted counter, kept forever.
#[derive(Default)]
struct Model {
    seen: BTreeSet<u64>,
}

impl Model {
    fn accept(&mut self, c: u64) -> Result<(), ReplayError> {
        if let Some(&top) = self.seen.last()
            && c <= top
        {
            if top - c >= WINDOW {
                return Err(ReplayError::TooOld);
            }
            if self.seen.contains(&c) {
                return Err(ReplayError::Replay);
            }
        }
        self.seen.insert(c);
        Ok(())
    }
}

/// One step of a replay scenario: a counter relative to the current top, so the sequences stay
/// near the window's edges instead of scattering over 2^64.
#[derive(Debug, Clone)]
enum Step {
    Behind(u64),
    Ahead(u64),
    Absolute(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..WINDOW + 70).prop_map(Step::Behind),
        2 => (0u64..70).prop_map(Step::Behind),
        3 => (1u64..200).prop_map(Step::Ahead),
        // Forward jumps of up to about one ring lap (4096) and beyond: these make the window
        // reuse ring blocks, where stale bits would show.
        2 => (1u64..2 * WINDOW).prop_map(Step::Ahead),
        1 => (WINDOW - 70..3 * WINDOW).prop_map(Step::Ahead),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), Just(u64::MAX - WINDOW), any::<u64>()]
            .prop_map(Step::Absolute),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The window answers exactly like an unbounded set of seen counters with the WINDOW cut-off,
    /// for sequences with reordering, duplicates, jumps and the ends of the u64 range.
    #[test]
    fn replay_window_matches_the_model(start in counter(), steps in prop::collection::vec(step(), 1..400)) {
        let mut w = ReplayWindow::new();
        let mut m = Model::default();
        prop_assert_eq!(w.accept(start), m.accept(start));
        for s in steps {
            let top = w.highest().expect("accepted one");
            let c = match s {
                Step::Behind(b) => top.saturating_sub(b),
                Step::Ahead(a) => top.saturating_add(a),
                Step::Absolute(c) => c,
            };
            let checked = w.check(c);
            let got = w.accept(c);
            prop_assert_eq!(checked, got, "check and accept disagree at {}", c);
            prop_assert_eq!(got, m.accept(c), "counter {} (top was {})", c, top);
            prop_assert_eq!(w.highest(), m.seen.last().copied());
        }
    }

    /// Seal with a TxCounter, deliver shuffled with duplicates: each counter is delivered once.
    #[test]
    fn shuffled_duplicated_delivery_yields_each_packet_once(
        order in Just((0..300usize).chain(0..300).collect::<Vec<_>>()).prop_shuffle()
    ) {
        let c = SessionCipher::new(&SessionKey::new([9; 32]));
        let tx = TxCounter::new();
        let sent: Vec<Vec<u8>> = (0..300u32)
            .map(|i| seal(&c, Direction::ClientToGateway, SessionId(5), tx.next().expect("fresh"), &i.to_be_bytes()))
            .collect();
        let mut w = ReplayWindow::new();
        let mut got = BTreeSet::new();
        for i in order {
            let mut dg = sent[i].clone();
            match c.open_checked(Direction::ClientToGateway, &mut dg, &mut w) {
                Ok(o) => prop_assert!(got.insert(dg[o.payload].to_vec()), "delivered twice: {}", i),
                Err(e) => prop_assert_eq!(e, OpenError::Replayed(ReplayError::Replay)),
            }
        }
        prop_assert_eq!(got.len(), 300);
    }
}

#[test]
fn notice_round_trips_and_is_never_opened() {
    let n = wire::unknown_session_notice(SessionId(77), 123);
    let h = parse_header(&n).expect("parses");
    assert_eq!((h.msg_type, h.session_id, h.counter), (MsgType::UnknownSession, SessionId(77), 123));
    let c = SessionCipher::new(&SessionKey::new([1; 32]));
    assert_eq!(c.open(Direction::GatewayToClient, &mut n.clone()), Err(OpenError::NotSealed));
}

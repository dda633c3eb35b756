//! The socket filter of the data-plane UDP sockets: a classic BPF program (`SO_ATTACH_FILTER`)
//! that drops, in the kernel, datagrams whose first bytes or length cannot be a Holdfast
//! datagram, so a flood of junk never wakes the loops or costs a copy into user space.
//!
//! This module only builds the program (pure, no IO); the shell attaches it
//! (`crate::flood::attach_filter`). The program is a pre-filter, not the check: the loops still
//! parse every datagram with [`wire::parse_header`](super::wire::parse_header). It must therefore never drop a datagram the
//! parser accepts (tested by interpreting the program over datagrams the real sealer produces),
//! and it drops what the parser refuses where it can see it.
//!
//! What the kernel shows a UDP socket filter (verified on Linux 6.x and pinned by the socket
//! test in `tests/flood.rs`): offset 0 is the **UDP header** (8 bytes, for IPv4 and IPv6
//! alike, so the program does not care whether the socket is dual-stack), the datagram starts at
//! offset 8, and the length (`BPF_LEN`) is 8 + the UDP payload. The return value is how many
//! bytes to keep, so "accept" returns `u32::MAX`: a smaller constant would trim a large
//! datagram.
//!
//! **UDP GRO.** With `UDP_GRO` on (both loops enable it), the kernel hands the socket coalesced
//! skbs (several datagrams of one flow, equal sizes, the last maybe shorter) and runs the filter
//! **once per skb**, before it is queued: the program sees the first datagram's header and the
//! *total* length, never the later datagrams' headers or the segment size (classic BPF has no
//! access to `gso_size`). Two keepalives back to back arrive as one 72-byte skb. So a program
//! for a GRO socket ([`FilterSpec::coalesced`]) checks the fixed-size types' lengths as lower
//! bounds only; the exact lengths are then left to the parser, which runs per datagram. Without
//! GRO the kernel splits every GSO skb before the filter and the exact lengths are enforced.

use super::wire::{FLAG_CSUM_PARTIAL, HEADER_LEN, MIN_PROBE_LEN, MsgType, OVERHEAD};

/// One classic BPF instruction, laid out like the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    /// A load or a return: no jumps.
    pub const fn stmt(code: u16, k: u32) -> Insn {
        Insn { code, jt: 0, jf: 0, k }
    }

    /// A conditional jump: `jt` / `jf` instructions forward when true / false.
    pub const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }
}

/// Opcodes used here (linux/bpf_common.h).
pub mod op {
    // BPF_LD and BPF_W are 0, so these are the mode bits alone.
    pub const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    pub const LD_LEN: u16 = 0x80; // BPF_LD | BPF_W | BPF_LEN
    pub const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
    pub const JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
    pub const RET_K: u16 = 0x06; // BPF_RET | BPF_K
}

/// Where the datagram starts in what the filter sees: behind the UDP header.
pub const UDP_HEADER: u32 = 8;

/// The filter's "keep the whole datagram".
pub const ACCEPT: u32 = u32::MAX;

/// The ancillary load that gives a random u32 (`SKF_AD_OFF + SKF_AD_RANDOM`).
pub const LOAD_RANDOM: u32 = (-0x1000i32 + 56) as u32;

/// Most session ids a program checks (5 instructions each, inside the kernel's 4096).
pub const MAX_SESSION_IDS: usize = 800;

/// Sessions a flood-time program lets through: the live ids, and one datagram in `one_in` for
/// any other id (a sample, so a client of a restarted gateway still draws its notice).
#[derive(Debug, Clone, Copy)]
pub struct KnownSessions<'a> {
    pub ids: &'a [u64],
    pub one_in: u32,
}

/// Which datagrams a socket may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From clients: Data, Keepalive and path MTU probes. Clients never send notices, and the
    /// gateway drops one (answering could ping-pong with another gateway).
    Gateway,
    /// From the gateway: Data, Keepalive, UnknownSession notices and probe acks.
    Client,
}

/// What the program is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSpec {
    pub side: Side,
    /// The socket has `UDP_GRO` on: one filter run may see several datagrams (see the module
    /// docs), so fixed lengths are lower bounds.
    pub coalesced: bool,
}

/// How a type's length is checked.
#[derive(Debug, Clone, Copy)]
enum LenRule {
    AtLeast(usize),
    Exactly(usize),
}

impl FilterSpec {
    /// The first words this side accepts (a type's byte and its flags, then the two reserved
    /// zero bytes), each with the index of its type in [`FilterSpec::rules`], in the order the
    /// program tests them: Data first (the common case takes the fewest jumps), then Data with
    /// a partial checksum ([`FLAG_CSUM_PARTIAL`]), then the other types without flags.
    fn words(self) -> impl Iterator<Item = (u32, usize)> {
        let word = |t: MsgType, flags: u8| u32::from(t.first_byte()) << 24 | u32::from(flags) << 16;
        let partial = (word(MsgType::Data, FLAG_CSUM_PARTIAL), 0);
        let mut plain = self.rules().enumerate().map(move |(i, (t, _))| (word(t, 0), i));
        plain.next().into_iter().chain([partial]).chain(plain)
    }

    /// The types this side accepts, each with its length rule, Data first.
    fn rules(self) -> impl Iterator<Item = (MsgType, LenRule)> {
        let fixed = |n| {
            if self.coalesced { LenRule::AtLeast(n) } else { LenRule::Exactly(n) }
        };
        let side_only: [(MsgType, LenRule); 1] = match self.side {
            Side::Client => [(MsgType::UnknownSession, fixed(HEADER_LEN))],
            Side::Gateway => [(MsgType::Probe, LenRule::AtLeast(MIN_PROBE_LEN))],
        };
        // Probe acks last: they are rare. Padded, so their length is only ever a lower bound.
        let ack = (self.side == Side::Client).then_some((MsgType::ProbeAck, LenRule::AtLeast(MIN_PROBE_LEN)));
        [(MsgType::Data, LenRule::AtLeast(OVERHEAD)), (MsgType::Keepalive, fixed(OVERHEAD))]
            .into_iter()
            .chain(side_only)
            .chain(ack)
    }

    /// The program. Its shape, for `n` accepted types and `m` accepted first words (one per
    /// type, and Data's with a partial checksum, which shares Data's length check):
    ///
    /// ```text
    /// 0        A = first 4 bytes of the datagram (version/type byte, flags, 2 reserved zero bytes)
    /// 1..=m    if A == an accepted word of type t: goto check t   (last: else goto drop)
    /// check t  A = length; if A == / >= 8 + len(t): goto accept, else goto drop
    /// accept   return u32::MAX
    /// drop     return 0
    /// ```
    ///
    /// A datagram shorter than 4 bytes makes the load fail, which ends the program with 0.
    pub fn program(self) -> Vec<Insn> {
        self.program_for(None)
    }

    /// The program while a flood is being shed: as [`FilterSpec::program`], then a datagram
    /// passes only if its session id is one of `known.ids` (or, for any other id, one in
    /// `known.one_in`, drawn by the kernel). `None` if there are more ids than
    /// [`MAX_SESSION_IDS`]: then the plain program is all the kernel can do.
    ///
    /// ```text
    /// ...      as the plain program, but a datagram that passed goes on behind its returns
    /// id i     A = session id's high word; if A != hi(i): next id
    ///          A = low word; if A == lo(i): return u32::MAX       (else: next id)
    /// sample   A = random; if A >= u32::MAX / one_in: return 0, else return u32::MAX
    /// ```
    pub fn program_with_sessions(self, known: KnownSessions<'_>) -> Option<Vec<Insn>> {
        (known.ids.len() <= MAX_SESSION_IDS).then(|| self.program_for(Some(known)))
    }

    fn program_for(self, known: Option<KnownSessions<'_>>) -> Vec<Insn> {
        let rules: Vec<(MsgType, LenRule)> = self.rules().collect();
        let words: Vec<(u32, usize)> = self.words().collect();
        let (n, m) = (rules.len(), words.len());
        let check = |t: usize| 1 + m + 2 * t;
        let accept = 1 + m + 2 * n;
        let drop = accept + 1;
        // With ids, a datagram that passed its type's checks goes on to the id checks behind
        // the two returns; every jump stays short (a jump offset is one byte).
        let passed = if known.is_some() { drop + 1 } else { accept };
        // Relative jump from the instruction at `pc` to `target`; the layout keeps every one
        // within a byte (checked by the tests, which run programs of the largest size).
        let rel = |pc: usize, target: usize| (target - pc - 1) as u8;
        let mut p = Vec::with_capacity(drop + 1 + known.map_or(0, |k| 5 * k.ids.len() + 4));
        p.push(Insn::stmt(op::LD_W_ABS, UDP_HEADER));
        for (w, &(word, t)) in words.iter().enumerate() {
            let pc = 1 + w;
            let otherwise = if w + 1 == m { rel(pc, drop) } else { 0 };
            p.push(Insn::jump(op::JEQ_K, word, rel(pc, check(t)), otherwise));
        }
        for (t, (_, rule)) in rules.iter().enumerate() {
            p.push(Insn::stmt(op::LD_LEN, 0));
            let pc = check(t) + 1;
            let (code, len) = match *rule {
                LenRule::AtLeast(n) => (op::JGE_K, n),
                LenRule::Exactly(n) => (op::JEQ_K, n),
            };
            // Lengths are at most MIN_PROBE_LEN (48): the cast cannot truncate.
            let k = UDP_HEADER + len as u32;
            p.push(Insn::jump(code, k, rel(pc, passed), rel(pc, drop)));
        }
        p.push(Insn::stmt(op::RET_K, ACCEPT));
        p.push(Insn::stmt(op::RET_K, 0));
        debug_assert_eq!(p.len(), drop + 1);
        if let Some(known) = known {
            let sid = UDP_HEADER + 4;
            for &id in known.ids {
                // hi != : skip the next 3 (to the next id); lo == : fall into the accept.
                p.push(Insn::stmt(op::LD_W_ABS, sid));
                p.push(Insn::jump(op::JEQ_K, (id >> 32) as u32, 0, 3));
                p.push(Insn::stmt(op::LD_W_ABS, sid + 4));
                p.push(Insn::jump(op::JEQ_K, id as u32, 0, 1));
                p.push(Insn::stmt(op::RET_K, ACCEPT));
            }
            let below = u32::MAX / known.one_in.max(1);
            p.push(Insn::stmt(op::LD_W_ABS, LOAD_RANDOM));
            p.push(Insn::jump(op::JGE_K, below, 1, 0));
            p.push(Insn::stmt(op::RET_K, ACCEPT));
            p.push(Insn::stmt(op::RET_K, 0));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sansio::seal::{Direction, SessionCipher};
    use crate::sansio::session::{SessionId, SessionKey};
    use crate::sansio::wire::{self, parse_header};
    use proptest::prelude::*;

    /// A classic BPF interpreter for the opcodes a program of ours may use, with the kernel's
    /// semantics for them: a load past the end ends the program with 0; jumps are relative to
    /// the next instruction; running off the end is an invalid program (a test failure).
    fn run(program: &[Insn], udp_payload: &[u8]) -> u32 {
        run_with_random(program, udp_payload, 0)
    }

    fn run_with_random(program: &[Insn], udp_payload: &[u8], random: u32) -> u32 {
        let mut packet = vec![0u8; UDP_HEADER as usize];
        packet.extend_from_slice(udp_payload);
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = program.get(pc).unwrap_or_else(|| panic!("ran off the program at {pc}"));
            pc += 1;
            match i.code {
                op::LD_W_ABS if i.k == LOAD_RANDOM => a = random,
                op::LD_W_ABS => {
                    let at = i.k as usize;
                    let Some(w) = packet.get(at..at + 4) else {
                        return 0;
                    };
                    a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
                }
                op::LD_LEN => a = packet.len() as u32,
                op::JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                op::JGE_K => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
                op::RET_K => return i.k,
                other => panic!("opcode {other:#x} not modelled"),
            }
        }
    }

    fn passes(spec: FilterSpec, datagram: &[u8]) -> bool {
        let kept = run(&spec.program(), datagram);
        assert!(kept == 0 || kept == ACCEPT, "a filter of ours never trims: {kept}");
        kept == ACCEPT
    }

    const SPECS: [FilterSpec; 4] = [
        FilterSpec { side: Side::Gateway, coalesced: false },
        FilterSpec { side: Side::Gateway, coalesced: true },
        FilterSpec { side: Side::Client, coalesced: false },
        FilterSpec { side: Side::Client, coalesced: true },
    ];

    /// Whether `side` takes a datagram the parser accepted.
    fn wanted(side: Side, t: MsgType) -> bool {
        match t {
            MsgType::Data | MsgType::Keepalive => true,
            MsgType::UnknownSession | MsgType::ProbeAck => side == Side::Client,
            MsgType::Probe => side == Side::Gateway,
        }
    }

    fn sealed(kind: u8, sid: u64, counter: u64, payload: &[u8], dir: Direction) -> Vec<u8> {
        let cipher = SessionCipher::new(&SessionKey::new([7; 32]));
        let mut buf = vec![0u8; payload.len() + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = match kind {
            0 => cipher.seal_keepalive(dir, SessionId(sid), counter, &mut buf),
            1 => cipher.seal_data(dir, SessionId(sid), counter, &mut buf, payload.len()),
            // Data with a partial inner checksum.
            _ => cipher.seal_data_with(dir, SessionId(sid), counter, &mut buf, payload.len(), true),
        }
        .expect("seal");
        buf.truncate(n);
        buf
    }

    #[test]
    fn programs_are_small_and_end_in_returns() {
        for spec in SPECS {
            let p = spec.program();
            assert!(p.len() <= 16, "{spec:?}: {} instructions", p.len());
            assert_eq!(p.last().map(|i| (i.code, i.k)), Some((op::RET_K, 0)));
            // Every jump lands inside the program.
            for (pc, i) in p.iter().enumerate() {
                if i.code == op::JEQ_K || i.code == op::JGE_K {
                    assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < p.len(), "{spec:?} at {pc}");
                }
            }
        }
    }

    #[test]
    fn each_malformation_is_dropped_and_each_valid_kind_passes() {
        let data = sealed(1, 5, 9, &[0x45; 60], Direction::ClientToGateway);
        let keepalive = sealed(0, 5, 9, &[], Direction::GatewayToClient);
        let notice = wire::unknown_session_notice(SessionId(5), 9).to_vec();
        let partial = sealed(2, 5, 9, &[0x45; 60], Direction::ClientToGateway);
        for spec in SPECS {
            assert!(passes(spec, &data), "{spec:?} data");
            assert!(passes(spec, &partial), "{spec:?} data with a partial checksum");
            let mut flagged_keepalive = keepalive.clone();
            flagged_keepalive[1] = wire::FLAG_CSUM_PARTIAL;
            assert!(!passes(spec, &flagged_keepalive), "{spec:?} only data has the flag");
            assert!(passes(spec, &sealed(1, 5, 9, &[], Direction::ClientToGateway)), "empty data");
            assert!(passes(spec, &keepalive), "{spec:?} keepalive");
            assert_eq!(passes(spec, &notice), spec.side == Side::Client, "{spec:?} notice");
            for junk in [&[][..], &[0x11], &[0x11, 0, 0], &[0x55; 64], &[0; 40]] {
                assert!(!passes(spec, junk), "{spec:?} {junk:?}");
            }
            let mut bad = data.clone();
            bad[0] = 0x21; // version 2
            assert!(!passes(spec, &bad));
            bad[0] = 0x16; // type 6
            assert!(!passes(spec, &bad));
            // Probes to the gateway only, acks to the client only, never shorter than a body.
            for (t, side) in [(MsgType::Probe, Side::Gateway), (MsgType::ProbeAck, Side::Client)] {
                let mut probe = data.clone();
                probe[0] = t.first_byte();
                assert_eq!(passes(spec, &probe), spec.side == side, "{spec:?} {t:?}");
                assert!(!passes(spec, &probe[..wire::MIN_PROBE_LEN - 1]), "{spec:?} short {t:?}");
            }
            bad[0] = 0x11;
            bad[2] = 1; // a reserved byte
            assert!(!passes(spec, &bad));
            assert!(!passes(spec, &data[..OVERHEAD - 1]), "data without room for a tag");
            assert!(!passes(spec, &keepalive[..OVERHEAD - 1]), "short keepalive");
            assert!(!passes(spec, &notice[..HEADER_LEN - 1]), "short notice");
            // Too long for its type: only a socket without GRO can tell.
            let mut long_ka = keepalive.clone();
            long_ka.push(0);
            assert_eq!(passes(spec, &long_ka), spec.coalesced, "{spec:?} long keepalive");
        }
    }

    /// Datagrams as UDP GRO hands them over: `first`, `count` more of its size, then one of
    /// `last` bytes (at most its size). Only the first header matters to the filter.
    fn coalesced(first: &[u8], count: usize, last: usize) -> Vec<u8> {
        let mut skb = first.to_vec();
        for _ in 0..count {
            skb.extend_from_slice(first);
        }
        skb.extend_from_slice(&first[..last.min(first.len())]);
        skb
    }

    #[test]
    fn during_a_flood_only_live_session_ids_pass_and_a_sample_of_the_rest() {
        let live = [0x0102_0304_0506_0708u64, 0xffff_0000_1234_5678, 7];
        for spec in SPECS {
            let known = KnownSessions { ids: &live, one_in: 64 };
            let p = spec.program_with_sessions(known).expect("few ids");
            let pass = |sid: u64, random: u32| {
                let d = sealed(1, sid, 1, &[0x45; 40], Direction::ClientToGateway);
                run_with_random(&p, &d, random) == ACCEPT
            };
            for &sid in &live {
                assert!(pass(sid, u32::MAX), "{spec:?}: live id {sid:#x} passes whatever the draw");
            }
            // Same high word as a live id, other low word; and the other way round.
            for sid in [0x0102_0304_0000_0000, 0x0000_0000_0506_0708, 8, 0] {
                assert!(!pass(sid, u32::MAX / 64), "{spec:?}: {sid:#x} not sampled");
                assert!(pass(sid, u32::MAX / 64 - 1), "{spec:?}: {sid:#x} sampled");
            }
            // The type and length checks still come first.
            assert_eq!(run_with_random(&p, &[0x55; 64], 0), 0);
            let notice = wire::unknown_session_notice(SessionId(live[0]), 1);
            assert_eq!(run_with_random(&p, &notice, 0) == ACCEPT, spec.side == Side::Client);
            // Keepalives of live sessions too.
            let ka = sealed(0, live[1], 1, &[], Direction::ClientToGateway);
            assert_eq!(run_with_random(&p, &ka, u32::MAX), ACCEPT);
            assert!(p.len() <= 4096);
        }
        let many: Vec<u64> = (0..=MAX_SESSION_IDS as u64).collect();
        let spec = SPECS[0];
        assert!(spec.program_with_sessions(KnownSessions { ids: &many, one_in: 64 }).is_none());
        let p = spec
            .program_with_sessions(KnownSessions { ids: &many[..MAX_SESSION_IDS], one_in: 64 })
            .expect("the most ids");
        assert!(p.len() < 4096, "{} instructions", p.len());
        for &id in &many[..MAX_SESSION_IDS] {
            let d = sealed(1, id, 1, &[1; 8], Direction::ClientToGateway);
            assert_eq!(run_with_random(&p, &d, u32::MAX), ACCEPT, "id {id} of a full table");
        }
        let stranger = sealed(1, 1 << 40, 1, &[1; 8], Direction::ClientToGateway);
        assert_eq!(run_with_random(&p, &stranger, u32::MAX), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A flood-time program passes every live session's datagrams, whatever the draw.
        #[test]
        fn a_flood_program_never_drops_a_live_session(
            ids in proptest::collection::vec(any::<u64>(), 1..40),
            pick: proptest::sample::Index,
            kind in 0u8..2,
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            random: u32,
            coalesced: bool,
        ) {
            let spec = FilterSpec { side: Side::Gateway, coalesced };
            let p = spec.program_with_sessions(KnownSessions { ids: &ids, one_in: 16 }).expect("few");
            let d = sealed(kind, ids[pick.index(ids.len())], 3, &payload, Direction::ClientToGateway);
            prop_assert_eq!(run_with_random(&p, &d, random), ACCEPT);
        }

        /// Everything the real sealer produces passes, alone and coalesced by GRO.
        #[test]
        fn every_sealed_datagram_passes(
            kind in 0u8..3,
            sid: u64,
            counter in 0u64..u64::MAX,
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
            gateway_bound: bool,
            extra in 0usize..8,
            last in 1usize..1600,
        ) {
            let dir = if gateway_bound { Direction::ClientToGateway } else { Direction::GatewayToClient };
            let d = sealed(kind, sid, counter, &payload, dir);
            prop_assert!(parse_header(&d).is_ok());
            for spec in SPECS {
                prop_assert!(passes(spec, &d), "{:?}", spec);
                if spec.coalesced {
                    prop_assert!(passes(spec, &coalesced(&d, extra, last)), "{:?}", spec);
                }
            }
        }

        /// Every notice passes on the client's socket, alone and coalesced.
        #[test]
        fn every_notice_passes_on_the_client(sid: u64, counter: u64, extra in 0usize..8, last in 1usize..21) {
            let n = wire::unknown_session_notice(SessionId(sid), counter);
            for spec in SPECS.into_iter().filter(|s| s.side == Side::Client) {
                prop_assert!(passes(spec, &n));
                if spec.coalesced {
                    prop_assert!(passes(spec, &coalesced(&n, extra, last)));
                }
            }
        }

        /// On arbitrary input the filter agrees with the parser: without GRO exactly; with GRO
        /// it never drops what the parser takes, and what it takes has a valid first header.
        #[test]
        fn the_filter_agrees_with_the_parser(
            head in prop_oneof![
                Just(vec![]),
                (0u8..0x40).prop_map(|b| vec![b, 0, 0, 0]),
                // Any flags byte behind a valid type byte.
                (0x11u8..0x16, any::<u8>()).prop_map(|(b, f)| vec![b, f, 0, 0]),
                proptest::collection::vec(any::<u8>(), 4),
            ],
            tail in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut d = head;
            d.extend_from_slice(&tail);
            let parsed = parse_header(&d);
            for spec in SPECS {
                let ok = parsed.is_ok_and(|h| wanted(spec.side, h.msg_type));
                let pass = passes(spec, &d);
                if spec.coalesced {
                    prop_assert!(!ok || pass, "{:?} dropped a valid datagram {:?}", spec, d);
                    if pass {
                        // The first datagram of the batch, cut at its type's size, parses.
                        let first = [wire::MIN_PROBE_LEN, OVERHEAD, HEADER_LEN]
                            .into_iter()
                            .filter(|&n| n <= d.len())
                            .filter_map(|n| parse_header(&d[..n]).ok())
                            .find(|h| wanted(spec.side, h.msg_type));
                        prop_assert!(first.is_some(), "{:?} passed a bad header {:?}", spec, d);
                    }
                } else {
                    prop_assert_eq!(ok, pass, "{:?} on {:?}", spec, d);
                }
            }
        }
    }
}

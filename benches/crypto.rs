//! `cargo bench --bench crypto`: nanoseconds per packet of the data-plane core (seal, open, replay
//! window, the TSO split), with the bare ring AEAD, the aes-gcm crate and tun-rs's split beside
//! them as reference figures.
//!
//! A plain timing harness (no criterion): each case runs for a fixed time budget, three times,
//! and the best round is printed, which is the figure least disturbed by the other processes of
//! a small shared machine. `open` decrypts in place, so each iteration first restores the sealed
//! datagram with a copy; the copy's own cost is measured and shown separately.
//!
//! One run on a 2-vCPU Intel Xeon with AVX-512, VAES and VPCLMULQDQ (the backends pick their
//! code at run time, no target-cpu flags), 2026-11-30:
//!
//! ```text
//! SessionCipher::new chooses aws-lc-rs on this CPU
//! seal (SessionCipher, ring)            64 B      78.8 ns/packet      812 MB/s
//! open (SessionCipher, ring)            64 B      82.3 ns/packet      777 MB/s
//! seal (SessionCipher, aws-lc-rs)       64 B      83.2 ns/packet      769 MB/s
//! open (SessionCipher, aws-lc-rs)       64 B      79.6 ns/packet      804 MB/s
//!   restoring copy alone                64 B       1.7 ns/packet    37004 MB/s
//! seal (ring, reference)                64 B      68.1 ns/packet      940 MB/s
//! seal (aws-lc-rs, reference)           64 B      68.9 ns/packet      929 MB/s
//! open (ring, copy excluded)            64 B      70.3 ns/packet      911 MB/s
//! seal (aes-gcm 0.11, reference)        64 B     116.5 ns/packet      549 MB/s
//! open (aes-gcm 0.11, copy excluded)    64 B     120.0 ns/packet      533 MB/s
//! seal (SessionCipher, ring)          1400 B     231.4 ns/packet     6051 MB/s
//! open (SessionCipher, ring)          1400 B     211.5 ns/packet     6619 MB/s
//! seal (SessionCipher, aws-lc-rs)     1400 B     179.9 ns/packet     7782 MB/s
//! open (SessionCipher, aws-lc-rs)     1400 B     176.8 ns/packet     7920 MB/s
//!   restoring copy alone              1400 B      10.4 ns/packet   134060 MB/s
//! seal (ring, reference)              1400 B     222.8 ns/packet     6285 MB/s
//! seal (aws-lc-rs, reference)         1400 B     169.4 ns/packet     8266 MB/s
//! open (ring, copy excluded)          1400 B     202.8 ns/packet     6903 MB/s
//! seal (aes-gcm 0.11, reference)      1400 B     541.6 ns/packet     2585 MB/s
//! open (aes-gcm 0.11, copy excluded)  1400 B     532.1 ns/packet     2631 MB/s
//! parse_header                                     2.4 ns/op
//! replay accept, in order                          1.9 ns/op
//! replay accept, pairwise reordered                2.1 ns/op
//! replay check (duplicate or too old)               0.6 ns/op
//! TxCounter::next (uncontended)                    7.8 ns/op
//! TSO split, 46 segments (ours)      64256 B    2301.8 ns/packet    27915 MB/s
//! TSO split, 46 segments (tun-rs)    64256 B    4002.1 ns/packet    16056 MB/s
//! ```
//!
//! `SessionCipher` is the data plane's seal and open: the AEAD of the backend named plus the header
//! and counter handling (its open rows exclude the restoring copy too); the reference rows are the
//! bare AEADs. On this CPU AWS-LC runs 512-bit VAES code, which ring lacks: 0.78x ring's time to
//! seal a full-size packet, 0.84x to open it, about level at 64 bytes. On the 2-vCPU AMD EPYC
//! machine with AVX-512, where 512-bit work runs as two halves, the two were level; without
//! AVX-512 AWS-LC has only 128-bit AES-NI code, so `SessionCipher::new` takes ring there (README,
//! "AES-GCM crate"). aes-gcm 0.11, the backend before ring, runs CTR and GHASH as two passes over
//! the data; the other two interleave them in assembly.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use holdfast::sansio::aead::Backend;
use holdfast::sansio::replay::ReplayWindow;
use holdfast::sansio::seal::{Direction, SessionCipher, TxCounter};
use holdfast::sansio::wire::{HEADER_LEN, OVERHEAD, parse_header};
use holdfast::snapshot::{SessionId, SessionKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const SID: SessionId = SessionId(0x0123_4567_89ab_cdef);
const KEY: [u8; 32] = [0x42; 32];
const ROUND: Duration = Duration::from_millis(250);
const ROUNDS: usize = 3;
const SIZES: [usize; 2] = [64, 1400];

/// Best-of-`ROUNDS` nanoseconds per call of `f` (given the iteration number).
fn ns_per_iter(mut f: impl FnMut(u64)) -> f64 {
    let mut best = f64::INFINITY;
    let mut i = 0u64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut n = 0u64;
        // Check the clock every 1024 calls so reading it costs nothing measurable.
        while start.elapsed() < ROUND {
            for _ in 0..1024 {
                f(i);
                i += 1;
            }
            n += 1024;
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn report(name: &str, size: Option<usize>, ns: f64) {
    match size {
        Some(size) => println!("{name:<34} {size:>5} B  {ns:>8.1} ns/packet  {:>7.0} MB/s", size as f64 / ns * 1e3),
        None => println!("{name:<34}          {ns:>8.1} ns/op"),
    }
}

fn main() {
    let ciphers = Backend::ALL.map(|b| SessionCipher::with_backend(&SessionKey::new(KEY), b));
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).expect("32-byte key"));
    let lc_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &KEY).expect("32-byte key"),
    );
    let rc_key = Aes256Gcm::new(&KEY.into());
    let dir = Direction::ClientToGateway;
    let mut buf = vec![0u8; 2048];
    let mut sealed = vec![0u8; 2048];

    println!("holdfast data plane, best of {ROUNDS} x {ROUND:?} per line");
    println!("SessionCipher::new chooses {} on this CPU", Backend::for_this_cpu().name());
    for size in SIZES {
        let mut copy = 0.0;
        let mut n = 0;
        for cipher in &ciphers {
            let name = cipher.backend().name();
            let ns = ns_per_iter(|i| {
                let n = cipher.seal_data(dir, SID, i, black_box(&mut buf), size).expect("seal");
                black_box(n);
            });
            report(&format!("seal (SessionCipher, {name})"), Some(size), ns);

            n = cipher.seal_data(dir, SID, 7, &mut sealed, size).expect("seal");
            copy = ns_per_iter(|_| {
                buf[..n].copy_from_slice(black_box(&sealed[..n]));
                black_box(&buf);
            });
            let total = ns_per_iter(|_| {
                buf[..n].copy_from_slice(black_box(&sealed[..n]));
                let o = cipher.open(dir, &mut buf[..n]).expect("open");
                black_box(o);
            });
            report(&format!("open (SessionCipher, {name})"), Some(size), total - copy);
        }
        report("  restoring copy alone", Some(size), copy);

        let ns = ns_per_iter(|i| {
            let nonce = Nonce::assume_unique_for_key(dir.nonce(i));
            let (head, body) = buf.split_at_mut(HEADER_LEN);
            let tag = ring_key.seal_in_place_separate_tag(nonce, Aad::from(&*head), &mut body[..size]).expect("seal");
            // Place the tag as a real datagram needs it, like our seal does.
            body[size..size + 16].copy_from_slice(tag.as_ref());
        });
        report("seal (ring, reference)", Some(size), ns);

        let ns = ns_per_iter(|i| {
            use aws_lc_rs::aead::{Aad, Nonce};
            let nonce = Nonce::assume_unique_for_key(dir.nonce(i));
            let (head, body) = buf.split_at_mut(HEADER_LEN);
            let tag = lc_key.seal_in_place_separate_tag(nonce, Aad::from(&*head), &mut body[..size]).expect("seal");
            body[size..size + 16].copy_from_slice(tag.as_ref());
        });
        report("seal (aws-lc-rs, reference)", Some(size), ns);

        let nonce = Nonce::assume_unique_for_key(dir.nonce(7));
        let (head, body) = sealed.split_at_mut(HEADER_LEN);
        let tag = ring_key.seal_in_place_separate_tag(nonce, Aad::from(&*head), &mut body[..size]).expect("seal");
        body[size..size + 16].copy_from_slice(tag.as_ref());
        let total = ns_per_iter(|_| {
            buf[..n].copy_from_slice(black_box(&sealed[..n]));
            let nonce = Nonce::assume_unique_for_key(dir.nonce(7));
            let (head, body) = buf[..n].split_at_mut(HEADER_LEN);
            let plain = ring_key.open_in_place(nonce, Aad::from(&*head), body).expect("open");
            black_box(plain);
        });
        report("open (ring, copy excluded)", Some(size), total - copy);

        // The RustCrypto aes-gcm crate (SessionCipher's backend before ring and aws-lc-rs), for the comparison
        // the README's "AES-GCM crate" paragraph quotes. `sealed` is the same datagram either way.
        let ns = ns_per_iter(|i| {
            let nonce = dir.nonce(i).into();
            let (head, body) = buf.split_at_mut(HEADER_LEN);
            let (body, tag_out) = body.split_at_mut(size);
            let tag = rc_key.encrypt_inout_detached(&nonce, head, body.into()).expect("seal");
            tag_out[..16].copy_from_slice(&tag);
        });
        report("seal (aes-gcm 0.11, reference)", Some(size), ns);

        let total = ns_per_iter(|_| {
            buf[..n].copy_from_slice(black_box(&sealed[..n]));
            let nonce = dir.nonce(7).into();
            let (head, body) = buf[..n].split_at_mut(HEADER_LEN);
            let (body, tag) = body.split_at_mut(size);
            let tag: [u8; 16] = (&*tag).try_into().expect("tag");
            rc_key.decrypt_inout_detached(&nonce, head, body.into(), &tag.into()).expect("open");
            black_box(&buf);
        });
        report("open (aes-gcm 0.11, copy excluded)", Some(size), total - copy);
    }

    let ns = ns_per_iter(|_| {
        black_box(parse_header(black_box(&sealed[..OVERHEAD + 64])).is_ok());
    });
    report("parse_header", None, ns);

    let mut w = ReplayWindow::new();
    let ns = ns_per_iter(|i| {
        w.accept(black_box(i)).expect("in order");
    });
    report("replay accept, in order", None, ns);

    let mut w = ReplayWindow::new();
    let ns = ns_per_iter(|i| {
        // Pairs swapped (1,0,3,2,...), so half the accepts land behind the top.
        black_box(w.accept(black_box(i ^ 1)).is_ok());
    });
    report("replay accept, pairwise reordered", None, ns);

    let ns = ns_per_iter(|i| {
        black_box(w.check(black_box(i & 0xfff)).is_ok());
    });
    report("replay check (duplicate or too old)", None, ns);

    let tx = TxCounter::new();
    let ns = ns_per_iter(|_| {
        black_box(tx.next().expect("fresh"));
    });
    report("TxCounter::next (uncontended)", None, ns);

    tso_split();
}

/// A 64 KiB TCP/IPv4 TSO packet as the client's TUN device hands it over (1396-byte segments,
/// the headline set-up's MSS) cut into slots: our split (`sansio::segment`, copy and checksum in
/// one pass) against tun-rs's `gso_split` (copy, then checksum), the engines' split before.
fn tso_split() {
    use holdfast::sansio::segment::{Offload, Slots, split};
    const MSS: u16 = 1396;
    const STRIDE: usize = OVERHEAD + 1436;
    let payload = 46 * usize::from(MSS);
    let mut packet = vec![0u8; 40 + payload];
    packet[0] = 0x45;
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[8] = 64;
    packet[9] = 6;
    packet[12..20].copy_from_slice(&[100, 64, 0, 2, 100, 64, 0, 1]);
    packet[32] = 0x50;
    packet[33] = 0x18;
    for (i, b) in packet[40..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let off = Offload { needs_csum: true, gso_type: 1, gso_size: MSS, csum_start: 20, csum_offset: 16 };
    let mut slots = vec![0u8; STRIDE * 64];
    let mut sizes = [0usize; 64];
    let ns = ns_per_iter(|_| {
        let mut out = Slots { slots: &mut slots, stride: STRIDE, offset: HEADER_LEN, sizes: &mut sizes };
        black_box(split(off, black_box(&packet), &mut out).expect("split"));
    });
    report("TSO split, 46 segments (ours)", Some(packet.len()), ns);
    let hdr =
        tun_rs::VirtioNetHdr { flags: 1, gso_type: 1, hdr_len: 40, gso_size: MSS, csum_start: 20, csum_offset: 16 };
    let mut input = packet.clone();
    let ns = ns_per_iter(|_| {
        let mut bufs: [&mut [u8]; 64] = {
            let mut chunks = slots.chunks_mut(STRIDE);
            std::array::from_fn(|_| chunks.next().unwrap_or_default())
        };
        black_box(
            tun_rs::gso_split(black_box(&mut input), hdr, &mut bufs, &mut sizes, HEADER_LEN, false).expect("split"),
        );
    });
    report("TSO split, 46 segments (tun-rs)", Some(packet.len()), ns);
}

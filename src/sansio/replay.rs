//! The anti-replay window (RFC 6479 style): a ring of 64-bit bitmap blocks that slides with the
//! highest accepted counter, so advancing costs at most one cleared word per 64 counters and
//! never shifts the whole bitmap.
//!
//! One window per session and receive direction. It is a plain `&mut self` struct; the shell
//! wraps it in whatever lock it likes. The order that keeps a forged datagram from moving the
//! window:
//!
//! 1. [`ReplayWindow::check`] (optional, cheap): drop obvious replays before paying for the AEAD;
//! 2. open the datagram (verify the tag);
//! 3. [`ReplayWindow::accept`], only after the tag verified. It checks again, so it is also correct
//!    when another thread accepted the same counter between 1 and 3.

use thiserror::Error;

/// Bits per bitmap block.
const BLOCK_BITS: u64 = u64::BITS as u64;

/// Number of blocks in the ring. A power of two so the ring index is a mask.
const BLOCKS: usize = 64;

/// The ring holds `BLOCKS * 64` = 4096 bits. One block is sacrificed so that the block holding
/// the newest counter never overwrites one still inside the window (as in RFC 6479 and
/// WireGuard), which leaves 4032 counters of guaranteed history.
///
/// Why 4096 bits (512 bytes per session and direction): a window must absorb the reordering that
/// multi-queue sends, batching (GSO/sendmmsg) and several underlay paths produce at line rate;
/// 2048 is the floor the issue sets, and at ~100k packets/s even 4032 packets span only 40 ms.
pub const WINDOW: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;

/// Why a counter was refused. Both are counted by the shell, never logged per packet.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayError {
    /// This counter was already accepted: a duplicate or a replay.
    #[error("counter already seen")]
    Replay,
    /// The counter is `WINDOW` or more behind the highest accepted one; we cannot tell whether it
    /// was seen, so it is refused.
    #[error("counter too far behind the window")]
    TooOld,
}

/// The receive-side sliding window of one session and direction.
#[derive(Clone)]
pub struct ReplayWindow {
    /// The highest accepted counter; `None` until the first accept, so counter 0 is acceptable
    /// without a sentinel value eating into the counter space.
    top: Option<u64>,
    /// Bit `c % 64` of block `(c / 64) % BLOCKS` is set when counter `c` (inside the window) was
    /// accepted.
    ring: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bitmap is 512 bytes of noise; the top is what a reader wants.
        f.debug_struct("ReplayWindow").field("top", &self.top).finish_non_exhaustive()
    }
}

/// Where counter `c`'s bit lives: (block index in the ring, bit mask).
fn slot(c: u64) -> (usize, u64) {
    // The mask keeps the value below BLOCKS, so the cast cannot truncate.
    let block = ((c / BLOCK_BITS) as usize) & (BLOCKS - 1);
    (block, 1u64 << (c % BLOCK_BITS))
}

impl ReplayWindow {
    /// An empty window: any counter is acceptable.
    pub const fn new() -> Self {
        Self { top: None, ring: [0; BLOCKS] }
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.top
    }

    /// Whether `counter` would be accepted now. Changes nothing, so it is safe to call before the
    /// datagram is authenticated.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        let Some(top) = self.top else {
            return Ok(());
        };
        if counter > top {
            return Ok(());
        }
        if top - counter >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (block, mask) = slot(counter);
        if self.ring[block] & mask != 0 { Err(ReplayError::Replay) } else { Ok(()) }
    }

    /// Checks `counter` and, if acceptable, records it (sliding the window forward when it is the
    /// new highest). Call only after the datagram's tag verified: an unauthenticated counter must
    /// never move the window.
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        match self.top {
            Some(top) if counter <= top => {}
            Some(top) => {
                self.advance(top, counter);
                self.top = Some(counter);
            }
            None => self.top = Some(counter),
        }
        let (block, mask) = slot(counter);
        self.ring[block] |= mask;
        Ok(())
    }

    /// Clears the blocks that the move of the top from `old` to `new` (> `old`) brings into the
    /// window, so bits of counters from one lap of the ring ago don't read as "seen".
    fn advance(&mut self, old: u64, new: u64) {
        let old_block = old / BLOCK_BITS;
        let new_block = new / BLOCK_BITS;
        let steps = new_block - old_block;
        if steps >= BLOCKS as u64 {
            // Jumped past the whole ring: nothing old survives.
            self.ring = [0; BLOCKS];
            return;
        }
        for i in 1..=steps {
            let (block, _) = slot((old_block + i) * BLOCK_BITS);
            self.ring[block] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_a_power_of_two_ring_with_enough_history() {
        assert!(BLOCKS.is_power_of_two());
        const { assert!(WINDOW >= 2048) };
        assert_eq!(std::mem::size_of::<[u64; BLOCKS]>() * 8, 4096);
    }

    #[test]
    fn first_packet_and_counter_zero() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.highest(), None);
        assert_eq!(w.check(0), Ok(()));
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.highest(), Some(0));
        assert_eq!(w.accept(0), Err(ReplayError::Replay));
        assert_eq!(w.accept(1), Ok(()));

        // A first packet far from zero is fine, and zero is then too old.
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(1_000_000), Ok(()));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
    }

    #[test]
    fn exact_duplicates_are_refused_and_check_does_not_record() {
        let mut w = ReplayWindow::new();
        for c in [5, 3, 9, 4] {
            assert_eq!(w.check(c), Ok(()));
            assert_eq!(w.check(c), Ok(()), "check must not record");
            assert_eq!(w.accept(c), Ok(()));
            assert_eq!(w.check(c), Err(ReplayError::Replay));
            assert_eq!(w.accept(c), Err(ReplayError::Replay));
        }
        assert_eq!(w.highest(), Some(9));
        for c in [6, 7, 8, 0, 1, 2] {
            assert_eq!(w.accept(c), Ok(()), "{c} is unseen and inside the window");
        }
    }

    #[test]
    fn window_boundary_is_exact_for_every_alignment() {
        // The oldest acceptable counter is top - WINDOW + 1, wherever top falls in its block.
        for top in (WINDOW..WINDOW + 3 * BLOCK_BITS).chain([u64::MAX, u64::MAX - 63]) {
            let mut w = ReplayWindow::new();
            w.accept(top).expect("first");
            assert_eq!(w.check(top - WINDOW), Err(ReplayError::TooOld), "top {top}");
            assert_eq!(w.accept(top - WINDOW + 1), Ok(()), "top {top}");
            assert_eq!(w.accept(top - WINDOW + 1), Err(ReplayError::Replay));
        }
    }

    #[test]
    fn history_survives_until_it_leaves_the_window() {
        // Accept every counter 0..N in order; each one must still read as seen while inside the
        // window, i.e. advancing never clears a block that is still in use.
        let mut w = ReplayWindow::new();
        let n = 3 * WINDOW + 17;
        for c in 0..n {
            w.accept(c).expect("fresh");
        }
        for c in 0..n {
            let expect = if n - 1 - c >= WINDOW { Err(ReplayError::TooOld) } else { Err(ReplayError::Replay) };
            assert_eq!(w.check(c), expect, "counter {c}");
        }
    }

    #[test]
    fn jumps_forward_clear_stale_bits() {
        // Jumps of exactly one ring lap and of more: bits left from before must not make fresh
        // counters look like replays.
        for jump in
            [BLOCK_BITS, WINDOW, WINDOW + 1, BLOCKS as u64 * BLOCK_BITS, BLOCKS as u64 * BLOCK_BITS + 5, 1 << 40]
        {
            let mut w = ReplayWindow::new();
            for c in 0..200 {
                w.accept(c).expect("fresh");
            }
            let top = 199 + jump;
            w.accept(top).expect("jump");
            for back in 1..WINDOW.min(top + 1) {
                assert_eq!(
                    w.check(top - back),
                    { if top - back < 200 { Err(ReplayError::Replay) } else { Ok(()) } },
                    "jump {jump} back {back}"
                );
            }
        }
    }

    #[test]
    fn out_of_order_within_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(10_000).expect("top");
        let mut seen = Vec::new();
        // A scrambled but deterministic order inside the window.
        for i in 0..WINDOW - 1 {
            let c = 10_000 - 1 - ((i * 37) % (WINDOW - 1));
            if seen.contains(&c) {
                continue;
            }
            assert_eq!(w.accept(c), Ok(()), "{c}");
            seen.push(c);
        }
        for c in seen {
            assert_eq!(w.check(c), Err(ReplayError::Replay));
        }
        assert_eq!(w.highest(), Some(10_000));
    }

    #[test]
    fn u64_extremes() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Replay));
        assert_eq!(w.accept(u64::MAX - 1), Ok(()));
        assert_eq!(w.accept(u64::MAX - WINDOW + 1), Ok(()));
        assert_eq!(w.check(u64::MAX - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));

        // From 0 straight to the top of the range.
        let mut w = ReplayWindow::new();
        w.accept(0).expect("zero");
        w.accept(u64::MAX).expect("max");
        assert_eq!(w.check(u64::MAX - 1), Ok(()));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
    }
}

//! A tiny, explicit encoding for structured fuzz inputs, with a reader (for the harnesses) and a
//! writer (for the seeds).
//!
//! Why not `arbitrary`: the seeds are written by hand in `seeds.rs` and must mean exactly what
//! they say, so the byte layout has to be simple and stable; and the main crate's stable tests
//! replay the same inputs without one more dependency.
//!
//! Every byte string is a valid input: a read past the end yields zero (or an empty slice), so the
//! fuzzer never wastes runs on "input too short" and a truncated seed still means something.

/// Reads values from the front of a fuzz input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.take(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_be_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.take(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_be_bytes(b)
    }

    /// A length-prefixed (u16, big-endian) byte string.
    pub fn bytes(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.take(usize::from(n))
    }

    /// A length-prefixed string; invalid UTF-8 is replaced, so every input still yields one.
    pub fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// Writes values in the layout [`Reader`] reads: used to build the seed corpus.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.out.push(v);
        self
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A length-prefixed byte string (at most `u16::MAX` bytes: seeds are small).
    pub fn bytes(self, v: &[u8]) -> Self {
        let n = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.u16(n).raw(&v[..usize::from(n)])
    }

    /// Bytes without a length prefix (a trailing "rest").
    pub fn raw(mut self, v: &[u8]) -> Self {
        self.out.extend_from_slice(v);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

//! The session value: what one successful `Authenticate` hands the client, and the per-session
//! crypto state that lives and dies with it. Pure data (no IO, no clock, no RNG): the supervisor
//! carries it in its effects and the data plane seals and opens with it. The atomically swapped
//! cell that holds the current one is the shell's business ([`crate::snapshot`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::replay::ReplayWindow;
use super::seal::{Direction, OpenError, Opened, SessionCipher, TxCounter};
use super::wire;

/// A session id: random, 64 bits, chosen by the gateway on every authentication.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A 256-bit AES-GCM session key.
///
/// It has no `Display`, and its `Debug` prints only a fingerprint, so formatting a snapshot, an
/// error or a status can never leak it. The bytes are wiped when the key is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// Wraps raw key bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Builds a key from a slice that must be exactly 32 bytes long (an RPC field, say).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// The raw bytes, for the cipher only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short, non-secret fingerprint (first 8 bytes of SHA-256 over a domain tag and the key),
    /// the only form of a key that logs, the dashboard and errors ever show.
    pub fn fingerprint(&self) -> KeyFingerprint {
        let mut h = Sha256::new();
        h.update(b"holdfast key fingerprint v1");
        h.update(self.0);
        let d = h.finalize();
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&d[..8]);
        KeyFingerprint(fp)
    }
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        // Volatile writes so the compiler cannot elide the wipe of memory about to be freed.
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey(fp:{})", self.fingerprint())
    }
}

/// The printable fingerprint of a [`SessionKey`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyFingerprint([u8; 8]);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The session snapshot returned by a successful `Authenticate`: everything the data plane needs,
/// as one immutable value.
#[derive(Debug)]
pub struct VpnAuthResponse {
    /// The client's tunnel address (stable per client).
    pub assigned_ip: Ipv4Addr,
    /// The gateway's tunnel address (the spec's `serverPublicIp`).
    pub gateway_ip: Ipv4Addr,
    /// Prefix length of the tunnel subnet.
    pub prefix_len: u8,
    /// The client's IPv6 tunnel address; `None` when the gateway has no IPv6 (the client then
    /// runs IPv4 only). Some exactly when `gateway_ip6` is.
    pub assigned_ip6: Option<Ipv6Addr>,
    /// The gateway's IPv6 tunnel address.
    pub gateway_ip6: Option<Ipv6Addr>,
    /// Prefix length of the IPv6 tunnel subnet (0 without IPv6).
    pub prefix_len6: u8,
    /// The session id the gateway chose.
    pub session_id: SessionId,
    /// The session key. Never printed: see [`SessionKey`].
    pub session_key: SessionKey,
    /// The gateway's UDP data port.
    pub data_port: u16,
    /// How long the gateway keeps an idle session.
    pub idle_timeout: Duration,
    /// The resolvers the gateway offers (its own, on its tunnel address(es)); empty when it runs
    /// none. Checked: at most `config::MAX_DNS_SERVERS`, unicast.
    pub dns_servers: Vec<IpAddr>,
    /// Search domains to use with them; checked plain domain names (they go into resolv.conf).
    pub search_domains: Vec<String>,
    /// When the client received it (wall clock, for display only).
    pub received_at: SystemTime,
    /// The gateway (control endpoint) that handed out this session. The data plane sends to its
    /// address, so it follows the session to whichever gateway of the deployment issued it.
    /// `None` (fixtures): the data plane's configured gateway.
    pub gateway_addr: Option<std::net::SocketAddr>,
    /// Every gateway of the deployment as this answer listed them (empty: not a multi-gateway
    /// deployment). The client keeps the latest list for failover.
    pub endpoints: Vec<std::net::SocketAddr>,
    /// The gateway takes Data datagrams whose inner TCP segment carries a partial checksum
    /// (see [`super::wire::FLAG_CSUM_PARTIAL`]): the client may then send the segments it cuts
    /// from a TSO packet without summing their payload. False for a gateway from before the flag.
    pub partial_checksums: bool,
    /// The data plane's per-session state (cipher, send counter, replay window), created on first
    /// use and dropped with the snapshot. Build it with `Default::default()`; read it through
    /// [`VpnAuthResponse::crypto`].
    pub crypto: CryptoSlot,
}

impl VpnAuthResponse {
    /// Where this session's datagrams go: the gateway that issued it (with several gateways the
    /// data plane follows the snapshot), else `configured` (the client file's).
    pub fn gateway_ip_or(&self, configured: IpAddr) -> IpAddr {
        self.gateway_addr.map_or(configured, |g| g.ip())
    }

    /// A well-formed snapshot of session `session_id` with key `key` and fixed everything else
    /// (client 100.64.0.2/24 and fd00:64::2/64, gateway 100.64.0.1 and fd00:64::1, data port 51820, idle timeout 180 s, received at
    /// the Unix epoch). The one fixture of the tests, benches and fuzz targets, which need *a*
    /// session rather than one the gateway handed out; change fields with struct-update syntax.
    /// Production code builds snapshots from the gateway's answer only.
    #[doc(hidden)]
    pub fn fixture(session_id: u64, key: [u8; 32]) -> Self {
        Self {
            assigned_ip: Ipv4Addr::new(100, 64, 0, 2),
            gateway_ip: Ipv4Addr::new(100, 64, 0, 1),
            prefix_len: 24,
            assigned_ip6: Some(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 2)),
            gateway_ip6: Some(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1)),
            prefix_len6: 64,
            session_id: SessionId(session_id),
            session_key: SessionKey::new(key),
            data_port: 51820,
            idle_timeout: Duration::from_secs(180),
            dns_servers: Vec::new(),
            search_domains: Vec::new(),
            received_at: SystemTime::UNIX_EPOCH,
            gateway_addr: None,
            endpoints: Vec::new(),
            partial_checksums: true,
            crypto: CryptoSlot::default(),
        }
    }

    /// A one-line summary safe for logs: never the key, only its fingerprint.
    pub fn summary(&self) -> String {
        let v6 = match (self.assigned_ip6, self.gateway_ip6) {
            (Some(ip6), Some(gw6)) => format!(" ip6 {ip6}/{} gateway6 {gw6}", self.prefix_len6),
            _ => String::new(),
        };
        format!(
            "session {} ip {}/{} gateway {}{v6} key fp:{}",
            self.session_id,
            self.assigned_ip,
            self.prefix_len,
            self.gateway_ip,
            self.session_key.fingerprint()
        )
    }

    /// Whether this session has a tunnel address of `family` (every session has IPv4; IPv6 only
    /// when the gateway has it).
    pub fn carries(&self, family: super::inner::IpFamily) -> bool {
        match family {
            super::inner::IpFamily::V4 => true,
            super::inner::IpFamily::V6 => self.assigned_ip6.is_some(),
        }
    }

    /// Whether `ip` is one of this session's tunnel addresses (either family).
    pub fn owns(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(v4) => v4 == self.assigned_ip,
            std::net::IpAddr::V6(v6) => Some(v6) == self.assigned_ip6,
        }
    }

    /// The data plane's state for this session, built from the key on first use (the key
    /// expansion happens once per snapshot, not per packet).
    pub fn crypto(&self) -> &SessionCrypto {
        self.crypto.0.get_or_init(|| SessionCrypto::new(&self.session_key))
    }
}

/// The per-session state of the data plane: what must change exactly when the session changes.
///
/// It lives inside the snapshot rather than in the UDP loops because the spec forbids the loops
/// to keep session data: a counter or a replay window kept by a loop would outlive a re-auth and
/// be applied to the wrong key. Here, a new snapshot brings a fresh counter (nonces restart at 0
/// under a fresh key, which is safe) and a fresh window, atomically with the key.
#[derive(Debug)]
pub struct SessionCrypto {
    /// The expanded AES-256-GCM key.
    pub cipher: SessionCipher,
    /// Counter of the datagrams this side seals (one direction per side, see `seal::Direction`).
    pub tx: TxCounter,
    /// The replay window of the direction this side receives.
    rx: Mutex<ReplayWindow>,
}

impl SessionCrypto {
    /// Fresh state for `key`: counter 0, empty window.
    pub fn new(key: &SessionKey) -> Self {
        Self { cipher: SessionCipher::new(key), tx: TxCounter::new(), rx: Mutex::new(ReplayWindow::new()) }
    }

    /// The receive window, locked. Hold it only around `check` and `accept`, not across the AEAD.
    fn rx_window(&self) -> MutexGuard<'_, ReplayWindow> {
        // A panic while holding the lock cannot leave the window inconsistent (its methods do
        // not panic and update one word at a time), so a poisoned lock is still usable.
        self.rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens a received datagram in place with the replay window applied: a cheap check first
    /// (a replay costs no AES work), then the tag, then the window moves, so a forged datagram
    /// never moves it. The lock is held only around the window operations, not the AEAD, so
    /// several receivers could share a session.
    pub fn open(&self, dir: Direction, datagram: &mut [u8]) -> Result<Opened, OpenError> {
        let header = wire::parse_header(datagram)?;
        self.rx_window().check(header.counter)?;
        let opened = self.cipher.open(dir, datagram)?;
        self.rx_window().accept(opened.counter)?;
        Ok(opened)
    }
}

/// Holder of a snapshot's [`SessionCrypto`], empty until the data plane first uses the snapshot.
#[derive(Default)]
pub struct CryptoSlot(OnceLock<SessionCrypto>);

impl fmt::Debug for CryptoSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cipher's Debug shows only a fingerprint, which `VpnAuthResponse` already shows.
        match self.0.get() {
            Some(c) => write!(f, "CryptoSlot(tx {})", c.tx.peek()),
            None => f.write_str("CryptoSlot(unused)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_summary_never_show_the_key() {
        let s = VpnAuthResponse::fixture(0xabcdef, [0x5a; 32]);
        let key_hex = "5a".repeat(32);
        let dbg = format!("{s:?}");
        let sum = s.summary();
        assert!(!dbg.contains(&key_hex), "{dbg}");
        assert!(!sum.contains(&key_hex), "{sum}");
        assert!(dbg.contains(&s.session_key.fingerprint().to_string()));
        assert!(!dbg.contains("90, 90"), "raw bytes leaked: {dbg}");
    }

    #[test]
    fn fingerprint_distinguishes_keys() {
        assert_ne!(SessionKey::new([1; 32]).fingerprint(), SessionKey::new([2; 32]).fingerprint());
    }
}

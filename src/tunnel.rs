//! IO pieces the client's and the gateway's data planes share: the TUN device, the UDP socket,
//! the counters and the small helpers of a hot loop (inner-header peeks, rate limits, error
//! backoff). The per-side loops live in `client::dataplane` and `gateway::dataplane`.
//!
//! Nothing here logs per packet. Failures on the data path are counted in [`Counters`] and
//! surfaced by [`Stats`] (the status feed, a stats log line), never as one log line per packet.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd};

use tokio::time::Instant;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::sansio::coalesce::{Coalescer, PushError, VNET_HDR_LEN};
use crate::sansio::icmp;
use crate::sansio::inner::IpFamily;
use crate::sansio::seal::OpenError;
use crate::sansio::segment;
use crate::sansio::wire;

/// The underlay MTU assumed when none is configured: Ethernet.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;

/// Socket buffer size we ask for. Bursts from a TUN (a TCP window's worth of segments) arrive
/// faster than one loop drains them; the default 208 KiB overflows at a few hundred Mbit/s. The
/// kernel caps the request at `net.core.[rw]mem_max` unless we hold CAP_NET_ADMIN (see
/// [`grow_buffer`]), which both ends need anyway for their TUN devices.
const SOCKET_BUFFER: usize = 4 << 20;

/// Why a packet or datagram was dropped. One counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No session snapshot yet (client), so nothing can be sealed or opened.
    NoSession,
    /// The datagram's header or length is invalid, or a packet is not IPv4/IPv6 or is empty.
    Malformed,
    /// The tag did not verify: wrong key, tampering, or garbage with a valid-looking header.
    Decrypt,
    /// A replayed, duplicated or too-old counter.
    Replay,
    /// A sealed datagram for a session other than the current one (client), or an
    /// "unknown session" notice for a session we are not on.
    WrongSession,
    /// Gateway: a datagram for a session id it does not know.
    UnknownSession,
    /// Gateway: the inner source address is not the sending session's assigned address.
    Spoofed,
    /// Gateway: no session owns the inner destination address, or it has no endpoint yet.
    NoRoute,
    /// A UDP send or receive failed (ENETUNREACH, EPERM, ECONNREFUSED, ENOBUFS, ...).
    SocketError,
    /// Reading from or writing to the TUN device failed.
    TunError,
    /// The session's send counter is exhausted: it needs a re-authentication.
    CounterExhausted,
    /// The TUN device offered a packet the tunnel does not carry: not IP at all, or the host's
    /// own link-scope chatter (IPv6 router solicitations, MLD, link-local sources), or (gateway)
    /// a packet of a family the destination session has no address in.
    NotCarried,
    /// An inner packet bigger than the tunnel's usable MTU. Not silent: the sender got an ICMP
    /// "fragmentation needed" / "packet too big" (rate-limited) so its TCP lowers its segment size.
    TooBig,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 13] = [
        DropReason::NoSession,
        DropReason::Malformed,
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::WrongSession,
        DropReason::UnknownSession,
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::SocketError,
        DropReason::TunError,
        DropReason::CounterExhausted,
        DropReason::NotCarried,
        DropReason::TooBig,
    ];

    /// Short stable name, for logs and the dashboard.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoSession => "no_session",
            DropReason::Malformed => "malformed",
            DropReason::Decrypt => "decrypt",
            DropReason::Replay => "replay",
            DropReason::WrongSession => "wrong_session",
            DropReason::UnknownSession => "unknown_session",
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::SocketError => "socket_error",
            DropReason::TunError => "tun_error",
            DropReason::CounterExhausted => "counter_exhausted",
            DropReason::NotCarried => "not_carried",
            DropReason::TooBig => "too_big",
        }
    }

    /// The reason an open failure is counted under.
    pub const fn of_open(e: OpenError) -> DropReason {
        match e {
            OpenError::Malformed(_) | OpenError::NotSealed => DropReason::Malformed,
            OpenError::Decrypt => DropReason::Decrypt,
            OpenError::Replayed(_) => DropReason::Replay,
        }
    }
}

/// The data plane's counters, shared by its loops and read by the status feed. Relaxed atomics:
/// each is an independent tally, read for display.
#[derive(Debug, Default)]
pub struct Counters {
    /// Inner packets received from the peer and written to the TUN device, and their bytes.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Inner packets read from the TUN device, sealed and sent, and their bytes.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub keepalives_tx: AtomicU64,
    pub keepalives_rx: AtomicU64,
    /// "Unknown session" notices sent (gateway) or received (client).
    pub notices_tx: AtomicU64,
    pub notices_rx: AtomicU64,
    /// Nudges handed to the supervisor (client).
    pub nudges: AtomicU64,
    /// Inner packets written to the TUN device merged into the packet before them (GRO): with
    /// `rx_packets`, how well coalescing works.
    pub rx_coalesced: AtomicU64,
    /// Authenticated datagrams that came from a new endpoint (gateway: roaming).
    pub roams: AtomicU64,
    /// Path MTU probes (gateway): authenticated probes received, acks sent, and acks the
    /// gateway-wide rate limit withheld (the client sees a loss and probes again).
    pub probes_rx: AtomicU64,
    pub probe_acks_tx: AtomicU64,
    pub probe_acks_withheld: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// How many times each loop started. The spec wants exactly one start each per process.
    pub tx_loop_starts: AtomicU64,
    pub rx_loop_starts: AtomicU64,
    /// Failed attempts to create the TUN device.
    pub tun_failures: AtomicU64,
    /// The TUN device's interface index, 0 until it exists.
    pub tun_ifindex: AtomicU32,
}

/// Adds one to a counter.
#[inline]
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts one drop.
    #[inline]
    pub fn count_drop(&self, why: DropReason) {
        bump(&self.drops[why as usize]);
    }

    /// Counts `n` drops.
    #[inline]
    pub fn count_drops(&self, why: DropReason, n: usize) {
        if n > 0 {
            Self::add(&self.drops[why as usize], n);
        }
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts one packet of `len` bytes on a (packets, bytes) pair.
    #[inline]
    pub fn packet(packets: &AtomicU64, bytes: &AtomicU64, len: usize) {
        bump(packets);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// A consistent-enough copy for display (each counter read once).
    pub fn stats(&self) -> Stats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            tx_packets: r(&self.tx_packets),
            tx_bytes: r(&self.tx_bytes),
            keepalives_tx: r(&self.keepalives_tx),
            keepalives_rx: r(&self.keepalives_rx),
            notices_tx: r(&self.notices_tx),
            notices_rx: r(&self.notices_rx),
            nudges: r(&self.nudges),
            rx_coalesced: r(&self.rx_coalesced),
            roams: r(&self.roams),
            probes_rx: r(&self.probes_rx),
            probe_acks_tx: r(&self.probe_acks_tx),
            probe_acks_withheld: r(&self.probe_acks_withheld),
            drops: std::array::from_fn(|i| r(&self.drops[i])),
            tx_loop_starts: r(&self.tx_loop_starts),
            rx_loop_starts: r(&self.rx_loop_starts),
            tun_failures: r(&self.tun_failures),
            tun_ifindex: self.tun_ifindex.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub keepalives_tx: u64,
    pub keepalives_rx: u64,
    pub notices_tx: u64,
    pub notices_rx: u64,
    pub nudges: u64,
    pub rx_coalesced: u64,
    pub roams: u64,
    pub probes_rx: u64,
    pub probe_acks_tx: u64,
    pub probe_acks_withheld: u64,
    pub drops: [u64; DropReason::ALL.len()],
    pub tx_loop_starts: u64,
    pub rx_loop_starts: u64,
    pub tun_failures: u64,
    pub tun_ifindex: u32,
}

impl Stats {
    /// The count of drops for one reason.
    pub fn dropped(&self, why: DropReason) -> u64 {
        self.drops[why as usize]
    }
}

/// One line, `key=value` pairs, stable so tests and scripts can parse it.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loop_starts=tx:{},rx:{} tun_ifindex={} rx_packets={} rx_bytes={} tx_packets={} \
             tx_bytes={} keepalives_tx={} keepalives_rx={} notices_tx={} notices_rx={} nudges={} \
             roams={} tun_failures={} rx_coalesced={} probes_rx={} probe_acks_tx={} probe_acks_withheld={}",
            self.tx_loop_starts,
            self.rx_loop_starts,
            self.tun_ifindex,
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.keepalives_tx,
            self.keepalives_rx,
            self.notices_tx,
            self.notices_rx,
            self.nudges,
            self.roams,
            self.tun_failures,
            self.rx_coalesced,
            self.probes_rx,
            self.probe_acks_tx,
            self.probe_acks_withheld
        )?;
        for why in DropReason::ALL {
            write!(f, " drop_{}={}", why.name(), self.dropped(why))?;
        }
        Ok(())
    }
}

/// What the TUN device is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSpec {
    /// Interface name; `None` lets the kernel pick (`tun0`, `tun1`, ...).
    pub name: Option<String>,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The IPv6 tunnel address and prefix length, when the session has them.
    pub address6: Option<(Ipv6Addr, u8)>,
    pub mtu: u16,
    /// TSO/GRO offload (virtio-net headers): 64 KiB reads and coalesced writes.
    pub offload: bool,
}

/// A TUN device that is up, and what the logs and the status feed show of it. The device is
/// non-blocking and registered with no reactor: an engine waits on it in its own `epoll_wait`
/// (see [`crate::packet_thread::Poller`]).
pub struct Tun {
    pub device: SyncDevice,
    pub name: String,
    pub ifindex: u32,
    pub mtu: u16,
}

/// The TUN MTU for an underlay MTU: one sealed inner packet fits one underlay UDP packet of the
/// underlay's family (an IPv6 header is 20 bytes longer than an IPv4 one).
pub fn tun_mtu(underlay_mtu: u16, underlay: IpFamily) -> Result<u16, TunError> {
    wire::tun_mtu_over(underlay_mtu, underlay).ok_or(TunError::UnderlayMtu(underlay_mtu))
}

/// Why a TUN device could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The underlay MTU leaves less than the IPv4 minimum for inner packets.
    #[error("underlay MTU {0} is too small for the tunnel overhead")]
    UnderlayMtu(u16),
    /// The kernel refused (no /dev/net/tun, no CAP_NET_ADMIN, name taken, ...).
    #[error("cannot create TUN device {name} ({address}/{prefix_len}): {source}")]
    Create { name: String, address: Ipv4Addr, prefix_len: u8, source: io::Error },
    /// IPv6 needs links of at least 1280 bytes (RFC 8200); the kernel refuses IPv6 on a smaller
    /// one, so the tunnel cannot carry it.
    #[error("TUN MTU {0} is below the IPv6 minimum of 1280: raise the underlay MTU")]
    MtuTooSmallForIpv6(u16),
}

/// Whether IPv6 is turned off in the calling thread's network namespace
/// (`net.ipv6.conf.{all,default}.disable_ipv6 = 1`, or no IPv6 in the kernel at all). Then the
/// kernel refuses an IPv6 address or route on any new device (EACCES), so both sides run the
/// tunnel IPv4 only rather than fail to bring it up.
pub fn ipv6_disabled() -> bool {
    ["all", "default"].iter().any(|conf| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"))
            .map_or(true, |v| v.trim() == "1")
    })
}

/// The smallest link MTU IPv6 allows (RFC 8200, section 5).
pub const MIN_IPV6_MTU: u16 = icmp::IPV6_MIN_MTU as u16;

/// Whether device `name` has IPv6 now (in the calling thread's namespace). Linux removes a
/// device's IPv6 state (addresses, routes, its `conf` entry) when its MTU goes below
/// [`MIN_IPV6_MTU`] and creates it afresh, empty, when the MTU is raised again.
pub fn device_has_ipv6(name: &str) -> bool {
    !ipv6_disabled() && !name.contains('/') && std::path::Path::new("/proc/sys/net/ipv6/conf").join(name).exists()
}

/// Creates, addresses and brings up a TUN device. Blocking ioctls (a few microseconds): fine to
/// call from a task that does nothing else meanwhile.
pub fn create_tun(spec: &TunSpec) -> Result<Tun, TunError> {
    let fail = |source: io::Error| TunError::Create {
        name: spec.name.clone().unwrap_or_else(|| "(kernel-chosen)".into()),
        address: spec.address,
        prefix_len: spec.prefix_len,
        source,
    };
    if spec.address6.is_some() && spec.mtu < MIN_IPV6_MTU {
        return Err(TunError::MtuTooSmallForIpv6(spec.mtu));
    }
    let mut builder =
        DeviceBuilder::new().ipv4(spec.address, spec.prefix_len, None).mtu(spec.mtu).offload(spec.offload);
    // A TUN device is point-to-point without a hardware address: the kernel runs no duplicate
    // address detection on it, so the address is usable at once.
    if let Some((address6, prefix6)) = spec.address6 {
        builder = builder.ipv6(address6, prefix6);
    }
    if let Some(name) = &spec.name {
        builder = builder.name(name.clone());
    }
    let device = builder.build_sync().map_err(fail)?;
    device.set_nonblocking(true).map_err(fail)?;
    let name = device.name().map_err(fail)?;
    let ifindex = device.if_index().map_err(fail)?;
    let mtu = device.mtu().map_err(fail)?;
    limit_tso(&device, ifindex, mtu);
    Ok(Tun { device, name, ifindex, mtu })
}

/// Sets the MTU of a TUN device that is in use, and with it the largest TSO packet it takes
/// ([`tso_limit`]).
pub fn set_tun_mtu(device: &SyncDevice, mtu: u16) -> io::Result<()> {
    device.set_mtu(mtu)?;
    if let Ok(ifindex) = device.if_index() {
        limit_tso(device, ifindex, mtu);
    }
    Ok(())
}

/// [`set_tso_limit`] for a device with offload (without, the kernel sends it no TSO packets).
/// Best effort: a kernel that refuses leaves the 64 KiB default, which only costs throughput,
/// so the refusal is a debug line, not a warning.
fn limit_tso(device: &SyncDevice, ifindex: u32, mtu: u16) {
    let limit = tso_limit(mtu);
    if device.tcp_gso()
        && let Err(e) = set_tso_limit(ifindex, limit)
    {
        tracing::debug!(target: "holdfast::dataplane", "cannot limit TSO packets on the TUN device to {limit} bytes: {e}");
    }
}

/// [`create_tun`], retrying for up to `within` while the name is busy: a device of the same name
/// that its previous owner just closed (a restart) is unregistered by the kernel asynchronously.
pub async fn create_tun_retrying(spec: &TunSpec, within: Duration) -> Result<Tun, TunError> {
    let end = Instant::now() + within;
    loop {
        match create_tun(spec) {
            Err(TunError::Create { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Binds a UDP socket with large buffers. Non-blocking, registered with no reactor: an engine
/// waits on it in its own `epoll_wait` (see [`crate::packet_thread::Poller`]).
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    grow_buffer(&sock, Buffer::Recv, SOCKET_BUFFER);
    grow_buffer(&sock, Buffer::Send, SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    dual_stack(&sock, addr)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// One of a socket's two buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    Recv,
    Send,
}

/// Asks for `size` bytes of a socket's buffer: past `net.core.rmem_max` / `wmem_max` where the
/// process may (`SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, CAP_NET_ADMIN), else up to that limit
/// (`SO_RCVBUF` / `SO_SNDBUF`). Debian's default limit is 208 KiB, a small part of what a
/// burst at a few Gbit/s needs. Best effort: a smaller buffer drops more of a burst, which costs
/// throughput, not correctness.
pub fn grow_buffer(sock: &impl AsRawFd, which: Buffer, size: usize) {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    let (force, plain) = match which {
        Buffer::Recv => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    if setsockopt_int(sock, libc::SOL_SOCKET, force, value).is_err() {
        let _ = setsockopt_int(sock, libc::SOL_SOCKET, plain, value);
    }
}

/// Path MTU discovery on a data-plane socket: datagrams go out with DF set whatever the kernel's
/// cached path MTU says (`IP_PMTUDISC_PROBE`, and its IPv6 twin), so a probe may exceed a
/// size the kernel learnt (it is how we learn the path grew back) and nothing is fragmented
/// behind our back (a fragmented probe would confirm a size the path does not carry). With
/// `recv_errors`, ICMP "fragmentation needed"/"packet too big" and local EMSGSIZE are queued on
/// the socket's error queue (`IP_RECVERR`), read by [`read_mtu_errors`]. Sets the options of
/// the socket's family, and of IPv4 too on an IPv6 socket (a dual-stack socket carries both).
pub fn set_path_mtu_probing(sock: &(impl AsFd + AsRawFd), recv_errors: bool) -> io::Result<()> {
    let ipv6 = socket2::SockRef::from(sock).local_addr()?.is_ipv6();
    if ipv6 {
        setsockopt_int(sock, libc::SOL_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE)?;
        if recv_errors {
            setsockopt_int(sock, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?;
        }
    }
    // On an IPv6-only socket the IPv4 options fail harmlessly; on a dual-stack one they apply
    // to its IPv4 peers.
    let v4 = setsockopt_int(sock, libc::SOL_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE)
        .and_then(|()| if recv_errors { setsockopt_int(sock, libc::SOL_IP, libc::IP_RECVERR, 1) } else { Ok(()) });
    if ipv6 { Ok(()) } else { v4 }
}

/// Sets one integer socket option on `sock` (any socket: the data plane's, the resolver's).
pub fn setsockopt_int(
    sock: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// What an error-queue entry says about the path MTU further along: the MTU of the hop that
/// refused a datagram, for an ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6);
/// `None` for any other error (unreachable ports and hosts, ...). A local EMSGSIZE is not a
/// hint: it is about our own link, which the underlay watcher follows (taken as a mid-path
/// bound, it would hold the path small after the link grew back).
pub fn mtu_of_error(e: &libc::sock_extended_err) -> Option<u16> {
    const ICMP_DEST_UNREACH: u8 = 3;
    const ICMP_FRAG_NEEDED: u8 = 4;
    const ICMPV6_PKT_TOOBIG: u8 = 2;
    let mtu = match e.ee_origin {
        libc::SO_EE_ORIGIN_ICMP if e.ee_type == ICMP_DEST_UNREACH && e.ee_code == ICMP_FRAG_NEEDED => e.ee_info,
        libc::SO_EE_ORIGIN_ICMP6 if e.ee_type == ICMPV6_PKT_TOOBIG => e.ee_info,
        _ => return None,
    };
    // 0 (an old router that does not say) tells us nothing usable.
    u16::try_from(mtu).ok().filter(|&m| m > 0)
}

/// The most error-queue entries one [`read_mtu_errors`] call reads: it runs in a loop's task,
/// and a flood of ICMP must not hold it.
pub const MAX_ERRORS_PER_READ: usize = 64;

/// Reads the socket's error queue (without blocking, at most [`MAX_ERRORS_PER_READ`] entries)
/// and calls `hint(destination, mtu)` for each path MTU error (see [`mtu_of_error`]); other
/// errors are read and dropped, so the queue never fills. Returns how many entries were read.
pub fn read_mtu_errors(sock: &impl AsRawFd, mut hint: impl FnMut(SocketAddr, u16)) -> usize {
    let mut read = 0;
    while read < MAX_ERRORS_PER_READ {
        // SAFETY: all-zero is a valid sockaddr_storage (plain integers).
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // The offending datagram's start is copied here; we only want the error.
        let mut data = [0u8; 64];
        let mut control = [0u64; 16];
        let (n, msg) = recvmsg_into(sock, &mut addr, &mut data, &mut control, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT);
        // SAFETY: the cmsg walk stays inside `control` (alive, untouched since the kernel filled
        // it), and the extended error is read unaligned from a cmsg whose length was checked
        // to hold one.
        let entry = unsafe {
            if n.is_err() {
                None
            } else {
                let mut mtu = None;
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
                    let ours = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                        || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
                    let room = (*cmsg).cmsg_len as usize
                        >= libc::CMSG_LEN(std::mem::size_of::<libc::sock_extended_err>() as u32) as usize;
                    if ours && room {
                        let e = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>());
                        mtu = mtu_of_error(&e);
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
                Some((socket_addr(&addr), mtu))
            }
        };
        let Some((dest, mtu)) = entry else { break };
        read += 1;
        if let (Some(dest), Some(mtu)) = (dest, mtu) {
            hint(dest, mtu);
        }
    }
    read
}

/// A socket about to bind `[::]` takes IPv4 peers too (one socket, both families), whatever the
/// host's `net.ipv6.bindv6only` default: a gateway's default `listen` must reach every client.
pub fn dual_stack(sock: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)?;
    }
    Ok(())
}

/// The largest inner packet a loop's buffer holds. Inner packets are at most the TUN MTU, which
/// is at most 65535; a buffer for the maximum costs 64 KiB once per loop and removes every "what
/// if the MTU changed" case.
pub const MAX_INNER: usize = 65535;

/// One loop's reusable datagram buffer: header room in front, tag room behind.
pub fn datagram_buffer() -> Vec<u8> {
    vec![0u8; wire::OVERHEAD + MAX_INNER]
}

/// A token bucket: `burst` events at once, refilled at `per_second`. Time is passed in, so tests
/// drive it without a clock.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimit {
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { per_second, burst, tokens: burst, last: None }
    }

    /// At most one event per `interval` (a bucket of one).
    pub fn every(interval: Duration) -> Self {
        let per_second = if interval.is_zero() { f64::INFINITY } else { 1.0 / interval.as_secs_f64() };
        Self::new(per_second, 1)
    }

    /// Whether an event may happen at `now`; takes a token if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A delay that doubles with each failure in a row, from `min` up to `max`: the one schedule of
/// every retry in the client and the data planes (IO errors in the loops, bringing the data plane
/// up, re-creating a deleted TUN device, the client's routes and DNS).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    /// The pause after one more failure: `min` after the first, then twice the previous, at most
    /// `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The pause the next failure will get (for a log line that says how long).
    pub fn upcoming(&self) -> Duration {
        self.next
    }

    /// Call after a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Waits [`Self::next_delay`]; false if a stop was requested first.
    pub async fn pause_unless_stopped(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop_requested(stop) => false,
        }
    }
}

/// Doubling delay for a loop whose IO keeps failing, so a persistent error (a deleted device, a
/// socket in a bad state) costs a few wake-ups per second instead of a spinning core.
#[derive(Debug, Clone)]
pub struct ErrorBackoff {
    delay: Backoff,
    /// Consecutive failures; the first few retry at once (a transient ENOBUFS, say).
    streak: u32,
}

impl ErrorBackoff {
    /// Failures retried immediately before the backoff starts.
    const FREE_RETRIES: u32 = 8;

    pub fn new(min: Duration, max: Duration) -> Self {
        Self { delay: Backoff::new(min, max), streak: 0 }
    }

    /// Call after a success.
    pub fn reset(&mut self) {
        self.streak = 0;
        self.delay.reset();
    }

    /// Call after a failure; returns how long to wait before the next attempt (zero at first).
    pub fn failed(&mut self) -> Duration {
        self.streak = self.streak.saturating_add(1);
        if self.streak <= Self::FREE_RETRIES {
            return Duration::ZERO;
        }
        self.delay.next_delay()
    }
}

/// Resolves when a stop was requested (or the stop sender is gone). The `Ref` that `wait_for`
/// returns is not `Send`, so it must not live across the caller's `select!`.
pub async fn stop_requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Whether a stop was requested (or can no longer be: its sender is gone), without waiting: what
/// [`stop_requested`] would return at once for. For an engine woken by its `Wakeup`.
pub fn stopped(rx: &tokio::sync::watch::Receiver<bool>) -> bool {
    *rx.borrow() || rx.has_changed().is_err()
}

/// Logs the data plane's counters on every SIGUSR1 ([`crate::logging::stats_on_sigusr1`]): the
/// data plane never logs per packet, so this is how its drop counts are read from outside.
pub fn log_stats_on_sigusr1(
    what: &'static str,
    counters: std::sync::Arc<Counters>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    crate::logging::stats_on_sigusr1(what, move || counters.stats())
}

/// Describes a failing socket operation for the one log line it may get: the errno name when
/// there is one (what an operator greps for), else the error text.
pub fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => "ENETUNREACH (network unreachable)".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH (host unreachable)".into(),
        Some(libc::EPERM) => "EPERM (refused by a firewall rule)".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED (port unreachable)".into(),
        Some(libc::ENOBUFS) => "ENOBUFS (queue full)".into(),
        _ => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Batching: UDP GSO/GRO on the socket, offload (TSO/GRO) on the TUN device.
// ---------------------------------------------------------------------------------------------

/// Most packets one loop iteration handles: a 64 KiB TSO/GRO super-packet of 1436-byte
/// segments is 46 of them, and the kernel caps a UDP GSO send at 64 segments.
pub const BATCH: usize = 64;

/// Largest UDP payload of one `sendmsg`, GSO or not (IPv4 total length minus IP and UDP
/// headers).
const MAX_UDP_SEND: usize = 65507;

/// Linux `UDP_SEGMENT` and `UDP_GRO` (uapi/linux/udp.h; not in the libc crate for glibc).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Slots of a loop's TUN reader ([`TunReader`]): a batch may hold more than one read. Packets
/// already queued behind the one that woke the loop are read into the free slots (see
/// [`TunReader::try_read`]), and each such read needs [`BATCH`] free slots, as the first one does.
pub const READ_SLOTS: usize = 2 * BATCH;

/// Most datagrams in one UDP GSO send: the kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.9,
/// 128 since). More would be refused with EINVAL, which [`send_gso`] takes for "no GSO here".
const MAX_GSO_SEGMENTS: usize = 64;

/// Room for a TUN packet read with offload: the virtio-net header and a 64 KiB super-packet.
pub const TUN_READ_BUFFER: usize = segment::VNET_HDR_LEN + 65535;

/// The headers [`tso_limit`] allows for in every segment: an IPv6 header and a TCP header with
/// the timestamp option (40 + 32 bytes), the largest that bulk TCP normally carries.
const TSO_HEADROOM: usize = 72;

/// The largest TSO packet (`gso_max_size`) a TUN device of `mtu` should take from the kernel: one
/// whose segments, sealed, fit one GSO send (`MAX_UDP_SEND` bytes, `MAX_GSO_SEGMENTS`
/// datagrams).
///
/// Why: the kernel's TCP builds 64 KiB TSO packets by default, 47 segments at a 1436-byte MTU,
/// while one GSO send carries 44 sealed datagrams of 1472 bytes. Every such packet left in two
/// sends, 44 datagrams and then 3: twice the syscalls at the sender and, at the receiver, twice
/// the GRO receives and often two wake-ups for one packet's worth. Capped at 44 segments' worth,
/// each TSO packet is one send. Measured (`benches/throughput.sh`'s headline setup, 6 s runs
/// alternating with and without, 2-vCPU AMD EPYC): CPU per GB, both ends, 1.52–1.64 against
/// 1.59–1.74 up and 1.45–1.50 against 1.57–1.65 down. Segments with larger headers than
/// `TSO_HEADROOM` (IP or TCP options) may still spill one datagram into a second send.
pub fn tso_limit(mtu: u16) -> u32 {
    let mtu = usize::from(mtu);
    let per_send = (MAX_UDP_SEND / (mtu + wire::OVERHEAD)).clamp(1, MAX_GSO_SEGMENTS);
    let headers = TSO_HEADROOM.min(mtu);
    // At most 64 * 65535: no overflow; the kernel's own default (64 KiB) is the ceiling.
    (per_send * (mtu - headers) + headers).min(65536) as u32
}

/// Sets the largest TSO packet the kernel hands TUN device `ifindex` (`IFLA_GSO_MAX_SIZE`, what
/// `ip link set DEV gso_max_size N` sets), in the calling thread's network namespace. Linux
/// 5.19 and later; an older kernel refuses it, which costs throughput, not correctness.
pub fn set_tso_limit(ifindex: u32, size: u32) -> io::Result<()> {
    use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
    use rtnetlink::sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_ROUTE};

    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    link.attributes.push(LinkAttribute::GsoMaxSize(size));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)));
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);

    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&NlAddr::new(0, 0))?;
    // The kernel answers at once; a bound keeps a kernel that never did from hanging the caller.
    socket2::SockRef::from(&sock).set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send(&bytes, 0)?;
    let mut reply = vec![0u8; 4096];
    let n = sock.recv(&mut &mut reply[..], 0)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match answer.payload {
        NetlinkPayload::Error(e) => match e.code {
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(()),
        },
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "netlink: no acknowledgement")),
    }
}

/// Asks the kernel to hand us coalesced UDP datagrams (one `recvmsg`, many datagrams of one
/// size, the last maybe shorter). Best effort: without it we get one datagram per call.
pub fn enable_udp_gro(sock: &impl AsRawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// One `recvmsg` on `sock` into `buf`, with the sender's address in `addr` and control messages
/// in `control`. Returns the byte count (or the error) and the header the kernel filled, whose
/// control messages the caller walks (its pointers point into `addr`, `buf` and `control`, so
/// it is only meaningful while they live and are left as they are).
fn recvmsg_into(
    sock: &impl AsRawFd,
    addr: &mut libc::sockaddr_storage,
    buf: &mut [u8],
    control: &mut [u64],
    flags: libc::c_int,
) -> (io::Result<usize>, libc::msghdr) {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: all-zero is a valid msghdr; every pointer set below points into the borrows and
    // `iov`, all alive for the call, with the lengths given; the kernel writes at most those.
    // `iov` dies here, but the caller only reads the control messages, never the iovec.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(control) as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, flags);
        let n = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
        msg.msg_iov = std::ptr::null_mut();
        msg.msg_iovlen = 0;
        (n, msg)
    }
}

/// Receives one (possibly coalesced) datagram batch into `buf`, without waiting (`WouldBlock`
/// when nothing is queued): returns its length, the size of each datagram in it (all equal but
/// the last, which may be shorter) and the sender.
pub fn recv_gro(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
    recvmsg_gro(sock, buf)
}

fn recvmsg_gro(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
    // SAFETY: all-zero is a valid sockaddr_storage (plain integers).
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 8];
    let (n, msg) = recvmsg_into(sock, &mut addr, buf, &mut control, 0);
    let n = n?;
    // SAFETY: the cmsg walk stays inside `control` (alive, and not touched since the kernel
    // filled it), as CMSG_NXTHDR checks against the lengths the kernel set in `msg`.
    unsafe {
        let mut segment = n;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if size > 0 {
                    segment = size as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let from = socket_addr(&addr).ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        Ok((n, segment.max(1), from))
    }
}

/// The IP socket address in a `sockaddr_storage` the kernel filled.
fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            // An IPv4 peer of a dual-stack socket arrives as ::ffff:a.b.c.d. Kept as the IPv4
            // address it is, so logs and endpoint comparisons see one form; sending to it on the
            // same socket works either way (the kernel takes IPv4 destinations on it).
            let ip = match ip.to_ipv4_mapped() {
                Some(v4) => std::net::IpAddr::V4(v4),
                None => std::net::IpAddr::V6(ip),
            };
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

/// Sends `buf`, datagrams of `segment` bytes each (the last may be shorter), to `dest` in one
/// call with UDP GSO. `gso` starts true and turns false for good if the kernel refuses GSO; the
/// datagrams then go one by one. A refusal because the segments no longer fit the link (it
/// just shrank) does not count as "no GSO": that run goes one by one, GSO stays on.
///
/// For a socket no reactor knows (the engines'): a full send buffer is waited out in `poll`
/// (see [`writable_now`]), and the route's settling in a sleep.
pub fn send_gso(
    sock: &impl AsRawFd,
    gso: &mut bool,
    buf: &[u8],
    segment: usize,
    dest: SocketAddr,
    unreachable: Unreachable,
) -> Result<(), RunFailed> {
    if buf.len() <= segment || !*gso {
        return send_each(sock, buf, segment, dest, unreachable).map(drop);
    }
    let sent = past_reports(unreachable, || writable_now(sock, || sendmsg_gso(sock, buf, segment, dest)));
    match sent {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
            // Either no UDP GSO here (old kernel, a device without it), or, for EINVAL, segments
            // bigger than the link lets out (older kernels check a GSO send's segment size
            // against it and refuse the whole send; the link just shrank, the TUN MTU follows a
            // moment later). Sent one by one either way; in the second case some of them are
            // too big for the link too (see `send_each`), and GSO stays on for the runs that
            // follow.
            let too_big = send_each(sock, buf, segment, dest, unreachable)?;
            if !too_big {
                *gso = false;
            }
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
            // Segments bigger than the path: it just shrank, and the TUN MTU follows a moment
            // later. Sent one by one (see `send_each`). Also the case where the EMSGSIZE was an
            // ICMP "too big" reported through this send (IP_RECVERR).
            send_each(sock, buf, segment, dest, unreachable).map(drop)
        }
        // A GSO send is all or nothing.
        other => other.map_err(|error| RunFailed { sent: 0, error }),
    }
}

/// A run's send that failed after `sent` of its datagrams had gone out (one by one; a GSO send
/// is all or nothing, so 0 there). The rest of the run was not sent.
#[derive(Debug)]
pub struct RunFailed {
    pub sent: usize,
    pub error: io::Error,
}

/// Sends `buf`'s datagrams of `segment` bytes one by one. One refused with EMSGSIZE is sent
/// again with fragments allowed ([`send_fragmentable`]): it is bigger than a path that just
/// shrank (the TUN MTU follows a moment later), or the EMSGSIZE was an earlier ICMP "too big"
/// reported through this send (IP_RECVERR sets the socket's error until the prober reads its
/// queue; the report clears it). Either way the datagram goes, not dropped. Returns whether any
/// was refused so. Stops at the first datagram that fails: what failed it (an unreachable
/// destination, after its wait) would fail the rest too.
fn send_each(
    sock: &impl AsRawFd,
    buf: &[u8],
    segment: usize,
    dest: SocketAddr,
    unreachable: Unreachable,
) -> Result<bool, RunFailed> {
    let mut too_big = false;
    for (sent, d) in buf.chunks(segment.max(1)).enumerate() {
        let result = match past_reports(unreachable, || writable_now(sock, || sendto(sock, d, dest))) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                too_big = true;
                send_fragmentable(sock, d, dest)
            }
            other => other,
        };
        if let Err(error) = result {
            return Err(RunFailed { sent, error });
        }
    }
    Ok(too_big)
}

/// Whether a send failed with an ICMP error that an earlier datagram drew. On a socket with
/// `IP_RECVERR` (the client's, for path MTU discovery) the kernel records every ICMP error it gets
/// for the socket's datagrams, and the next send returns it instead of sending, once (a host
/// unreachable while a neighbour entry was being resolved, a port unreachable from a gateway that
/// was restarting). Nothing of that send went out, so it is tried once more: one such error
/// otherwise cost a whole GSO run (up to 64 datagrams). A destination that stays unreachable
/// fails the second try too, and is counted then. EMSGSIZE is handled apart (the datagram is
/// sent fragmentable).
pub fn reported_for_earlier(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ECONNREFUSED | libc::EHOSTDOWN))
}

/// A send that still finds its destination unreachable right after the retry above waits this
/// long and tries a last time: the route to the gateway is being changed (the client's route
/// watcher re-pins it when the path changes, and the host's own network software may replace
/// routes), which has been seen to leave it unreachable for about one send. A destination that
/// stays unreachable costs the loop this pause per send, while nothing gets through anyway.
const ROUTE_SETTLE: Duration = Duration::from_millis(2);

/// Whether a send failed because the route says the destination cannot be reached now.
fn unreachable_for_now(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EHOSTUNREACH | libc::ENETUNREACH))
}

/// What a send does when the route says its destination cannot be reached, right after the
/// retry past an earlier report ([`reported_for_earlier`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Waits `ROUTE_SETTLE` and tries a last time: the client, whose one destination is the
    /// gateway and whose route to it is re-pinned when the path changes. The wait is a sleep of
    /// the engine's thread: nothing else goes anywhere while the route is missing.
    Settle,
    /// Fails at once (counted): the gateway, where one client's missing route must not stall the
    /// engine that serves every other client.
    Fail,
}

/// Runs `send`, and again past an earlier datagram's ICMP report ([`reported_for_earlier`]):
/// once at once, and, with [`Unreachable::Settle`], once more after [`ROUTE_SETTLE`] if the
/// route still says unreachable.
fn past_reports<T>(unreachable: Unreachable, mut send: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut sent = send();
    if sent.as_ref().is_err_and(reported_for_earlier) {
        // Nothing of this send went out, for an earlier datagram's sake.
        sent = send();
        if unreachable == Unreachable::Settle && sent.as_ref().is_err_and(unreachable_for_now) {
            std::thread::sleep(ROUTE_SETTLE);
            sent = send();
        }
    }
    sent
}

/// How long a send on a descriptor no reactor knows waits for room (a full socket send buffer,
/// a TUN device that pushes back), at most, before the send counts as failed.
const WRITABLE_WAIT: Duration = Duration::from_millis(100);

/// Runs `op` (a non-blocking write to `fd`), waiting in `poll` for room and trying again while
/// it would block, for up to `WRITABLE_WAIT` in all. Rare: the kernel frees a UDP datagram's
/// buffer space as soon as the device takes it, and a TUN device queues what it is given.
pub fn writable_now<T>(fd: &impl AsRawFd, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    // The clock is read only once a write would block: not on every send.
    let mut end = None;
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let end = *end.get_or_insert_with(|| std::time::Instant::now() + WRITABLE_WAIT);
                let left = end.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd, alive for the call.
                if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// One non-blocking `sendto` of `d` to `dest` on `sock`.
fn sendto(sock: &impl AsRawFd, d: &[u8], dest: SocketAddr) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(dest);
    // SAFETY: `d` and `addr` are alive for the call, with the lengths passed.
    let n = unsafe {
        libc::sendto(sock.as_raw_fd(), d.as_ptr().cast(), d.len(), libc::MSG_DONTWAIT, addr.as_ptr().cast(), addr.len())
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One datagram to `dest` on a socket no reactor knows (keepalives, probes, the gateway's
/// notices and acks), waiting for room as [`writable_now`] does, and sent once more if the send
/// returned a report for an earlier datagram instead ([`reported_for_earlier`]): a keepalive or
/// a probe lost to an old "port unreachable" would otherwise count as a failed send, or a lost
/// probe. Never the route's wait ([`Unreachable::Fail`]): a prober's task must not sleep.
pub fn send_to_now(sock: &impl AsRawFd, d: &[u8], dest: SocketAddr) -> io::Result<usize> {
    past_reports(Unreachable::Fail, || writable_now(sock, || sendto(sock, d, dest)))
}

/// One non-blocking `write` of a whole packet to a TUN device, waiting for room as
/// [`writable_now`] does.
pub fn write_tun_now(tun: &impl AsRawFd, packet: &[u8]) -> io::Result<()> {
    writable_now(tun, || {
        // SAFETY: `packet` is alive for the call, with the length passed.
        let n = unsafe { libc::write(tun.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    })
}

/// Sends `d` once with local fragmentation allowed, on a socket that otherwise sets DF for path
/// MTU discovery ([`set_path_mtu_probing`]): the socket's mode is switched for this one send and
/// put back at once, with no await in between. Only for data caught by a link that just shrank
/// (rare: the TUN MTU follows within milliseconds), which is better fragmented than lost. A
/// probe the prober sends in those microseconds could be fragmented too; the next confirmation
/// catches what that got wrong. The send goes past earlier datagrams' reports
/// ([`past_size_reports`]).
fn send_fragmentable(sock: &impl AsRawFd, d: &[u8], dest: SocketAddr) -> io::Result<usize> {
    let (level, name, want) = match dest {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_WANT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT),
    };
    let mut before: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a c_int out-value of the size passed.
    let rc =
        unsafe { libc::getsockopt(sock.as_raw_fd(), level, name, (&mut before as *mut libc::c_int).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    setsockopt_int(sock, level, name, want)?;
    let sent = past_size_reports(|| writable_now(sock, || sendto(sock, d, dest)));
    setsockopt_int(sock, level, name, before)?;
    sent
}

/// How many times [`past_size_reports`] sends, at most: one report per datagram of a GSO run
/// that met the shrunken link, and one try more.
const SIZE_REPORTS_PASSED: usize = MAX_GSO_SEGMENTS + 1;

/// Runs `send` (a datagram sent with fragments allowed) again while it fails with EMSGSIZE, up
/// to [`SIZE_REPORTS_PASSED`] times. With fragments allowed no datagram of ours is too big, so
/// that error is a report for an earlier one: a GSO run that passed the size check before the
/// link shrank and met the smaller device on its way out has each segment refused by the
/// kernel's output path, which sends the socket its own ICMP "fragmentation needed" per segment;
/// with `IP_RECVERR` each sets the socket's error, and each is returned by one later send
/// instead of sending. They arrive one by one from the loopback's softirq, so one retry is not
/// enough (seen: a whole 43-datagram run lost to a second report). Bounded, so a kernel that
/// did refuse the datagram costs a few dozen syscalls, once.
fn past_size_reports<T>(mut send: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut sent = send();
    for _ in 1..SIZE_REPORTS_PASSED {
        if !sent.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EMSGSIZE)) {
            break;
        }
        sent = send();
    }
    sent
}

fn sendmsg_gso(sock: &impl AsRawFd, buf: &[u8], segment: usize, dest: SocketAddr) -> io::Result<()> {
    let addr = socket2::SockAddr::from(dest);
    let segment = u16::try_from(segment).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the pointers point into `buf`, `addr` and the local control buffer, alive for the
    // call; the control buffer is large enough for one u16 cmsg (checked by CMSG_SPACE below).
    unsafe {
        let mut control = [0u64; 4];
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut _;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What [`TunReader`] reads from: a TUN device (its one implementation in the data plane), or a
/// scripted one in tests, which is how a failure between two reads of a batch is tested.
pub trait TunRead: Send + Sync + 'static {
    /// One read: a packet, or with offload a virtio-net header and a packet (`WouldBlock` when
    /// nothing is queued).
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Whether reads start with a virtio-net header (the device was opened with offload).
    fn offload(&self) -> bool;
}

impl TunRead for SyncDevice {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        SyncDevice::recv(self, buf)
    }

    fn offload(&self) -> bool {
        self.tcp_gso()
    }
}

/// A loop's TUN read side: one batch holds up to [`READ_SLOTS`] inner packets (from one read, a
/// TSO super-packet cut into its segments by [`segment::split`] when offload is on, else one
/// packet; more reads when more packets are already queued), each placed at
/// [`wire::HEADER_LEN`] in its own slot, so it can be sealed where it lies. A read has
/// [`BATCH`] slots of `stride` bytes; the segments of a TSO packet are laid closer, one sealed
/// segment apart (see [`TunReader::read_at`]). Buffers are allocated once.
pub struct TunReader {
    raw: Vec<u8>,
    slots: Vec<u8>,
    stride: usize,
    sizes: [usize; READ_SLOTS],
    /// Where slot `i` of the last batch begins in `slots`, and how long it is.
    starts: [usize; READ_SLOTS],
    spans: [usize; READ_SLOTS],
    /// Slot `i`'s TCP checksum holds the pseudo-header's sum only (see [`TunReader::checksums`]).
    csum_partial: [bool; READ_SLOTS],
    /// How the segments of a TSO packet leave the split.
    checksums: segment::Checksums,
    /// An error a read after the first one of a batch met, and the device it came from: the
    /// batch it ended is handed out first, the error with the next call on the same device. A
    /// loop that moved to a re-created device meanwhile never sees the old device's error, which
    /// would have it report the new one gone. Held as a `Weak`, which keeps the old device's
    /// allocation, so a new device can never sit at the same address and pass for it.
    deferred: Option<(Weak<dyn std::any::Any + Send + Sync>, io::Error)>,
    /// When the last batch's first read returned, and how close the next must follow for the
    /// device to count as busy (see [`TunReader::read`]).
    last_batch: Option<Instant>,
    busy_within: Duration,
}

/// A TUN device read again within this of the last batch is busy: packets are likely queued
/// behind the one that woke the loop (see [`TunReader::read`]). Under load batches come
/// microseconds apart; interactive traffic (keystrokes, a ping a second) is far slower.
const TUN_BUSY_WITHIN: Duration = Duration::from_millis(1);

impl TunReader {
    /// Slots for inner packets of up to `mtu` bytes.
    pub fn new(mtu: u16) -> Self {
        let stride = wire::OVERHEAD + usize::from(mtu);
        Self {
            raw: vec![0; TUN_READ_BUFFER],
            slots: vec![0; stride * READ_SLOTS],
            stride,
            sizes: [0; READ_SLOTS],
            starts: std::array::from_fn(|i| i * stride),
            spans: [stride; READ_SLOTS],
            csum_partial: [false; READ_SLOTS],
            checksums: segment::Checksums::Complete,
            deferred: None,
            last_batch: None,
            busy_within: TUN_BUSY_WITHIN,
        }
    }

    /// The same reader, counting the device as busy when read again within `d` of the last
    /// batch (default 1 ms). A test's knob: a long window makes the top-up reads certain.
    pub fn busy_within(mut self, d: Duration) -> Self {
        self.busy_within = d;
        self
    }

    /// How the segments of the TSO packets read from now on leave their TCP checksums: complete
    /// (the default), or partial for a peer that takes them, which saves summing every payload
    /// byte ([`segment::Checksums`]). [`TunReader::csum_partial`] tells which slots came out
    /// partial; one that goes to a peer without them must be finished first
    /// ([`segment::finish_partial`]).
    pub fn checksums(&mut self, checksums: segment::Checksums) {
        self.checksums = checksums;
    }

    /// Whether packet `i` of the last batch has a partial TCP checksum.
    pub fn csum_partial(&self, i: usize) -> bool {
        self.csum_partial[i]
    }

    /// The partial-checksum flag to seal packet `i` with, for a peer that takes partial
    /// checksums (`peer_takes_partial`) or not: a partial one going to a peer without them is
    /// finished here first (the reader's mode may have changed with the session since the read).
    /// `None`: it had to be finished and could not be, which a packet the split marked partial
    /// never is.
    pub fn seal_flag(&mut self, i: usize, peer_takes_partial: bool) -> Option<bool> {
        if !self.csum_partial[i] || peer_takes_partial {
            return Some(self.csum_partial[i]);
        }
        let at = self.starts[i] + wire::HEADER_LEN;
        segment::finish_partial(&mut self.slots[at..at + self.sizes[i]])?;
        self.csum_partial[i] = false;
        Some(false)
    }

    /// The largest inner packet a slot holds.
    pub fn capacity(&self) -> u16 {
        u16::try_from(self.stride - wire::OVERHEAD).unwrap_or(u16::MAX)
    }

    /// Makes the slots hold inner packets of `mtu` bytes (the TUN MTU is about to grow): one
    /// allocation per growth, never per packet; a smaller `mtu` keeps the slots as they are.
    /// The slots of the last batch are gone afterwards: call between batches.
    pub fn fit(&mut self, mtu: u16) {
        let stride = wire::OVERHEAD + usize::from(mtu);
        if stride > self.stride {
            self.slots = vec![0; stride * READ_SLOTS];
            self.stride = stride;
            self.sizes = [0; READ_SLOTS];
            self.starts = std::array::from_fn(|i| i * stride);
            self.spans = [stride; READ_SLOTS];
        }
    }

    /// Reads one batch without waiting (`WouldBlock` when nothing is queued; the device is
    /// non-blocking); returns how many packets it holds. After the first read,
    /// if the device is busy (this batch follows the last within 1 ms) and while [`BATCH`]
    /// slots are free, it reads again what is already queued, without waiting.
    ///
    /// Why: small packets come in bursts that a read takes one at a time: the TCP ACKs that a
    /// burst of writes into the device makes (about one per 64 KiB of a bulk transfer, queued
    /// while the same thread wrote), DNS answers, a game's updates. Read into one batch, a run
    /// of them leaves in one GSO send and reaches the peer as one GRO receive: one wake-up
    /// there instead of one per packet. Only when busy, because the read that finds nothing
    /// would delay a lone packet (a ping) by a microsecond or two.
    pub fn try_read<D: TunRead>(&mut self, tun: &Arc<D>) -> io::Result<usize> {
        if let Some(e) = self.deferred_for(tun) {
            return Err(e);
        }
        let n = self.read_at(&**tun, 0)?;
        Ok(self.top_up(tun, n))
    }

    /// The error a read of `tun` deferred, if it is this device's.
    fn deferred_for<D: TunRead>(&mut self, tun: &Arc<D>) -> Option<io::Error> {
        match self.deferred.take() {
            Some((from, e)) if std::ptr::eq(from.as_ptr().cast::<()>(), Arc::as_ptr(tun).cast::<()>()) => Some(e),
            _ => None,
        }
    }

    /// After a batch's first read of `n` packets: if the device is busy, what is already
    /// queued, without waiting, while [`BATCH`] slots are free. Returns the batch's size.
    fn top_up<D: TunRead>(&mut self, tun: &Arc<D>, mut n: usize) -> usize {
        let now = Instant::now();
        let busy = self.last_batch.is_some_and(|t| now.saturating_duration_since(t) <= self.busy_within);
        self.last_batch = Some(now);
        while busy && READ_SLOTS - n >= BATCH {
            match self.read_at(&**tun, n) {
                Ok(more) => n += more,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let from: Weak<D> = Arc::downgrade(tun);
                    self.deferred = Some((from, e));
                    break;
                }
            }
        }
        n
    }

    /// One read of `tun` into the [`BATCH`] slots from slot `first` on, cut into the packets it
    /// stands for (see [`segment`]): how many.
    ///
    /// The segments of a TSO packet go one sealed segment apart, not a slot apart: sealed, the
    /// full ones then lie end to end, as a GSO send takes them, and [`send_datagrams`] has
    /// nothing to move. Segments shorter than the TUN MTU are common (a peer that announced a
    /// smaller MSS, as one behind a gateway with a smaller tunnel MTU does); a slot apart, every
    /// one of them was moved before the send, a copy of the whole upload.
    fn read_at(&mut self, tun: &impl TunRead, first: usize) -> io::Result<usize> {
        let stride = self.stride;
        let base = first * stride;
        let slots = &mut self.slots[base..(first + BATCH) * stride];
        let sizes = &mut self.sizes[first..first + BATCH];
        if !tun.offload() {
            // No virtio-net header: one packet per read, straight into its slot.
            sizes[0] = tun.recv(&mut slots[wire::HEADER_LEN..stride])?;
            self.starts[first] = base;
            self.spans[first] = stride;
            self.csum_partial[first] = false;
            return Ok(1);
        }
        let len = tun.recv(&mut self.raw)?;
        let invalid = |e: segment::SplitError| io::Error::new(io::ErrorKind::InvalidData, e);
        let off = segment::Offload::parse(&self.raw[..len]).map_err(invalid)?;
        let packet = &self.raw[segment::VNET_HDR_LEN..len];
        // At most a slot: a segment too large for one is refused by the split.
        let step = segment::largest_segment(off, packet).map_or(stride, |l| (l + wire::OVERHEAD).min(stride));
        let mut out = segment::Slots { slots, stride: step, offset: wire::HEADER_LEN, sizes };
        let cut = segment::split_with(off, packet, &mut out, self.checksums).map_err(invalid)?;
        for k in 0..cut.packets {
            self.starts[first + k] = base + k * step;
            self.spans[first + k] = step;
            self.csum_partial[first + k] = cut.csum_partial;
        }
        Ok(cut.packets)
    }

    /// Length of packet `i` of the last batch.
    pub fn len(&self, i: usize) -> usize {
        self.sizes[i]
    }

    /// Slot `i`: the inner packet at `HEADER_LEN`, room for the header before and the tag after.
    pub fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.slots[self.starts[i]..self.starts[i] + self.spans[i]]
    }

    /// The inner packet `i` of the last batch.
    pub fn packet(&self, i: usize) -> &[u8] {
        let at = self.starts[i] + wire::HEADER_LEN;
        &self.slots[at..at + self.sizes[i]]
    }

    /// Sends sealed datagrams of this batch to `dest`: `lens[k]` bytes at the start of slot
    /// `first + k` (0 = dropped); see [`send_datagrams`].
    pub fn send(
        &mut self,
        sock: &impl AsRawFd,
        gso: &mut bool,
        first: usize,
        lens: &[usize],
        dest: SocketAddr,
        unreachable: Unreachable,
    ) -> Sent {
        let base = self.starts[first];
        let starts = &self.starts[first..];
        send_runs(sock, gso, &mut self.slots[base..], |k| starts[k] - base, lens, dest, unreachable)
    }
}

/// How many "too big" answers a loop writes back into the TUN device, at most: as the kernel
/// limits its own ICMP errors, so a flood of oversized packets cannot turn into a flood of
/// answers. Ample: one answer makes a TCP connection lower its segment size for ten minutes.
pub const TOO_BIG_PER_SECOND: f64 = 100.0;
/// Burst allowance of those answers (several connections learning the MTU at once).
pub const TOO_BIG_BURST: u32 = 20;

/// A loop's answer to inner packets bigger than the tunnel's usable MTU: an ICMP "fragmentation
/// needed" / "packet too big" ([`icmp::too_big`]) written back into the TUN device, so the
/// sender learns the size at once instead of retransmitting into a black hole. Rate-limited;
/// every such packet is counted as [`DropReason::TooBig`]. The answer buffer is allocated once.
pub struct TooBig {
    limit: RateLimit,
    /// A virtio-net header's room, then the answer.
    buf: Box<[u8; VNET_HDR_LEN + icmp::MAX_ANSWER]>,
}

impl Default for TooBig {
    fn default() -> Self {
        Self::new()
    }
}

impl TooBig {
    pub fn new() -> Self {
        Self {
            limit: RateLimit::new(TOO_BIG_PER_SECOND, TOO_BIG_BURST),
            buf: Box::new([0; VNET_HDR_LEN + icmp::MAX_ANSWER]),
        }
    }

    /// Counts `packet` (bigger than `mtu`) as dropped and, where the rules and the rate allow,
    /// returns the bytes to write to the device: the answer from `from`, behind a zeroed
    /// virtio-net header if the device has offload on (`vnet_header`). `None`: nothing to write
    /// (an IPv4 packet with DF clear, an ICMP error, hostile bytes, or over the rate).
    pub fn answer(
        &mut self,
        packet: &[u8],
        mtu: u16,
        from: IpAddr,
        vnet_header: bool,
        now: Instant,
        c: &Counters,
    ) -> Option<&[u8]> {
        c.count_drop(DropReason::TooBig);
        // The rules first (DF clear, ICMP errors, ...), so refused packets do not use up the rate.
        let (head, body) = self.buf.split_at_mut(VNET_HDR_LEN);
        let n = icmp::too_big(packet, mtu, from, body).ok()?;
        if !self.limit.allow(now) {
            return None;
        }
        // No GSO, checksum complete: a zeroed header says so.
        head.fill(0);
        Some(&self.buf[if vnet_header { 0 } else { VNET_HDR_LEN }..VNET_HDR_LEN + n])
    }

    /// [`TooBig::answer`], written to `tun` (see [`write_tun_now`]). A failed write is counted
    /// as a TUN error.
    pub fn send(&mut self, tun: &SyncDevice, packet: &[u8], mtu: u16, from: IpAddr, c: &Counters) {
        let vnet_header = tun.tcp_gso();
        if let Some(answer) = self.answer(packet, mtu, from, vnet_header, Instant::now(), c)
            && write_tun_now(tun, answer).is_err()
        {
            c.count_drop(DropReason::TunError);
        }
    }
}

/// A loop's TUN write side: inner packets collected from one UDP batch, then written.
///
/// With `coalesce` (and a device with TSO), consecutive TCP segments of a flow are merged into
/// large packets before they reach the kernel (GRO in user space, [`Coalescer`]): the kernel
/// then runs its receive path once per burst instead of once per 1.4 KB segment (measured with
/// `benches/throughput.sh`, both ends on one 2-core machine: 1.9 Gbit/s without, 3.1 with under
/// load from other builds, 5.9 on a quiet machine). Without it each packet is written on its
/// own when the device has offload on, behind a zeroed virtio-net header (no GSO, checksum
/// already complete), or one with `NEEDS_CSUM` for a packet whose TCP checksum the peer left
/// partial. The buffers are allocated once; nothing here allocates per packet.
pub struct TunWriter {
    co: Coalescer,
    /// The device wants a virtio-net header in front of every packet (offload on).
    vnet_header: bool,
    packets: usize,
    bytes: usize,
    /// `co.merged()` at the last flush, so each flush counts only its own merges.
    merged_counted: u64,
}

impl TunWriter {
    /// A writer for `tun`. Merging needs the device's TSO (it takes merged packets only behind
    /// a virtio-net header), so `coalesce` is ignored on a device without it.
    pub fn new(tun: &SyncDevice, coalesce: bool) -> Self {
        Self::with_offload(tun.tcp_gso(), coalesce)
    }

    /// As [`TunWriter::new`], for a device with (`vnet_header`) or without offload.
    pub fn with_offload(vnet_header: bool, coalesce: bool) -> Self {
        let co = Coalescer::new(BATCH, coalesce && vnet_header);
        Self {
            co: if vnet_header { co } else { co.headerless() },
            vnet_header,
            packets: 0,
            bytes: 0,
            merged_counted: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.co.is_full()
    }

    /// Queues `packet` (copied). Call [`TunWriter::flush`] first when full. `csum_partial`: its
    /// TCP checksum holds the pseudo-header's sum only (the datagram's flag said so); the
    /// kernel finishes it, or, on a device without offload, the writer does.
    pub fn push(&mut self, packet: &[u8], csum_partial: bool) -> Result<(), PushError> {
        self.co.push_with(packet, csum_partial)?;
        self.packets += 1;
        self.bytes += packet.len();
        Ok(())
    }

    /// What is queued, as the byte strings to write to the device ([`TunWriter::flush`] writes
    /// them; tests read them). The writer starts empty again at the next push.
    pub fn pending(&mut self) -> impl Iterator<Item = &[u8]> {
        (self.packets, self.bytes) = (0, 0);
        let from = if self.vnet_header { 0 } else { VNET_HDR_LEN };
        self.co.finish().map(move |p| &p[from..])
    }

    /// Writes what is queued and counts it in `c` (`rx_packets`, `rx_bytes`, `rx_coalesced`).
    /// Returns how many inner packets it held; on an error the rest of the batch is dropped
    /// (the caller counts the error). Each write as [`write_tun_now`].
    pub fn flush(&mut self, tun: &impl AsRawFd, c: &Counters) -> io::Result<usize> {
        let (packets, bytes) = (self.packets, self.bytes);
        let mut result = Ok(packets);
        for p in self.pending() {
            if let Err(e) = write_tun_now(tun, p) {
                result = Err(e);
                break;
            }
        }
        self.co.clear();
        let merged = self.co.merged() - std::mem::replace(&mut self.merged_counted, self.co.merged());
        if result.is_ok() && packets > 0 {
            Counters::add(&c.rx_packets, packets);
            Counters::add(&c.rx_bytes, bytes);
            c.rx_coalesced.fetch_add(merged, Ordering::Relaxed);
        }
        result
    }
}

/// What [`send_datagrams`] sent.
#[derive(Debug, Default)]
pub struct Sent {
    pub datagrams: usize,
    /// Inner bytes of the datagrams that went out.
    pub inner_bytes: usize,
    pub failed: usize,
    /// The last send error, for the loop's (rate-limited) log.
    pub error: Option<io::Error>,
}

/// Sealed datagrams lying at `big[i * stride..][..lens[i]]` for `i` in `range`, all for `dest`:
/// moves them together into runs a GSO send accepts (equal sizes, the last maybe shorter, at
/// most `MAX_UDP_SEND` bytes) and sends each run in one call. A zero length skips a slot.
pub fn send_datagrams(
    sock: &impl AsRawFd,
    gso: &mut bool,
    big: &mut [u8],
    stride: usize,
    lens: &[usize],
    dest: SocketAddr,
    unreachable: Unreachable,
) -> Sent {
    send_runs(sock, gso, big, |i| i * stride, lens, dest, unreachable)
}

/// [`send_datagrams`] with slot `i` at `big[at(i)..]` (see [`gather_run`]).
fn send_runs(
    sock: &impl AsRawFd,
    gso: &mut bool,
    big: &mut [u8],
    at: impl Fn(usize) -> usize,
    lens: &[usize],
    dest: SocketAddr,
    unreachable: Unreachable,
) -> Sent {
    let mut sent = Sent::default();
    let mut next = 0;
    while let Some(run) = gather_run(big, &at, lens, &mut next) {
        sent.count(&run, send_gso(sock, gso, &big[run.start..run.end], run.size, dest, unreachable));
    }
    sent
}

/// One GSO send's worth of datagrams, gathered end to end at `big[start..end]`.
struct Run {
    start: usize,
    end: usize,
    /// Each datagram's size (the last may be shorter).
    size: usize,
    count: usize,
}

impl Sent {
    fn count(&mut self, run: &Run, result: Result<(), RunFailed>) {
        let sent = match result {
            Ok(()) => run.count,
            Err(f) => {
                self.error = Some(f.error);
                f.sent.min(run.count)
            }
        };
        // Only a run's last datagram may be shorter, and a failure left at least that one unsent.
        let bytes = if sent == run.count { run.end - run.start } else { sent * run.size };
        self.datagrams += sent;
        self.inner_bytes += bytes - sent * wire::OVERHEAD;
        self.failed += run.count - sent;
    }
}

/// Gathers the next run from slot `*next` on (see [`send_datagrams`]; slot `j` begins at
/// `big[at(j)..]`, each at least its datagram's length after the one before) and moves `*next`
/// past it; `None` when no datagram is left.
fn gather_run(big: &mut [u8], at: impl Fn(usize) -> usize, lens: &[usize], next: &mut usize) -> Option<Run> {
    let mut i = *next;
    while i < lens.len() && lens[i] == 0 {
        i += 1;
    }
    if i >= lens.len() {
        *next = i;
        return None;
    }
    let size = lens[i];
    // Gather the run starting at slot i into big[at(i)..]; each move goes leftwards and never
    // over a slot not yet moved, because a datagram is never longer than the room to the next.
    let start = at(i);
    let mut end = start + size;
    let mut count = 1;
    let mut j = i + 1;
    while j < lens.len()
        && lens[j] != 0
        && lens[j] <= size
        && end - start + lens[j] <= MAX_UDP_SEND
        && count < MAX_GSO_SEGMENTS
    {
        // Full-sized datagrams already lie end to end (a TSO packet's segments are laid one
        // sealed segment apart): nothing to move then.
        if at(j) != end {
            big.copy_within(at(j)..at(j) + lens[j], end);
        }
        end += lens[j];
        count += 1;
        j += 1;
        if lens[j - 1] < size {
            break; // only the last datagram of a GSO send may be shorter
        }
    }
    *next = j;
    Some(Run { start, end, size, count })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the machine's limit with CAP_NET_ADMIN (the tests run as root in CI), up to it without.
    /// A plain `SO_RCVBUF` / `SO_SNDBUF` would stop at the limit either way.
    #[test]
    fn a_socket_buffer_grows_past_the_machines_limit_where_the_process_may() {
        let limit = |name: &str| -> usize {
            let text = std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap();
            text.trim().parse().unwrap()
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        for (which, max) in [(Buffer::Recv, limit("rmem_max")), (Buffer::Send, limit("wmem_max"))] {
            // Never bound: the options are the socket's own, no address is needed.
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            let want = max + (1 << 20);
            grow_buffer(&sock, which, want);
            let got = match which {
                Buffer::Recv => sock.recv_buffer_size().unwrap(),
                Buffer::Send => sock.send_buffer_size().unwrap(),
            };
            // The kernel keeps twice what it was asked for (room for its own bookkeeping).
            let expected = 2 * if root { want } else { max };
            assert_eq!(got, expected, "{which:?}: limit {max}, asked for {want}, root {root}");
        }
    }

    #[test]
    fn a_tso_packet_within_the_limit_is_one_gso_send() {
        assert_eq!(tso_limit(1436), 44 * (1436 - 72) + 72, "the bench's MTU: 44 datagrams of 1472 bytes");
        for mtu in (576..=9000).step_by(7).chain([1280, 1420, 1436, 1500, 65535]) {
            let limit = tso_limit(mtu) as usize;
            assert!(limit <= 65536, "mtu {mtu}");
            let datagram = usize::from(mtu) + wire::OVERHEAD;
            // Any header size from IPv4 without options up to TSO_HEADROOM: the segments fit one
            // send, in bytes and in count.
            for headers in [40, 52, 60, 72] {
                let mss = usize::from(mtu) - headers;
                let segments = (limit - headers).div_ceil(mss);
                assert!(segments <= MAX_GSO_SEGMENTS, "mtu {mtu}, headers {headers}: {segments} segments");
                assert!(segments * datagram <= MAX_UDP_SEND || segments == 1, "mtu {mtu}, headers {headers}");
            }
            // Not smaller than it need be: with the largest headers it is exactly one send's
            // worth of segments.
            let per_send = (MAX_UDP_SEND / datagram).clamp(1, MAX_GSO_SEGMENTS);
            let headers = TSO_HEADROOM.min(usize::from(mtu));
            let mss = usize::from(mtu) - headers;
            assert_eq!((limit - headers).div_ceil(mss), per_send, "mtu {mtu}");
        }
    }

    #[tokio::test]
    async fn the_sigusr1_handler_is_in_place_before_its_task_runs() {
        let logger = log_stats_on_sigusr1("test", std::sync::Arc::default());
        // Before the fix the handler was registered on the first poll: this signal would have met
        // the default action and ended the test process.
        // SAFETY: raise has no memory-safety preconditions.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
        let task = tokio::spawn(logger);
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "the logger keeps listening");
        task.abort();
    }

    #[test]
    fn the_reader_grows_for_a_larger_mtu_and_never_shrinks() {
        let mut r = TunReader::new(1216);
        assert_eq!(r.capacity(), 1216);
        assert_eq!(r.slot(READ_SLOTS - 1).len(), wire::OVERHEAD + 1216);
        r.fit(1436);
        assert_eq!(r.capacity(), 1436);
        assert_eq!(r.slot(READ_SLOTS - 1).len(), wire::OVERHEAD + 1436, "every slot grew");
        // A smaller path keeps the room: no allocation on the way down.
        r.fit(1216);
        assert_eq!(r.capacity(), 1436);
    }

    /// A device that hands out scripted reads, then `WouldBlock`.
    struct Scripted {
        reads: std::sync::Mutex<std::collections::VecDeque<io::Result<Vec<u8>>>>,
        offload: bool,
    }

    impl Scripted {
        fn new(offload: bool, reads: impl IntoIterator<Item = io::Result<Vec<u8>>>) -> Arc<Self> {
            Arc::new(Self { reads: std::sync::Mutex::new(reads.into_iter().collect()), offload })
        }

        fn left(&self) -> usize {
            self.reads.lock().unwrap().len()
        }
    }

    impl TunRead for Scripted {
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            let next = self.reads.lock().unwrap().pop_front();
            let bytes = next.unwrap_or_else(|| Err(io::ErrorKind::WouldBlock.into()))?;
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(bytes.len())
        }

        fn offload(&self) -> bool {
            self.offload
        }
    }

    /// A failed read after the first of a batch: the batch comes out whole, the error with the
    /// next call on the same device (before it reads again), and a reader that moved on to
    /// another device (re-created) never sees it.
    #[test]
    fn an_error_behind_a_batchs_first_read_waits_for_the_next_call_on_its_device() {
        let eio = || Err(io::Error::from_raw_os_error(libc::EIO));
        let packet = |b: u8| Ok(vec![0x45, b, 0, 20]);
        // Always busy: every batch tops up.
        let mut r = TunReader::new(1400).busy_within(Duration::from_secs(3600));
        let dev = Scripted::new(false, [packet(1), packet(2), packet(3), eio(), packet(4)]);
        // The first batch is not busy yet (no batch before it): one read.
        assert_eq!(r.try_read(&dev).unwrap(), 1);
        assert_eq!(r.packet(0), [0x45, 1, 0, 20]);
        // The second reads 2, tops up with 3, and meets the error: 2 and 3 come out.
        assert_eq!(r.try_read(&dev).unwrap(), 2);
        assert_eq!((r.packet(0), r.packet(1)), (&[0x45, 2, 0, 20][..], &[0x45, 3, 0, 20][..]));
        let e = r.try_read(&dev).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "the error, with the next call");
        assert_eq!(dev.left(), 1, "without reading");
        assert_eq!(r.try_read(&dev).unwrap(), 1, "then reads go on");
        assert_eq!(r.packet(0), [0x45, 4, 0, 20]);

        // Deferred from one device, the next call on another: that one is read, the error gone.
        let old = Scripted::new(false, [packet(5), eio()]);
        assert_eq!(r.try_read(&old).unwrap(), 1);
        let new = Scripted::new(false, [packet(6)]);
        assert_eq!(r.try_read(&new).unwrap(), 1);
        assert_eq!(r.packet(0), [0x45, 6, 0, 20]);
        assert_eq!(r.try_read(&old).unwrap_err().kind(), io::ErrorKind::WouldBlock, "forgotten");
    }

    /// With offload, a read the split cannot cut (here: a GSO type for the wrong family) is an
    /// error of that read, not a panic and not a packet.
    #[test]
    fn an_offload_read_that_cannot_be_cut_is_an_invalid_data_error() {
        let mut read = vec![0u8; segment::VNET_HDR_LEN];
        read[1] = 4; // GSO_TCPV6 in front of an IPv4 packet
        read.extend_from_slice(&[0x45; 60]);
        let lone = {
            let mut r = vec![0u8; segment::VNET_HDR_LEN];
            r.extend_from_slice(&[0x45, 7, 0, 20]);
            r
        };
        let dev = Scripted::new(true, [Ok(read), Ok(lone)]);
        let mut r = TunReader::new(1400);
        assert_eq!(r.try_read(&dev).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(r.try_read(&dev).unwrap(), 1, "the next read is cut as usual");
        assert_eq!(r.packet(0), [0x45, 7, 0, 20]);
    }

    /// What a TUN device with offload hands over for a TCP TSO packet over IPv4: a virtio-net
    /// header (NEEDS_CSUM, GSO_TCPV4, `gso_size`), 20 + 20 bytes of headers, `payload` bytes.
    fn tso_read(gso_size: usize, payload: usize) -> Vec<u8> {
        let mut read = vec![0u8; segment::VNET_HDR_LEN];
        read[0] = 1; // NEEDS_CSUM
        read[1] = 1; // GSO_TCPV4
        read[4..6].copy_from_slice(&(gso_size as u16).to_ne_bytes());
        read[6..8].copy_from_slice(&20u16.to_ne_bytes()); // csum_start: the TCP header
        read[8..10].copy_from_slice(&16u16.to_ne_bytes()); // csum_offset: TCP's checksum
        read.extend(segment::tests::tso4(payload));
        read
    }

    #[test]
    fn a_reader_leaves_tso_checksums_partial_when_asked_and_finishes_them_for_a_peer_without() {
        let read = tso_read(1000, 2900);
        let mut full = TunReader::new(1400);
        assert_eq!(full.try_read(&Scripted::new(true, [Ok(read.clone())])).unwrap(), 3);
        let mut r = TunReader::new(1400);
        r.checksums(segment::Checksums::Partial);
        assert_eq!(r.try_read(&Scripted::new(true, [Ok(read)])).unwrap(), 3);
        for i in 0..3 {
            assert!(!full.csum_partial(i) && r.csum_partial(i), "segment {i}");
            // The same bytes but for the TCP checksum (20 + 16).
            assert_eq!(r.packet(i)[..36], full.packet(i)[..36]);
            assert_eq!(r.packet(i)[38..], full.packet(i)[38..]);
            assert_ne!(r.packet(i)[36..38], full.packet(i)[36..38]);
        }
        // To a peer that takes them: as they are. To one that does not: finished first.
        let before = r.packet(0).to_vec();
        assert_eq!(r.seal_flag(0, true), Some(true));
        assert_eq!(r.packet(0), before);
        assert_eq!(r.seal_flag(1, false), Some(false));
        assert_eq!(r.packet(1), full.packet(1));
        assert!(!r.csum_partial(1));
        assert_eq!(full.seal_flag(2, true), Some(false), "complete stays complete");
        // A lone packet is never partial.
        let mut lone = vec![0u8; segment::VNET_HDR_LEN];
        lone.extend_from_slice(&[0x45, 7, 0, 20]);
        assert_eq!(r.try_read(&Scripted::new(true, [Ok(lone)])).unwrap(), 1);
        assert!(!r.csum_partial(0));
    }

    /// A TSO packet whose segments are shorter than the slots (a peer's smaller MSS): its
    /// segments lie one sealed segment apart, so that sealed they are one GSO run in place, with
    /// nothing to move; a packet without GSO after it still gets a whole slot.
    #[test]
    fn a_tso_packets_segments_are_read_end_to_end_once_sealed() {
        let (gso_size, payload) = (1000usize, 2900usize);
        let read = tso_read(gso_size, payload);
        let dev = Scripted::new(true, [Ok(read.clone())]);
        let mut r = TunReader::new(1400);
        assert_eq!(r.try_read(&dev).unwrap(), 3);
        let lens: Vec<usize> = (0..3).map(|i| r.len(i)).collect();
        assert_eq!(lens, [1040, 1040, 940]);
        for i in 0..3 {
            assert_eq!(
                r.packet(i)[40..],
                read[segment::VNET_HDR_LEN + 40 + i * gso_size..][..lens[i] - 40],
                "segment {i}"
            );
        }
        let base = r.slot(0).as_ptr() as usize;
        let offsets: Vec<usize> = (0..3).map(|i| r.slot(i).as_ptr() as usize - base).collect();
        assert_eq!(offsets, [0, 1040 + wire::OVERHEAD, 2 * (1040 + wire::OVERHEAD)], "one sealed segment apart");
        assert!(lens.iter().enumerate().all(|(i, &l)| r.slot(i).len() >= l + wire::OVERHEAD), "room to seal each");

        // "Sealed" (each datagram filled with its index): one run, already in place, in order.
        let sealed: Vec<usize> = lens.iter().map(|l| l + wire::OVERHEAD).collect();
        for (i, &d) in sealed.iter().enumerate() {
            r.slot(i)[..d].fill(i as u8 + 1);
        }
        let starts = r.starts;
        let mut next = 0;
        let run = gather_run(&mut r.slots, |k| starts[k], &sealed, &mut next).expect("a run");
        assert_eq!((run.start, run.end, run.size, run.count, next), (0, sealed.iter().sum(), sealed[0], 3, 3));
        let mut want = Vec::new();
        for (i, &d) in sealed.iter().enumerate() {
            want.extend(std::iter::repeat_n(i as u8 + 1, d));
        }
        assert_eq!(r.slots[run.start..run.end], want[..]);

        // A lone packet in the next batch: a whole slot again.
        let mut lone = vec![0u8; segment::VNET_HDR_LEN];
        lone.extend_from_slice(&[0x45, 7, 0, 20]);
        let dev = Scripted::new(true, [Ok(lone)]);
        assert_eq!(r.try_read(&dev).unwrap(), 1);
        assert_eq!(r.packet(0), [0x45, 7, 0, 20]);
        assert_eq!(r.slot(0).len(), wire::OVERHEAD + 1400);
    }

    #[test]
    fn too_big_answers_counted_rate_limited_and_behind_the_vnet_header() {
        let c = Counters::default();
        let mut tb = TooBig::new();
        let t0 = Instant::now();
        // An IPv4 TCP packet of 1500 bytes with DF set, from a tunnel client.
        let mut p = vec![0u8; 1500];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&1500u16.to_be_bytes());
        p[6] = 0x40;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[198, 18, 0, 9]);
        let from = IpAddr::from([100, 64, 0, 1]);
        let a = tb.answer(&p, 1436, from, true, t0, &c).expect("answered").to_vec();
        assert_eq!(a.len(), VNET_HDR_LEN + 20 + 8 + 28);
        assert_eq!(&a[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "a zeroed virtio-net header");
        assert_eq!(&a[VNET_HDR_LEN + 16..VNET_HDR_LEN + 20], &[100, 64, 0, 2], "back to the sender");
        assert_eq!(&a[VNET_HDR_LEN + 20..VNET_HDR_LEN + 22], &[3, 4]);
        let plain = tb.answer(&p, 1436, from, false, t0, &c).expect("answered").to_vec();
        assert_eq!(plain, a[VNET_HDR_LEN..], "no header without offload");
        // The burst runs out; every packet is still counted.
        let answered = (0..100).filter(|_| tb.answer(&p, 1436, from, false, t0, &c).is_some()).count();
        assert_eq!(answered, TOO_BIG_BURST as usize - 2);
        assert!(tb.answer(&p, 1436, from, false, t0 + Duration::from_millis(20), &c).is_some(), "refilled");
        // DF clear: dropped and counted, no answer, no token used.
        p[6] = 0;
        let later = t0 + Duration::from_secs(10);
        assert!(tb.answer(&p, 1436, from, false, later, &c).is_none());
        assert_eq!(c.stats().dropped(DropReason::TooBig), 2 + 100 + 1 + 1);
        p[6] = 0x40;
        assert!((0..TOO_BIG_BURST).all(|_| tb.answer(&p, 1436, from, false, later, &c).is_some()));
        // Hostile bytes: counted, never a panic.
        assert!(tb.answer(&[0x45, 0, 1], 1436, from, false, later, &c).is_none());
        assert!(tb.answer(&[], 1436, from, false, later, &c).is_none());
    }

    #[test]
    fn only_path_mtu_errors_give_an_mtu() {
        // SAFETY: sock_extended_err is plain integers; all-zero is a valid value.
        let mut e: libc::sock_extended_err = unsafe { std::mem::zeroed() };
        e.ee_origin = libc::SO_EE_ORIGIN_ICMP;
        e.ee_type = 3;
        e.ee_code = 4;
        e.ee_info = 1280;
        assert_eq!(mtu_of_error(&e), Some(1280));
        e.ee_code = 3; // port unreachable
        assert_eq!(mtu_of_error(&e), None);
        e.ee_origin = libc::SO_EE_ORIGIN_ICMP6;
        e.ee_type = 2;
        e.ee_code = 0;
        assert_eq!(mtu_of_error(&e), Some(1280));
        e.ee_info = 0;
        assert_eq!(mtu_of_error(&e), None, "a router that does not say");
        e.ee_info = 70000;
        assert_eq!(mtu_of_error(&e), None, "not a size");
        e.ee_origin = libc::SO_EE_ORIGIN_LOCAL;
        e.ee_errno = libc::EMSGSIZE as u32;
        e.ee_info = 1400;
        assert_eq!(mtu_of_error(&e), None, "our own link: the underlay watcher's");
    }

    #[test]
    fn an_unreachable_destination_waits_for_the_route_only_where_asked() {
        let unreachable = || Err::<usize, _>(io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        let mut tries = 0;
        let t0 = std::time::Instant::now();
        assert!(
            past_reports(Unreachable::Fail, || {
                tries += 1;
                unreachable()
            })
            .is_err()
        );
        assert_eq!(tries, 2, "the gateway: tried again once, past an earlier report, then failed");
        tries = 0;
        assert!(
            past_reports(Unreachable::Settle, || {
                tries += 1;
                unreachable()
            })
            .is_err()
        );
        assert_eq!(tries, 3, "the client: a last try after the route had time to settle");
        assert!(t0.elapsed() >= ROUTE_SETTLE, "and it waited");
        // A report for an earlier datagram costs one retry, never the wait, once the send works.
        let mut first = true;
        let sent = past_reports(Unreachable::Settle, || {
            if std::mem::take(&mut first) { Err(io::Error::from_raw_os_error(libc::ECONNREFUSED)) } else { Ok(1) }
        });
        assert_eq!(sent.expect("sent"), 1);
    }

    /// A real report: a datagram to a closed port draws an ICMP "port unreachable", which on a
    /// socket with `IP_RECVERR` the next send returns instead of sending. `send_to_now` goes
    /// past it and the datagram arrives.
    #[test]
    fn a_lone_send_goes_past_a_report_for_an_earlier_datagram() {
        let sock = bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        set_path_mtu_probing(&sock, true).expect("IP_RECVERR");
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let closed_at = closed.local_addr().expect("addr");
        drop(closed);
        let open = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        open.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let open_at = open.local_addr().expect("addr");

        sendto(&sock, b"into the void", closed_at).expect("the first send goes out");
        // The ICMP error comes back over loopback: wait (bounded) until the socket holds it.
        let reported = (0..500).any(|_| {
            let mut fds = libc::pollfd { fd: sock.as_raw_fd(), events: 0, revents: 0 };
            // SAFETY: one valid pollfd, for the call.
            unsafe { libc::poll(&mut fds, 1, 10) };
            fds.revents & libc::POLLERR != 0
        });
        assert!(reported, "the port unreachable arrived");
        assert_eq!(send_to_now(&sock, b"hello", open_at).expect("sent past the report"), 5);
        let mut buf = [0u8; 16];
        let (n, _) = open.recv_from(&mut buf).expect("the datagram arrives");
        assert_eq!(&buf[..n], b"hello");
    }

    #[test]
    fn a_run_that_fails_part_way_counts_what_went_out_and_what_did_not() {
        let o = wire::OVERHEAD;
        // Three datagrams of 100 bytes and a last one of 60.
        let run = Run { start: 0, end: 360, size: 100, count: 4 };
        let failed = |sent| Err(RunFailed { sent, error: io::Error::from_raw_os_error(libc::ENOBUFS) });
        let mut s = Sent::default();
        s.count(&run, Ok(()));
        assert_eq!((s.datagrams, s.inner_bytes, s.failed), (4, 360 - 4 * o, 0));
        let mut s = Sent::default();
        s.count(&run, failed(2));
        assert_eq!((s.datagrams, s.inner_bytes, s.failed), (2, 200 - 2 * o, 2), "two went out one by one");
        assert_eq!(s.error.map(|e| e.raw_os_error()), Some(Some(libc::ENOBUFS)));
        let mut s = Sent::default();
        s.count(&run, failed(0));
        assert_eq!((s.datagrams, s.inner_bytes, s.failed), (0, 0, 4), "a GSO send: all or nothing");
    }

    #[test]
    fn a_fragmentable_send_goes_past_every_size_report_and_stops_at_the_bound() {
        let too_big = || io::Error::from_raw_os_error(libc::EMSGSIZE);
        // Three reports queued by earlier segments, then the datagram goes.
        let mut tries = 0;
        let sent = past_size_reports(|| {
            tries += 1;
            if tries <= 3 { Err(too_big()) } else { Ok(7) }
        });
        assert_eq!((sent.expect("sent"), tries), (7, 4));
        // A kernel that refuses it for good: bounded, and the error is returned.
        tries = 0;
        let sent = past_size_reports(|| -> io::Result<usize> {
            tries += 1;
            Err(too_big())
        });
        assert_eq!(sent.expect_err("refused").raw_os_error(), Some(libc::EMSGSIZE));
        assert_eq!(tries, SIZE_REPORTS_PASSED);
        // Any other error is not a size report: returned at once.
        tries = 0;
        let sent = past_size_reports(|| -> io::Result<usize> {
            tries += 1;
            Err(io::Error::from_raw_os_error(libc::ENOBUFS))
        });
        assert!(sent.is_err());
        assert_eq!(tries, 1);
    }

    #[test]
    fn rate_limit_allows_burst_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10.0, 3);
        assert!(r.allow(t0) && r.allow(t0) && r.allow(t0));
        assert!(!r.allow(t0));
        assert!(!r.allow(t0 + Duration::from_millis(50)));
        assert!(r.allow(t0 + Duration::from_millis(160)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| r.allow(later)));
        assert!(!r.allow(later));
    }

    #[test]
    fn rate_limit_every_spaces_events() {
        let t0 = Instant::now();
        let mut r = RateLimit::every(Duration::from_secs(1));
        assert!(r.allow(t0));
        assert!(!r.allow(t0 + Duration::from_millis(999)));
        assert!(r.allow(t0 + Duration::from_millis(2000)));
    }

    #[test]
    fn error_backoff_retries_free_then_doubles_to_cap_and_resets() {
        let mut b = ErrorBackoff::new(Duration::from_millis(10), Duration::from_millis(40));
        for _ in 0..ErrorBackoff::FREE_RETRIES {
            assert_eq!(b.failed(), Duration::ZERO);
        }
        let waits: Vec<_> = (0..4).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 40]);
        b.reset();
        for _ in 0..ErrorBackoff::FREE_RETRIES {
            assert_eq!(b.failed(), Duration::ZERO);
        }
        assert_eq!(b.failed(), Duration::from_millis(10), "a reset starts the doubling again");
    }

    #[test]
    fn backoff_doubles_from_min_to_max_and_resets() {
        // The client's network steps' schedule: 500 ms doubling up to 30 s.
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.upcoming(), Duration::from_millis(500));
        let waits: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(b.upcoming(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backoff_pause_ends_early_on_a_stop_and_on_time_otherwise() {
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(8));
        let t0 = tokio::time::Instant::now();
        assert!(b.pause_unless_stopped(&mut stop).await, "no stop: the pause runs out");
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        let t1 = tokio::time::Instant::now();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop_tx.send_replace(true);
            stop_tx
        });
        assert!(!b.pause_unless_stopped(&mut stop).await, "a stop ends the 4 s pause");
        assert_eq!(t1.elapsed(), Duration::from_secs(1));
        let _keep = stopper.await.expect("stopper");
        assert!(!b.pause_unless_stopped(&mut stop).await, "a stop already requested ends it at once");
        assert_eq!(t1.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn stats_line_names_every_drop_reason_once() {
        let c = Counters::default();
        c.count_drop(DropReason::Replay);
        c.count_drop(DropReason::Replay);
        let s = c.stats();
        assert_eq!(s.dropped(DropReason::Replay), 2);
        let line = s.to_string();
        for why in DropReason::ALL {
            assert_eq!(line.matches(&format!(" drop_{}=", why.name())).count(), 1, "{line}");
        }
        assert!(line.contains("drop_replay=2"), "{line}");
        assert!(line.starts_with("loop_starts=tx:0,rx:0 "), "{line}");
    }

    #[test]
    fn drop_indices_match_all() {
        for (i, d) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }
}

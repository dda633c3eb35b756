//! The kill-switch's IO: one nf_tables netlink socket, held for the client's whole life (it owns
//! the table), and in the fallback mode a second socket on the nftables event group.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netlink_sys::Socket;

use super::nfnl::{self, Batch, ChainInfo, Reply, TableInfo};
use super::rules::Ruleset;
use super::{KillSwitchMode, TABLE, TARGET};

/// Why a batch or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused one message of a batch (the whole batch was then discarded).
    #[error("the kernel refused {what}: {}", io::Error::from_raw_os_error(*.errno))]
    Refused { what: String, errno: i32 },
    #[error("netlink: {0}")]
    Protocol(String),
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Refused { errno, .. } => Some(*errno),
            NlError::Io(e) => e.raw_os_error(),
            NlError::Protocol(_) => None,
        }
    }
}

/// A netlink socket to nf_tables in the network namespace of the thread that opened it.
pub struct NfSocket {
    sock: Socket,
    portid: u32,
    seq: u32,
    buf: Vec<u8>,
}

/// Room for one datagram from the kernel: dumps come in pages; acknowledgements are small
/// (NETLINK_CAP_ACK leaves out the echoed request).
const RECV_BUF: usize = 64 * 1024;

impl NfSocket {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(nfnl::NETLINK_NETFILTER)?;
        let addr = sock.bind_auto()?;
        // Errors without the echoed request: a batch of acknowledgements stays small.
        sock.set_cap_ack(true)?;
        // A reply that never comes (it cannot, short of a kernel bug) must not hang `start()`.
        socket2::SockRef::from(&sock).set_read_timeout(Some(Duration::from_secs(5)))?;
        // Seeded from the clock so that replies to an earlier (timed-out) life of this port are
        // not taken for ours; any value works otherwise.
        let seq =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(1);
        Ok(Self { sock, portid: addr.port_number(), seq, buf: vec![0; RECV_BUF] })
    }

    /// This socket's netlink port: the table's owner while we own it.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    fn recv(&mut self, flags: libc::c_int) -> io::Result<usize> {
        let mut slice = &mut self.buf[..];
        self.sock.recv(&mut slice, flags)
    }

    /// Sends one transaction and checks every acknowledgement. nfnetlink processes a batch inside
    /// the send call, so every reply is queued by the time `send` returns: the replies are read
    /// without blocking.
    pub fn send_batch(&mut self, build: impl FnOnce(&mut Batch)) -> Result<(), NlError> {
        let first_seq = self.next_seq(256);
        let mut batch = Batch::new(first_seq);
        build(&mut batch);
        let (bytes, msgs) = batch.finish();
        self.sock.send(&bytes, 0)?;
        let mut acked = 0usize;
        let mut first_error: Option<NlError> = None;
        loop {
            let n = match self.recv(libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            for reply in nfnl::messages(&self.buf[..n]) {
                if let Reply::Ack { seq, errno } = reply {
                    let what = msgs.iter().find(|(s, _)| *s == seq).map(|(_, w)| w.as_str());
                    match what {
                        Some(_) if errno == 0 => acked += 1,
                        // Not one of ours: a reply to an earlier request on this socket.
                        None if errno == 0 || seq.wrapping_sub(first_seq) > msgs.len() as u32 + 1 => {}
                        // An error for the batch as a whole (its begin or end message).
                        _ => {
                            first_error.get_or_insert(NlError::Refused {
                                what: what.unwrap_or("the batch").to_owned(),
                                errno,
                            });
                        }
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None if acked == msgs.len() => Ok(()),
            None => Err(NlError::Protocol(format!("{acked} of {} messages acknowledged", msgs.len()))),
        }
    }

    /// Reads replies to request `seq` until `done` says it has what it needs.
    fn query(
        &mut self,
        request: &[u8],
        seq: u32,
        mut on: impl FnMut(&Reply) -> Option<Result<(), NlError>>,
    ) -> Result<(), NlError> {
        self.sock.send(request, 0)?;
        loop {
            let n = self.recv(0)?;
            for reply in nfnl::messages(&self.buf[..n]) {
                let ours = match &reply {
                    Reply::Ack { seq: s, .. } | Reply::Done { seq: s } => *s == seq,
                    Reply::Nft(m) => m.seq == seq,
                    Reply::Other => false,
                };
                if ours && let Some(result) = on(&reply) {
                    return result;
                }
            }
        }
    }

    /// The `inet` table `name`, if it exists.
    pub fn table(&mut self, name: &str) -> Result<Option<TableInfo>, NlError> {
        let seq = self.next_seq(1);
        let request = nfnl::get_table(seq, name);
        let mut found = None;
        self.query(&request, seq, |reply| match reply {
            Reply::Nft(m) => {
                found = nfnl::table_info(m, name);
                Some(Ok(()))
            }
            Reply::Ack { errno, .. } if *errno == libc::ENOENT => Some(Ok(())),
            Reply::Ack { errno, .. } => Some(Err(NlError::Io(io::Error::from_raw_os_error(*errno)))),
            _ => None,
        })?;
        Ok(found)
    }

    /// The chains of the `inet` table `table`.
    pub fn chains(&mut self, table: &str) -> Result<Vec<ChainInfo>, NlError> {
        let seq = self.next_seq(1);
        let request = nfnl::dump_chains(seq);
        let mut found = Vec::new();
        self.query(&request, seq, |reply| match reply {
            Reply::Nft(m) => {
                found.extend(nfnl::chain_info(m, table));
                None
            }
            Reply::Done { .. } => Some(Ok(())),
            Reply::Ack { errno: 0, .. } => None,
            Reply::Ack { errno, .. } => Some(Err(NlError::Io(io::Error::from_raw_os_error(*errno)))),
            Reply::Other => None,
        })?;
        Ok(found)
    }
}

/// The table flags of a mode.
fn flags_of(mode: KillSwitchMode) -> u32 {
    match mode {
        KillSwitchMode::Owned => nfnl::TABLE_F_OWNER | nfnl::TABLE_F_PERSIST,
        KillSwitchMode::Watched => 0,
    }
}

/// Whether an existing table can be brought to the plan in place: its persist flag is the one
/// the mode wants (the kernel never toggles it), and its chains are exactly our two base chains
/// on their hooks at priority 0 (their policy and rules are rewritten anyway).
fn updatable(table: &TableInfo, chains: &[ChainInfo], mode: KillSwitchMode) -> bool {
    let persist = |f: u32| f & nfnl::TABLE_F_PERSIST;
    let mut names: Vec<&str> = chains.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    persist(table.flags) == persist(flags_of(mode))
        && names == ["input", "output"]
        && chains.iter().all(|c| c.hook == Some((nfnl::hook_of(&c.name), 0)) && c.kind.as_deref() == Some("filter"))
}

/// Why [`apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The kernel does not know the table flags of this mode (before Linux 6.9).
    #[error("this kernel does not support owned persistent tables: {0}")]
    Unsupported(NlError),
    /// A live process owns the table: only it may change it.
    #[error(
        "table inet {TABLE} belongs to another running process (netlink port {0}); is another holdfast client running in this namespace?"
    )]
    OwnedByOther(u32),
    #[error(transparent)]
    Netlink(#[from] NlError),
    #[error("the table is not as applied: {0}")]
    Verify(String),
}

/// Brings the table to `rules` in one transaction: created if missing, updated in place when
/// it exists (adopting an orphan left by a killed run; the base chains stay hooked with their
/// drop policy throughout, so no packet passes during the swap), or rebuilt when it has a shape
/// that cannot be updated (a table of some other program or version). Then checks the result.
///
/// Why not always delete and re-create: that leaks. `a_leftover_table_is_replaced_without_a_gap`
/// (tests/killswitch_netns.rs) saw 4 to 13 of a probe flood pass while a table was replaced that
/// way 30 times on Linux 6.18: a base chain created in a transaction is hooked before the commit
/// with policy accept and only gets its drop policy during the commit.
pub fn apply(sock: &mut NfSocket, rules: &Ruleset, mode: KillSwitchMode) -> Result<(), ApplyError> {
    let existing = sock.table(TABLE)?;
    if let Some(TableInfo { owner: Some(owner), .. }) = existing
        && owner != sock.portid()
    {
        return Err(ApplyError::OwnedByOther(owner));
    }
    let rebuild = match &existing {
        None => false,
        Some(t) => !updatable(t, &sock.chains(TABLE)?, mode),
    };
    if rebuild {
        tracing::warn!(target: TARGET, "table inet {TABLE} has a shape this version does not update in place; rebuilding it");
    }
    let flags = flags_of(mode);
    let result = sock.send_batch(|b| {
        if rebuild {
            b.del_table(TABLE);
        }
        b.new_table(TABLE, flags);
        for (name, _) in rules.chains() {
            b.new_chain(TABLE, name);
        }
        b.flush_table(TABLE);
        for (name, chain) in rules.chains() {
            for rule in chain {
                b.new_rule(TABLE, name, rule);
            }
        }
    });
    match result {
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) && flags != 0 && existing.is_none() => {
            return Err(ApplyError::Unsupported(e));
        }
        Err(e) if e.errno() == Some(libc::EPERM) => {
            // Taken by another process between our look and the batch, or no CAP_NET_ADMIN.
            return Err(match sock.table(TABLE).ok().flatten().and_then(|t| t.owner) {
                Some(owner) if owner != sock.portid() => ApplyError::OwnedByOther(owner),
                _ => e.into(),
            });
        }
        other => other?,
    }
    verify(sock, mode)
}

/// Checks that the table exists with the mode's flags, owned by us in the owned mode. (The rules
/// themselves were acknowledged one by one in the batch.)
fn verify(sock: &mut NfSocket, mode: KillSwitchMode) -> Result<(), ApplyError> {
    let Some(t) = sock.table(TABLE)? else {
        return Err(ApplyError::Verify("the table is missing".into()));
    };
    let want = flags_of(mode);
    if t.flags & (nfnl::TABLE_F_OWNER | nfnl::TABLE_F_PERSIST) != want {
        return Err(ApplyError::Verify(format!("table flags are {:#x}, expected {want:#x}", t.flags)));
    }
    if mode == KillSwitchMode::Owned && t.owner != Some(sock.portid()) {
        return Err(ApplyError::Verify(format!("owned by port {:?}, not by us ({})", t.owner, sock.portid())));
    }
    Ok(())
}

/// Removes the table if it exists. An orphan (persist, no owner) is adopted first in the same
/// transaction; a table a live process owns is refused (only its owner may delete it).
pub fn remove(sock: &mut NfSocket) -> Result<bool, ApplyError> {
    let Some(t) = sock.table(TABLE)? else { return Ok(false) };
    if let Some(owner) = t.owner
        && owner != sock.portid()
    {
        return Err(ApplyError::OwnedByOther(owner));
    }
    let adopt = t.owner.is_none() && t.flags & nfnl::TABLE_F_PERSIST != 0;
    sock.send_batch(|b| {
        if adopt {
            b.new_table(TABLE, nfnl::TABLE_F_OWNER | nfnl::TABLE_F_PERSIST);
        }
        b.del_table(TABLE);
    })?;
    Ok(true)
}

/// The fallback mode's guard: a thread on the nftables event group that puts the table back as
/// soon as another program changes or removes it. Events, not polling: the kernel reports each
/// committed change to the group, so the table is back within a millisecond or so.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    wake: std::os::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A subscription made before the table is applied, so no change after the apply goes unseen.
pub struct Subscription(Socket);

pub fn subscribe() -> io::Result<Subscription> {
    let mut sock = Socket::new(nfnl::NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.add_membership(nfnl::NFNLGRP_NFTABLES)?;
    // A larger buffer: a big foreign ruleset load reports every object.
    let _ = sock.set_rx_buf_sz(1 << 20);
    Ok(Subscription(sock))
}

/// At most one line per this interval about restoring the table (a program that keeps fighting
/// over it would otherwise flood the log).
const RESTORE_LOG_EVERY: Duration = Duration::from_secs(60);

impl Watcher {
    /// Starts the watcher: `control` is the socket the table is applied with (its own changes are
    /// not reacted to), `restores` counts restorations.
    pub fn start(
        sub: Subscription,
        control: Arc<Mutex<Option<NfSocket>>>,
        rules: Arc<arc_swap::ArcSwap<Ruleset>>,
        restores: Arc<std::sync::atomic::AtomicU64>,
    ) -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let wake = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("killswitch-watch".into())
            .spawn(move || watch(sub.0, fd, &stop2, &control, &rules, &restores))?;
        Ok(Self { stop, wake, thread: Some(thread) })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(
    sock: Socket,
    wake: i32,
    stop: &AtomicBool,
    control: &Mutex<Option<NfSocket>>,
    rules: &arc_swap::ArcSwap<Ruleset>,
    restores: &std::sync::atomic::AtomicU64,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut last_log: Option<Instant> = None;
    let mut quiet_restores = 0u64;
    // A restore that failed is tried again this soon, events or not.
    let mut retry = false;
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, if retry { 50 } else { -1 }) };
        if r < 0 || fds[1].revents != 0 || stop.load(Ordering::SeqCst) {
            if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let Some(ours) = control.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(NfSocket::portid) else {
            return;
        };
        // Drain everything queued; one restore covers them all.
        let mut touched = false;
        loop {
            let mut slice = &mut buf[..];
            match sock.recv(&mut slice, libc::MSG_DONTWAIT) {
                Ok(n) => {
                    touched |= nfnl::messages(&buf[..n]).any(|m| match m {
                        Reply::Nft(m) => m.portid != ours && nfnl::touches(&m, TABLE),
                        _ => false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ENOBUFS: events were lost; the table may have changed unseen.
                Err(_) => {
                    touched = true;
                    break;
                }
            }
        }
        if !touched && !retry {
            continue;
        }
        let started = Instant::now();
        let result = {
            let mut guard = control.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(s) => apply(s, &rules.load(), KillSwitchMode::Watched),
                None => return,
            }
        };
        retry = result.is_err();
        if result.is_ok() {
            restores.fetch_add(1, Ordering::Relaxed);
            quiet_restores += 1;
        }
        let loud = last_log.is_none_or(|t| t.elapsed() >= RESTORE_LOG_EVERY);
        match result {
            Ok(()) if loud => {
                tracing::warn!(
                    target: TARGET,
                    "another program changed table inet {TABLE}; restored it in {:?} ({quiet_restores} restore(s) since the last line)",
                    started.elapsed()
                );
                last_log = Some(Instant::now());
                quiet_restores = 0;
            }
            Ok(()) => {}
            Err(e) => {
                if loud {
                    tracing::error!(target: TARGET, "cannot restore table inet {TABLE}: {e}");
                    last_log = Some(Instant::now());
                }
            }
        }
    }
}

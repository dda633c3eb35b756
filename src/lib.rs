//! Holdfast: a resilient VPN gateway and client.
//!
//! # Module map
//! - [`sansio`]: the pure core. The supervisor statechart ([`sansio::supervisor`]) and the packet
//!   crypto ([`sansio::wire`], [`sansio::seal`], [`sansio::replay`]), the gateway resolver's request
//!   handling ([`sansio::dns`]), the "too big" ICMP answers ([`sansio::icmp`]) over the one Internet
//!   checksum ([`sansio::checksum`]), the path MTU search ([`sansio::pmtud`]). No tokio, sockets, files,
//!   clocks or RNG in here: time and randomness come in as arguments, decisions come out as values.
//! - [`snapshot`]: the one atomically swapped session snapshot (`VpnAuthResponse`) and its getter.
//! - [`control`]: the generated gRPC code of the control plane and the conversions to our types.
//! - [`config`]: the gateway's and the client's files (TOML), with every default in one place.
//! - [`pki`]: the gateway's authority, certificates and fingerprints (rcgen).
//! - [`client`]: the tokio shell of the client: `start()`, the supervisor driver, the control-plane
//!   client, logging.
//! - [`gateway`]: the gateway: client registry, session registry, control service, data plane,
//!   resolver.
//! - [`tunnel`]: the IO pieces both data planes share (TUN device, UDP socket, counters).
//! - [`packet_thread`]: the one thread each data plane runs its packet loops on.
//! - [`local_socket`]: the root-only Unix socket both binaries answer status queries on.
//!
//! The IO rule: only `client`, `gateway` and the binary touch the world. Everything under `sansio`
//! is deterministic given its inputs, which is what lets the property tests replay any run.

pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod flood;
pub mod gateway;
pub mod local_socket;
pub mod logging;
pub mod packet_thread;
pub mod pki;
pub mod sansio;
pub mod snapshot;
pub mod tui;
pub mod tunnel;

/// The main runtime of both binaries (the control plane, the supervisor, the dashboard; the
/// data plane has its own thread, see [`packet_thread`]). `Err` is the exit code, after a line
/// on stderr naming `who`.
pub fn runtime(who: &str) -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("{who}: cannot start the async runtime: {e}");
        config::exit::FAILURE
    })
}

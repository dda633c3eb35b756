//! The pure (sans-IO) core: no tokio, sockets, files, clocks or RNG. Time and randomness come in as
//! arguments; decisions come out as values.

pub mod aead;
pub mod budget;
pub mod checksum;
pub mod coalesce;
pub mod dns;
pub mod filter;
pub mod icmp;
pub mod inner;
pub mod pmtud;
pub mod replay;
pub mod seal;
pub mod segment;
pub mod session;
pub mod supervisor;
pub mod wire;

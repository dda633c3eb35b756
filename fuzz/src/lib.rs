//! Fuzz harnesses for Holdfast: the data plane's receive path, the gateway's control-plane
//! handlers and the configuration parsers.
//!
//! Each target is a `pub fn <target>(data: &[u8])` here; `fuzz_targets/<target>.rs` is a one-line
//! libFuzzer wrapper around it, and `tests/fuzz_regressions.rs` (in the main crate, on stable)
//! includes this file with `#[path]` to replay the checked-in corpus and every crash found so far
//! through the very same code. So this module must compile in both places: it names no crate
//! of its own (no `crate::` paths) and uses only dependencies the main crate also has.
//!
//! A harness panics only when an oracle fails; each module doc lists its oracles. Inputs that are
//! structured (a sequence of operations) use the tiny encoding of [`input`], so seeds can be
//! written by hand in [`seeds`] and read by a person.
//!
//! | target               | what it feeds                                                     |
//! |----------------------|-------------------------------------------------------------------|
//! | `datagram_parse`     | bytes to `wire::parse_header`                                     |
//! | `datagram_open`      | one datagram to `open` and `open_checked` (window state optional) |
//! | `datagram_sequence`  | sealed / forged / replayed / reordered / raw datagrams, two windows |
//! | `control_handlers`   | Authenticate / PingSession calls from chosen peers                |
//! | `control_decode`     | protobuf bytes of either request, then served                     |
//! | `gateway_answer`     | protobuf bytes of an AuthenticateResponse, checked by the client  |
//! | `dns_query`          | a query and an upstream reply to the gateway resolver, gate ops   |
//! | `config_client`      | client file text                                                  |
//! | `config_gateway`     | `gateway.toml` text                                               |
//! | `config_registry`    | `clients.toml` bytes                                              |

pub mod config;
pub mod control;
pub mod datagram;
pub mod dns;
pub mod input;
pub mod seeds;

pub use config::{config_client, config_gateway, config_registry};
pub use control::{control_decode, control_handlers, gateway_answer};
pub use datagram::{datagram_open, datagram_parse, datagram_sequence};
pub use dns::dns_query;

/// A harness entry point.
pub type Target = fn(&[u8]);

/// Every target by name: the name of its `fuzz_targets/` file and of its `corpus/` directory.
pub const TARGETS: [(&str, Target); 10] = [
    ("datagram_parse", datagram_parse),
    ("datagram_open", datagram_open),
    ("datagram_sequence", datagram_sequence),
    ("control_handlers", control_handlers),
    ("control_decode", control_decode),
    ("gateway_answer", gateway_answer),
    ("dns_query", dns_query),
    ("config_client", config_client),
    ("config_gateway", config_gateway),
    ("config_registry", config_registry),
];

//! The `holdfast-client` binary: the client's commands alone (`run`, `unblock`, `status`), the
//! same as `holdfast client run`, `holdfast client unblock` and `holdfast status`.
//!
//! Why a second binary: a machine that only runs a client has no use for the gateway's code (the
//! PostgreSQL registry, the resolver, the certificate authority, the demo), and code is most of a
//! client's resident memory: the kernel maps nearly all of a binary's text a running client
//! touches. Linked without it, the client maps about 40 % less (see the README's "Which
//! binary"). It is the one the client's systemd unit runs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use holdfast::client::cli::{self, ClientCommand, StatusArgs};

/// Holdfast's VPN client: once started, it never dies and recovers by itself, while its
/// kill-switch keeps every packet from leaking. (The gateway's commands are in `holdfast`.)
#[derive(Parser)]
#[command(name = "holdfast-client", version)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    #[command(flatten)]
    Client(ClientCommand),
    Status(StatusArgs),
}

fn main() -> ExitCode {
    let code = match Cli::parse().command {
        Top::Client(cmd) => cli::run(cmd, "holdfast-client"),
        Top::Status(args) => cli::status(args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

//! The `holdfast` binary: `holdfast gateway ...`, `holdfast client ...`, `holdfast status` and the
//! demo. `holdfast-client` (src/bin/holdfast-client.rs) is the client's commands alone.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use holdfast::client::cli::{self, ClientCommand, StatusArgs};
use holdfast::config::exit;
use holdfast::gateway::cli::GatewayCommand;
use holdfast::logging::{self, LogSettings};

/// Holdfast: a VPN whose client, once started, never dies and recovers by itself.
#[derive(Parser)]
#[command(name = "holdfast", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run and administer a gateway (identity, client registry, control plane).
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Run the client.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Run a live demo (as root): a gateway and a client in namespaces, with the dashboard.
    ///
    /// A gateway and a client in network namespaces of their own on this machine, the client's
    /// dashboard, a steady ping through the tunnel, and keys that inject faults (k kill/restart the gateway, e expire the session, u blackhole UDP, c blackhole the
    /// control port). Where PostgreSQL's server binaries are installed it runs two gateways on a
    /// throw-away database, and `k` kills the one the client is on so you watch it fail over.
    /// Everything it creates is removed on exit; the machine's own network is never touched.
    Demo {
        /// One gateway, even where PostgreSQL is installed (no database, no failover).
        #[arg(long)]
        one_gateway: bool,
    },
    Status(StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Top::Gateway(cmd) => run_gateway(cmd),
        Top::Client(cmd) => cli::run(cmd, "holdfast client"),
        Top::Demo { one_gateway } => match holdfast::demo::run(one_gateway) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("holdfast demo: {e}");
                e.exit_code()
            }
        },
        Top::Status(args) => cli::status(args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run_gateway(cmd: GatewayCommand) -> i32 {
    // The gateway logs to stderr (journald-friendly under systemd); RUST_LOG overrides the filter.
    let _log_guard = logging::init(&LogSettings {
        dir: None,
        prefix: "holdfast-gateway",
        // sqlx reports the server's notices and its pool's reconnects at info; the gateway says
        // what matters about its database itself (once per outage).
        filter: "info,sqlx=warn".into(),
        keep_files: 1,
        stderr: true,
    });
    let rt = match holdfast::runtime("holdfast gateway") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(cmd.run()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("holdfast gateway: {e}");
            e.exit_code()
        }
    }
}

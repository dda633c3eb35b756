//! The client's commands, shared by the two binaries that offer them: `holdfast` (`holdfast
//! client run`, `holdfast client unblock`, `holdfast status`, beside the gateway's commands) and
//! `holdfast-client` (`holdfast-client run`, `unblock`, `status`: the client alone, for
//! machines that only run a client; see the README's "Which binary").

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::app::{self, RunOptions};
use super::{ClientSettings, status_socket};
use crate::config::{self, exit};
use crate::logging::{self, LogSettings};

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Start the client and keep it running until SIGINT/SIGTERM.
    ///
    /// Exits 0 on an explicit stop. Exits non-zero only for a critical start-up failure:
    /// 66 config file missing or unreadable, 78 config invalid, 65 key or certificate missing or
    /// invalid, 77 kill-switch could not be enabled. Everything after start-up (auth failures,
    /// gateway restarts, timeouts, network loss) is recovered from, never fatal.
    ///
    /// DNS: by default the system resolver (/etc/resolv.conf, or systemd-resolved) is pointed at
    /// the resolvers the gateway pushes when the client connects, and given back on stop. The
    /// client file's `[network] dns` overrides: a list of resolvers, or "system" to leave the
    /// system's resolver alone.
    ///
    /// MTU: the TUN MTU is sized from the path to the gateway (the route's MTU, else the MTU of
    /// the interface it leaves by) when the TUN comes up, and follows it in place when the link's
    /// or route's MTU changes; the client file's `[network] underlay_mtu` overrides (and is not
    /// followed). A packet too big for the tunnel is answered with an ICMP "too big".
    ///
    /// Signals: SIGINT/SIGTERM stop it; SIGHUP re-authenticates now (a fresh session, no packet
    /// lost); SIGUSR1 logs the data plane's counters.
    Run {
        /// The client file written by `holdfast gateway add-client`.
        /// Default: /etc/holdfast/client.toml as root, else client.toml in the per-user config dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Run headless: no dashboard; logs go to stderr (journald) and the log file. Implied
        /// when stdin or stdout is not a terminal. With the dashboard, logs go to the file only.
        #[arg(long)]
        no_tui: bool,
    },
    /// Remove the kill-switch, routes and resolver change a killed client left behind (it fails
    /// closed on SIGKILL), without starting the client. For a user who wants out. A running
    /// client's kill-switch is refused: stop that client instead (SIGTERM, or `q`).
    Unblock,
}

/// Show what the running client is doing (like `wg show`).
///
/// State, session (never its key: a fingerprint), counters and recent transitions, read from
/// the running client's status socket. Exits 3 when no client is running.
#[derive(Args)]
pub struct StatusArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The client's status socket. Default: `[status] socket` of the client file, else
    /// /run/holdfast/client.sock as root, else the per-user runtime dir.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The client file to read `[status] socket` from (default: as for `client run`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Runs `cmd`; returns the process's exit code. `name` is how the binary calls itself in
/// messages ("holdfast client" or "holdfast-client").
pub fn run(cmd: ClientCommand, name: &str) -> i32 {
    match cmd {
        ClientCommand::Run { config, no_tui } => run_client(config, no_tui, name),
        ClientCommand::Unblock => match super::killswitch::unblock() {
            Ok(done) => {
                println!("{done}");
                exit::OK
            }
            Err(e) => {
                eprintln!("{name} unblock: {e}");
                exit::FAILURE
            }
        },
    }
}

/// `status`: asks the running client; returns the process's exit code.
pub fn status(args: StatusArgs) -> i32 {
    status_socket::status_command(args.json, args.socket, args.config.as_deref())
}

fn run_client(config: Option<PathBuf>, no_tui: bool, name: &str) -> i32 {
    let path = config.unwrap_or_else(config::default_client_file);
    // Critical start-up failures: reported on one line naming the file, with a distinct exit code.
    let settings = match ClientSettings::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e}");
            return e.exit_code();
        }
    };
    let dashboard = crate::tui::should_use_dashboard(no_tui);
    let log = &settings.file.log;
    let _log_guard = logging::init(&LogSettings {
        dir: Some(log.dir.clone().unwrap_or_else(config::default_log_dir)),
        prefix: "holdfast-client",
        filter: log.level.clone().unwrap_or_else(|| "info".into()),
        keep_files: log.keep_files.unwrap_or(7),
        // The dashboard never shares its terminal with log lines.
        stderr: !dashboard,
    });
    let rt = match crate::runtime(name) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The kill-switch is part of the configuration: a plan that cannot be built (a gateway on
    // loopback, a bad interface name) is a critical start-up failure, like a bad key.
    let killswitch = match super::killswitch::for_client(&settings.file) {
        Ok(ks) => ks,
        Err(e) => {
            eprintln!("{name}: {e}");
            return exit::NOT_PERMITTED;
        }
    };
    rt.block_on(app::run(settings, killswitch, RunOptions { dashboard, ..RunOptions::default() }))
}

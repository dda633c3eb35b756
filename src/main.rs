//! The `holdfast` binary: `holdfast gateway ...` and `holdfast client ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use holdfast::client::app::{self, RunOptions};
use holdfast::client::{ClientSettings, status_socket};
use holdfast::config::{self, exit};
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
    /// Show what the running client is doing (like `wg show`).
    ///
    /// State, session (never its key: a fingerprint), counters and recent transitions, read from
    /// the running client's status socket. Exits 3 when no client is running.
    Status {
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
    },
}

#[derive(Subcommand)]
enum ClientCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Top::Gateway(cmd) => run_gateway(cmd),
        Top::Client(ClientCommand::Run { config, no_tui }) => run_client(config, no_tui),
        Top::Client(ClientCommand::Unblock) => match holdfast::client::killswitch::unblock() {
            Ok(done) => {
                println!("{done}");
                exit::OK
            }
            Err(e) => {
                eprintln!("holdfast client unblock: {e}");
                exit::FAILURE
            }
        },
        Top::Demo { one_gateway } => match holdfast::demo::run(one_gateway) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("holdfast demo: {e}");
                e.exit_code()
            }
        },
        Top::Status { json, socket, config } => {
            status_socket::status_command(json, socket, config.as_deref())
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("holdfast: cannot start the async runtime: {e}");
        exit::FAILURE
    })
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
    let rt = match runtime() {
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

fn run_client(config: Option<PathBuf>, no_tui: bool) -> i32 {
    let path = config.unwrap_or_else(config::default_client_file);
    // Critical start-up failures: reported on one line naming the file, with a distinct exit code.
    let settings = match ClientSettings::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("holdfast client: {e}");
            return e.exit_code();
        }
    };
    let dashboard = holdfast::tui::should_use_dashboard(no_tui);
    let log = &settings.file.log;
    let _log_guard = logging::init(&LogSettings {
        dir: Some(log.dir.clone().unwrap_or_else(config::default_log_dir)),
        prefix: "holdfast-client",
        filter: log.level.clone().unwrap_or_else(|| "info".into()),
        keep_files: log.keep_files.unwrap_or(7),
        // The dashboard never shares its terminal with log lines.
        stderr: !dashboard,
    });
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The kill-switch is part of the configuration: a plan that cannot be built (a gateway on
    // loopback, a bad interface name) is a critical start-up failure, like a bad key.
    let killswitch = match holdfast::client::killswitch::for_client(&settings.file) {
        Ok(ks) => ks,
        Err(e) => {
            eprintln!("holdfast client: {e}");
            return exit::NOT_PERMITTED;
        }
    };
    rt.block_on(app::run(settings, killswitch, RunOptions { dashboard, ..RunOptions::default() }))
}

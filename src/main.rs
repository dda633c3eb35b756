//! The `holdfast` binary: `holdfast gateway ...` and `holdfast client ...`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use holdfast::client::dataplane::{ClientDataPlane, ClientDataPlaneConfig};
use holdfast::client::{self, ClientSettings};
use holdfast::client::killswitch::LoggingNoopKillSwitch;
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
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Start the client and keep it running until SIGINT/SIGTERM.
    ///
    /// Exits 0 on an explicit stop. Exits non-zero only for a critical start-up failure:
    /// 66 config file missing or unreadable, 78 config invalid, 65 key or certificate missing or
    /// invalid, 77 kill-switch could not be enabled. Everything after start-up (auth failures,
    /// gateway restarts, timeouts, network loss) is recovered from, never fatal.
    Run {
        /// The client file written by `holdfast gateway add-client`.
        /// Default: /etc/holdfast/client.toml as root, else client.toml in the per-user config dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Top::Gateway(cmd) => run_gateway(cmd),
        Top::Client(ClientCommand::Run { config }) => run_client(config),
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
        filter: "info".into(),
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

fn run_client(config: Option<PathBuf>) -> i32 {
    let path = config.unwrap_or_else(config::default_client_file);
    // Critical start-up failures: reported on one line naming the file, with a distinct exit code.
    let settings = match ClientSettings::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("holdfast client: {e}");
            return e.exit_code();
        }
    };
    let log = &settings.file.log;
    let _log_guard = logging::init(&LogSettings {
        dir: Some(log.dir.clone().unwrap_or_else(config::default_log_dir)),
        prefix: "holdfast-client",
        filter: log.level.clone().unwrap_or_else(|| "info".into()),
        keep_files: log.keep_files.unwrap_or(7),
        stderr: true,
    });
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        tracing::info!(
            target: "holdfast::client",
            "holdfast client {} starting: {} -> gateway {}",
            env!("CARGO_PKG_VERSION"),
            settings.file.name,
            settings.file.endpoint
        );
        // Data plane (issue 3): comes up on the first snapshot, through the driver's hook.
        let dataplane = (!holdfast::tunnel::disabled_by_env())
            .then(|| ClientDataPlane::new(ClientDataPlaneConfig::from_file(&settings.file)));
        let on_swap = dataplane.as_ref().map(|d| d.on_swap_hook());
        let handle = match client::start(settings, Arc::new(LoggingNoopKillSwitch), on_swap) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(target: "holdfast::client", "{e}");
                eprintln!("holdfast client: {e}");
                return exit::NOT_PERMITTED;
            }
        };
        if let Some(dp) = &dataplane {
            dp.bind(handle.getter(), handle.commands());
            tokio::spawn(holdfast::tunnel::log_stats_on_sigusr1("client data plane", dp.counters()));
        }
        wait_for_stop_signal().await;
        tracing::info!(target: "holdfast::client", "stop requested; shutting down");
        if let Some(dp) = &dataplane {
            dp.stop().await;
        }
        match handle.stop().await {
            Ok(()) => exit::OK,
            Err(e) => {
                tracing::error!(target: "holdfast::client", "{e}");
                exit::FAILURE
            }
        }
    })
}

/// Waits for SIGINT or SIGTERM (the explicit stop of a daemon).
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without signal handlers we cannot be stopped cleanly; ctrl_c is the last resort.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

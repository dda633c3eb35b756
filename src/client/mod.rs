//! The client's tokio shell.
//!
//! - [`start`]: the spec's `StartAsync`. Enables the kill-switch, sets the snapshot to `None`, spawns
//!   the supervisor and returns at once. No authentication, no tunnel, no IO on the control plane.
//! - [`driver`]: the task that runs the pure supervisor machine and executes its effects.
//! - [`dataplane`]: the TUN device and the UDP loops, started by the first snapshot.
//! - [`path_mtu`]: the size of the path to the gateway, learnt at bring-up and at run time.
//! - [`control`]: the gRPC client (mutual TLS, deadlines, failure classification).
//! - [`status`]: the status feed observers read.
//! - [`cli`]: the client's commands, for both binaries that offer them.
//! - [`killswitch`]: the kill-switch interface.

pub mod app;
pub mod cli;
pub mod control;
pub mod dataplane;
pub mod dns;
pub mod driver;
pub mod killswitch;
pub mod path_mtu;
pub mod prober;
pub mod routes;
pub mod status;
pub mod status_socket;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::client::{ClientFile, Credentials};
use crate::snapshot::{AuthCell, GetAuth, VpnAuthResponse};
use driver::{Command, DriverParts, OnSwap};
use killswitch::{KillSwitch, KillSwitchError};
use status::ClientStatus;

/// What the client needs to start: the parsed client file and its loaded credentials. Loading these
/// is where the critical start-up failures (missing config, missing keys) happen, before `start()`.
pub struct ClientSettings {
    pub file: ClientFile,
    pub path: PathBuf,
    pub creds: Credentials,
    /// Seed for the supervisor's jitter (tests); `None` in production.
    pub seed: Option<u64>,
}

impl ClientSettings {
    /// Loads the client file and its credentials; every error names the file and maps to an exit
    /// code (see [`crate::config::ConfigError::exit_code`]).
    pub fn load(path: PathBuf) -> Result<Self, crate::config::ConfigError> {
        let file = ClientFile::load(&path)?;
        let creds = file.credentials(&path)?;
        Ok(Self { file, path, creds, seed: None })
    }
}

/// A running client. Dropping it does not stop the client: call [`ClientHandle::stop`].
pub struct ClientHandle {
    auth: AuthCell,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<ClientStatus>,
    task: JoinHandle<()>,
    killswitch: Arc<dyn KillSwitch>,
}

/// Depth of the command queue. Commands are rare (stop, re-auth, nudges that the machine
/// rate-limits anyway); when full, a nudge is dropped, which is harmless.
const COMMAND_QUEUE: usize = 16;

/// The spec's `StartAsync`: enable the kill-switch, set the snapshot to `None`, spawn the supervisor,
/// return. Must be called inside a tokio runtime. Fails only if the kill-switch cannot be enabled —
/// the client never runs unprotected.
pub fn start(
    settings: ClientSettings,
    killswitch: Arc<dyn KillSwitch>,
    on_swap: Option<OnSwap>,
) -> Result<ClientHandle, KillSwitchError> {
    killswitch.enable()?;
    let auth = AuthCell::new();
    let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    // The supervisor's clock starts here, so the very first status already carries it.
    let epoch = tokio::time::Instant::now();
    let (status_tx, status) = watch::channel(ClientStatus::initial(epoch.into_std()));
    let parts = DriverParts {
        file: settings.file,
        path: settings.path,
        creds: settings.creds,
        auth: auth.clone(),
        commands: commands_rx,
        status: status_tx,
        on_swap,
        seed: settings.seed,
        epoch,
    };
    let task = tokio::spawn(driver::run(parts));
    Ok(ClientHandle { auth, commands, status, task, killswitch })
}

impl ClientHandle {
    /// The current snapshot (the spec's `getAuth()`).
    pub fn get_auth(&self) -> Option<Arc<VpnAuthResponse>> {
        self.auth.get_auth()
    }

    /// The getter to hand to the data plane.
    pub fn getter(&self) -> GetAuth {
        self.auth.getter()
    }

    /// A receiver of the status feed.
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.clone()
    }

    /// Forces a re-authentication (the dashboard's `r`).
    pub async fn reauth(&self) {
        let _ = self.commands.send(Command::Reauth).await;
    }

    /// Asks for a health check now; never blocks (dropped if the queue is full).
    pub fn nudge(&self) {
        let _ = self.commands.try_send(Command::Nudge);
    }

    /// A sender of commands, for parts that outlive a borrow of the handle (the data plane).
    pub fn commands(&self) -> mpsc::Sender<Command> {
        self.commands.clone()
    }

    /// Whether the supervisor task has ended (it only ends on a stop).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Explicit stop: stops the supervisor, then releases the kill-switch.
    pub async fn stop(self) -> Result<(), KillSwitchError> {
        let _ = self.commands.send(Command::Stop).await;
        if let Err(e) = self.task.await {
            tracing::error!(target: "holdfast::client", "supervisor task ended abnormally: {e}");
        }
        self.killswitch.disable()
    }
}

//! The kill-switch interface. `start()` enables it before anything else and only an explicit stop
//! disables it, so no state of the supervisor ever runs unprotected.
//!
//! The real nftables kill-switch is its own piece of work (issue 4); until it lands, the client uses
//! [`LoggingNoopKillSwitch`], which says plainly that traffic is NOT blocked.

/// Why the kill-switch could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    /// Applying the rules failed; the client must not run.
    #[error("cannot enable the kill-switch: {0}")]
    Enable(String),
    /// Removing the rules failed.
    #[error("cannot disable the kill-switch: {0}")]
    Disable(String),
}

/// Blocks every packet that does not go through the tunnel or to the gateway.
pub trait KillSwitch: Send + Sync {
    /// Applies the rules (atomically) and checks them. Called first thing in `start()`.
    fn enable(&self) -> Result<(), KillSwitchError>;
    /// Removes the rules. Called only on an explicit stop.
    fn disable(&self) -> Result<(), KillSwitchError>;
    /// A short description for logs and the dashboard.
    fn describe(&self) -> String;
}

/// A kill-switch that blocks nothing and says so in the log.
#[derive(Debug, Default)]
pub struct LoggingNoopKillSwitch;

impl KillSwitch for LoggingNoopKillSwitch {
    fn enable(&self) -> Result<(), KillSwitchError> {
        tracing::warn!(target: "holdfast::killswitch", "kill-switch not active: traffic outside the tunnel is NOT blocked");
        Ok(())
    }
    fn disable(&self) -> Result<(), KillSwitchError> {
        tracing::info!(target: "holdfast::killswitch", "kill-switch (no-op) released");
        Ok(())
    }
    fn describe(&self) -> String {
        "off (no-op)".into()
    }
}

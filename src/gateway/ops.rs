//! The operator's side of a running gateway, started by `gateway run` in one call: the status
//! socket (`gateway status`), the metrics endpoint (`[metrics]`), the log level and reloads on
//! SIGHUP. See [`super::status`], [`super::metrics`] and [`super::reload`] for each.

use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::dataplane::{ControlSessions, GatewayDataPlane};
use super::reload::{self, Reloader};
use super::status::{self, Observed};
use super::{ControlPlane, GatewayError, metrics};
use crate::config::gateway::GatewayConfig;
use crate::local_socket::ServeGuard;

/// What must happen before the gateway announces itself.
pub struct Early {
    started: Instant,
    /// Registered before anything is announced: SIGHUP's default action would end the process.
    hangup: std::io::Result<Signal>,
}

impl Early {
    /// Notes the start time, applies `[log] level` (unless `RUST_LOG` is set) and registers the
    /// SIGHUP handler.
    pub fn now(config: &GatewayConfig) -> Self {
        // No subscriber of ours (a test running the gateway in process) is not a reason to stop.
        let _ = crate::logging::set_filter(&config.log_level);
        Self { started: Instant::now(), hangup: signal(SignalKind::hangup()) }
    }
}

/// Keeps the status socket served (and the metrics endpoint, when SIGHUP cannot be watched;
/// otherwise the SIGHUP task owns it).
pub struct Operations {
    _status: ServeGuard,
    _unreloadable: Option<Reloader>,
}

/// Serves the status socket, starts the metrics endpoint if configured and reloads on SIGHUP.
/// A status socket or metrics address that cannot be served is a start-up failure.
pub async fn start(
    early: Early,
    config: &GatewayConfig,
    plane: &ControlPlane,
    sessions: Arc<ControlSessions>,
    data: &GatewayDataPlane,
) -> Result<Operations, GatewayError> {
    let observed = Arc::new(Observed {
        name: config.name.clone(),
        endpoint: config.endpoint,
        control_listen: plane.local_addr(),
        data_listen: data.local,
        tun: data.tun_name.clone(),
        subnet: config.subnet,
        gateway_ip: config.gateway_ip,
        started: early.started,
        control: plane.state(),
        data: sessions,
        counters: data.counters(),
        shedding: data.shedding(),
    });
    let status = status::serve(&config.status_socket, observed.clone())
        .map_err(|source| GatewayError::StatusSocket { path: config.status_socket.clone(), source })?;
    let registry = Arc::new(metrics::registry(&observed));
    let reloader = Reloader::start(config.clone(), plane.state(), registry).await?;
    let unreloadable = match early.hangup {
        Ok(hangup) => {
            tokio::spawn(reload::on_sighup(reloader, hangup));
            None
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP ({e}); gateway.toml is read at start only");
            Some(reloader)
        }
    };
    Ok(Operations { _status: status, _unreloadable: unreloadable })
}

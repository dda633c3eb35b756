//! What `gateway run` re-reads on SIGHUP, and how.
//!
//! On SIGHUP the gateway reads gateway.toml again. A file that does not load (missing, broken,
//! a bad value) is refused as a whole: the running configuration stays in force and one warning
//! says why. A file that loads takes effect for what can change without a restart:
//!
//! - the session expiry settings (`session_idle_timeout`, `session_max_lifetime`,
//!   `reauth_grace`), for open sessions too, from their next check;
//! - the metrics endpoint (`[metrics]`): turned on, off, or moved to another address. The new
//!   address is bound before the old one is let go, so a bind failure keeps the old endpoint;
//! - the log filter (`[log] level`), unless `RUST_LOG` is set (it wins, at start and after).
//!
//! Everything else (addresses, the subnets of both families, credentials, NAT, data-plane
//! settings, the status socket) is bound at start; a change to it is named in the log line as
//! needing a restart and otherwise ignored. The client registry needs no signal: it reloads by itself when its file changes (the
//! SIGHUP checks it at once as well). Exactly one log line per SIGHUP.
//!
//! [`plan`] is the pure part (what changed, what takes effect, what waits for a restart);
//! [`Reloader`] applies it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use super::GatewayError;
use super::live::Wait;
use super::metrics::{self, MetricsServer};
use super::service::ControlState;
use super::sessions::SessionLimits;
use crate::config::gateway::GatewayConfig;

/// What a reload does, decided from the running and the new configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The new session limits, if any of them changed.
    pub limits: Option<SessionLimits>,
    /// The new metrics address (`Some(None)`: turn them off), if it changed.
    pub metrics: Option<Option<SocketAddr>>,
    /// The new log filter, if it changed.
    pub log_level: Option<String>,
    /// What takes effect, in words (`session_idle_timeout 3m -> 2s`).
    pub changes: Vec<String>,
    /// Keys that changed but only take effect at a restart.
    pub restart_needed: Vec<&'static str>,
}

fn limits_of(c: &GatewayConfig) -> SessionLimits {
    SessionLimits::new(c.session_idle_timeout, c.session_max_lifetime, c.reauth_grace)
}

fn addr_word(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

/// Compares the running configuration with the new one.
pub fn plan(old: &GatewayConfig, new: &GatewayConfig) -> Plan {
    let mut changes = Vec::new();
    let d = |v: std::time::Duration| humantime::format_duration(v).to_string();
    for (key, a, b) in [
        ("session_idle_timeout", old.session_idle_timeout, new.session_idle_timeout),
        ("session_max_lifetime", old.session_max_lifetime, new.session_max_lifetime),
        ("reauth_grace", old.reauth_grace, new.reauth_grace),
    ] {
        if a != b {
            changes.push(format!("{key} {} -> {}", d(a), d(b)));
        }
    }
    let limits = (limits_of(old) != limits_of(new)).then(|| limits_of(new));
    let metrics = (old.metrics.listen != new.metrics.listen).then_some(new.metrics.listen);
    if metrics.is_some() {
        changes.push(format!("metrics {} -> {}", addr_word(old.metrics.listen), addr_word(new.metrics.listen)));
    }
    let log_level = (old.log_level != new.log_level).then(|| new.log_level.clone());
    if let Some(level) = &log_level {
        changes.push(format!("[log] level {} -> {level}", old.log_level));
    }
    // Every key is named here, none by `..`: a key added to the file cannot be forgotten — it
    // either reloads (above) or is listed as needing a restart (below).
    let GatewayConfig {
        dir: _,
        name,
        endpoint,
        listen,
        subnet,
        gateway_ip,
        v6,
        server_name,
        ca_cert,
        ca_key,
        cert,
        key,
        registry,
        database,
        clients_dir,
        session_idle_timeout: _,
        session_max_lifetime: _,
        reauth_grace: _,
        handshake_timeout,
        nat,
        dataplane,
        dns,
        status_socket,
        metrics: _,
        log_level: _,
    } = new;
    let mut restart_needed = Vec::new();
    let mut restart = |key, differs: bool| {
        if differs {
            restart_needed.push(key);
        }
    };
    restart("name", old.name != *name);
    restart("endpoint", old.endpoint != *endpoint);
    restart("listen", old.listen != *listen);
    restart("subnet", old.subnet != *subnet);
    restart("gateway_ip", old.gateway_ip != *gateway_ip);
    restart("subnet6/gateway_ip6", old.v6 != *v6);
    restart("server_name", old.server_name != *server_name);
    restart(
        "ca_cert/ca_key/cert/key",
        (&old.ca_cert, &old.ca_key, &old.cert, &old.key) != (ca_cert, ca_key, cert, key),
    );
    restart("registry", old.registry != *registry);
    restart("database", old.database != *database);
    restart("clients_dir", old.clients_dir != *clients_dir);
    restart("handshake_timeout", old.handshake_timeout != *handshake_timeout);
    restart("status_socket", old.status_socket != *status_socket);
    restart("[nat]", old.nat != *nat);
    restart("[dataplane]", old.dataplane != *dataplane);
    restart("[dns]", old.dns != *dns);
    Plan { limits, metrics, log_level, changes, restart_needed }
}

/// The running gateway's reloadable parts.
pub struct Reloader {
    path: PathBuf,
    config: GatewayConfig,
    control: Arc<ControlState>,
    registry: Arc<Registry>,
    metrics: Option<MetricsServer>,
}

impl Reloader {
    /// Starts the metrics endpoint if configured (a failure to bind is a start-up failure: the
    /// configuration cannot work) and keeps what a reload needs.
    pub async fn start(
        config: GatewayConfig,
        control: Arc<ControlState>,
        registry: Arc<Registry>,
    ) -> Result<Self, GatewayError> {
        let metrics = match config.metrics.listen {
            Some(addr) => Some(
                metrics::serve(addr, registry.clone())
                    .await
                    .map_err(|source| GatewayError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let path = config.dir.join(crate::config::gateway::GATEWAY_FILE);
        Ok(Self { path, config, control, registry, metrics })
    }

    /// The metrics endpoint's bound address, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Re-reads gateway.toml and applies what can change; logs one line with the outcome.
    pub async fn reload(&mut self) {
        let new = match GatewayConfig::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("SIGHUP: reload refused, the running configuration stays in force: {e}");
                return;
            }
        };
        self.control.refresh_registry(Wait::Yes);
        let plan = plan(&self.config, &new);
        let mut changes = plan.changes.clone();
        if let Some(listen) = plan.metrics {
            if let Err(e) = self.move_metrics(listen).await {
                changes.retain(|c| !c.starts_with("metrics "));
                changes.push(format!(
                    "metrics NOT moved to {} ({e}; still {})",
                    addr_word(listen),
                    addr_word(self.metrics_addr())
                ));
            } else {
                self.config.metrics = new.metrics;
            }
        }
        if let Some(level) = &plan.log_level {
            match crate::logging::set_filter(level) {
                Ok(crate::logging::FilterChange::Applied) => {}
                Ok(crate::logging::FilterChange::OverriddenByEnv) => {
                    changes.push("(RUST_LOG is set and wins over [log] level)".into())
                }
                Err(e) => changes.push(format!("[log] level NOT applied ({e})")),
            }
            self.config.log_level = level.clone();
        }
        if let Some(limits) = plan.limits {
            self.control.sessions.set_limits(limits);
            self.config.session_idle_timeout = new.session_idle_timeout;
            self.config.session_max_lifetime = new.session_max_lifetime;
            self.config.reauth_grace = new.reauth_grace;
        }
        let applied = if changes.is_empty() { "nothing to change".to_owned() } else { changes.join(", ") };
        if plan.restart_needed.is_empty() {
            tracing::info!("SIGHUP: {} reloaded: {applied}", self.path.display());
        } else {
            tracing::info!(
                "SIGHUP: {} reloaded: {applied}; changed but needing a restart (ignored until then): {}",
                self.path.display(),
                plan.restart_needed.join(", ")
            );
        }
    }

    /// Moves the metrics endpoint to `listen` (or turns it off). The new address is bound
    /// first; only if that fails because the old endpoint holds the port is the old one let go
    /// before trying again, and put back if the retry fails too.
    async fn move_metrics(&mut self, listen: Option<SocketAddr>) -> std::io::Result<()> {
        let Some(addr) = listen else {
            self.metrics = None;
            return Ok(());
        };
        match metrics::serve(addr, self.registry.clone()).await {
            Ok(server) => {
                self.metrics = Some(server);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && self.metrics.is_some() => {
                let old = self.metrics.take().map(|m| m.local_addr());
                match metrics::serve(addr, self.registry.clone()).await {
                    Ok(server) => {
                        self.metrics = Some(server);
                        Ok(())
                    }
                    Err(e) => {
                        if let Some(old) = old {
                            self.metrics = metrics::serve(old, self.registry.clone()).await.ok();
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Reloads on every SIGHUP until the process ends. `hangup` is registered by the caller before
/// the gateway announces itself, so a SIGHUP never meets the default action (termination).
pub async fn on_sighup(mut reloader: Reloader, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        reloader.reload().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> GatewayConfig {
        let text = format!("endpoint = \"198.18.0.1:51820\"\n{extra}\n");
        GatewayConfig::parse(&text, Path::new("/etc/hf/gateway.toml")).expect("parses")
    }

    #[test]
    fn unchanged_file_changes_nothing() {
        let p = plan(&config(""), &config(""));
        assert_eq!(p, Plan { limits: None, metrics: None, log_level: None, changes: vec![], restart_needed: vec![] });
    }

    #[test]
    fn limits_and_metrics_take_effect_and_the_rest_waits_for_a_restart() {
        let old = config("");
        let new = config(
            "session_idle_timeout = \"2s\"\nsubnet = \"100.64.1.0/24\"\n\
             [metrics]\nlisten = \"127.0.0.1:9500\"\n[log]\nlevel = \"debug\"",
        );
        let p = plan(&old, &new);
        assert_eq!(p.limits.map(|l| l.idle_ms), Some(2_000));
        assert_eq!(p.metrics, Some(Some("127.0.0.1:9500".parse().unwrap())));
        assert_eq!(
            p.changes,
            vec!["session_idle_timeout 3m -> 2s", "metrics off -> 127.0.0.1:9500", "[log] level info -> debug"]
        );
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        assert_eq!(p.restart_needed, vec!["subnet", "gateway_ip"]);
        let p = plan(&old, &config("subnet6 = \"fd00:77::/64\""));
        assert_eq!(p.restart_needed, vec!["subnet6/gateway_ip6"]);
        // The resolver's section is not reloaded: said, not silently ignored.
        let p = plan(&old, &config("[dns]\nenabled = false"));
        assert_eq!((p.changes.len(), p.restart_needed), (0, vec!["[dns]"]));
        // And back: metrics off.
        assert_eq!(plan(&new, &old).metrics, Some(None));
    }
}

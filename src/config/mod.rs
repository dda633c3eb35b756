//! Configuration files: the client file ([`client`]) and the gateway's files ([`gateway`]).
//!
//! Errors here are start-up errors: each names the file and the problem, and maps to a distinct
//! process exit code (see [`ConfigError::exit_code`]), so an operator or a service manager can tell
//! a missing file from a malformed one from a bad key without reading logs.

pub mod client;
pub mod gateway;

use std::path::{Path, PathBuf};

/// The longest client name.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a client (or gateway) name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit. The name becomes a certificate common name and a file name (`clients/NAME.toml`), so
/// no path separators, no leading dot (hidden files, `..`), no leading dash (looks like an option).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("only letters, digits, '.', '_' and '-' are allowed".into());
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or a digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod dns_name_tests {
    use super::check_search_domain;

    #[test]
    fn search_domains_are_plain_names() {
        for ok in ["lan", "corp.example.test", "a-b.c_d.", &"a".repeat(63)] {
            assert!(check_search_domain(ok).is_ok(), "{ok}");
        }
        let long = ["a"; 130].join(".");
        for bad in ["", ".", "a..b", "-a", "a-", "a b", "a\nnameserver 1.2.3.4", "x#y", "x;y", &"a".repeat(64), &long] {
            assert!(check_search_domain(bad).is_err(), "{bad:?}");
        }
    }
}

/// The most DNS servers a gateway pushes (and a client accepts): glibc reads three nameserver
/// lines; a few more leave room for both address families.
pub const MAX_DNS_SERVERS: usize = 8;
/// The most search domains pushed (and accepted): glibc's historical limit.
pub const MAX_SEARCH_DOMAINS: usize = 6;

/// Checks a DNS search domain: a name of 1 to 253 characters, labels of 1 to 63 letters, digits,
/// `-` or `_`, not starting or ending with `-`, separated by single dots (one trailing dot
/// allowed). It ends up on a `search` line of resolv.conf or in a `resolvectl` argument, so
/// nothing else can be in it: no spaces, line breaks, `#` or `;`.
pub fn check_search_domain(name: &str) -> Result<(), String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || name.len() > 253 {
        return Err(format!("{:?} is not a domain name (1 to 253 characters)", name.escape_debug().to_string()));
    }
    for label in trimmed.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{:?} is not a domain name (labels of 1 to 63 letters, digits, '-' or '_')",
                name.escape_debug().to_string()
            ));
        }
    }
    Ok(())
}

/// Exit codes of the `holdfast` binary (sysexits.h values, familiar to operators).
pub mod exit {
    /// Explicit stop, or a command that succeeded.
    pub const OK: i32 = 0;
    /// A config file is missing or unreadable (EX_NOINPUT).
    pub const CONFIG_MISSING: i32 = 66;
    /// A config file does not parse or has invalid values (EX_CONFIG).
    pub const CONFIG_INVALID: i32 = 78;
    /// A key or certificate is missing, unreadable or invalid (EX_DATAERR).
    pub const BAD_KEYS: i32 = 65;
    /// Not permitted: e.g. the kill-switch or the TUN device could not be set up (EX_NOPERM).
    pub const NOT_PERMITTED: i32 = 77;
    /// Any other failure at start-up, or a failed one-shot command (EX_SOFTWARE).
    pub const FAILURE: i32 = 70;
    /// The shared registry's database cannot be reached, and there is no last good view to
    /// serve from (EX_UNAVAILABLE).
    pub const DB_UNAVAILABLE: i32 = 69;
    /// The shared registry's database refused the user name or password (EX_NOUSER).
    pub const DB_CREDENTIALS: i32 = 67;
    /// The shared registry's schema is newer than this binary (EX_PROTOCOL): upgrade holdfast.
    pub const DB_SCHEMA_NEWER: i32 = 76;
}

/// A problem with a configuration file or the credentials it names.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist or cannot be read.
    #[error("cannot read config file {}: {reason}", path.display())]
    Missing { path: PathBuf, reason: String },
    /// The file exists but is not valid.
    #[error("invalid config file {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// A key or certificate is missing or unreadable.
    #[error("missing {what} in {}: {reason}", path.display())]
    MissingKey { path: PathBuf, what: &'static str, reason: String },
    /// A key or certificate does not parse.
    #[error("invalid {what} in {}: {reason}", path.display())]
    BadKey { path: PathBuf, what: &'static str, reason: String },
}

impl ConfigError {
    /// The process exit code for this kind of error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Missing { .. } => exit::CONFIG_MISSING,
            ConfigError::Malformed { .. } => exit::CONFIG_INVALID,
            ConfigError::MissingKey { .. } | ConfigError::BadKey { .. } => exit::BAD_KEYS,
        }
    }
}

/// Reads a config file as UTF-8 text, mapping every failure to [`ConfigError::Missing`] or
/// [`ConfigError::Malformed`] with the file's name.
pub fn read_config_text(path: &Path) -> Result<String, ConfigError> {
    let bytes =
        std::fs::read(path).map_err(|e| ConfigError::Missing { path: path.to_owned(), reason: e.to_string() })?;
    String::from_utf8(bytes)
        .map_err(|_| ConfigError::Malformed { path: path.to_owned(), reason: "not UTF-8 text".into() })
}

/// Whether this process runs as root (system paths instead of per-user ones).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The default client file: `/etc/holdfast/client.toml` as root, else `client.toml` in the
/// per-user config dir (e.g. `~/.config/holdfast/`).
pub fn default_client_file() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/etc/holdfast/client.toml");
    }
    directories::ProjectDirs::from("", "", "holdfast")
        .map(|d| d.config_dir().join("client.toml"))
        .unwrap_or_else(|| PathBuf::from("client.toml"))
}

/// The default log dir: `/var/log/holdfast` as root, else the per-user state dir.
pub fn default_log_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/log/holdfast");
    }
    directories::ProjectDirs::from("", "", "holdfast")
        .map(|d| d.state_dir().unwrap_or(d.data_local_dir()).join("logs"))
        .unwrap_or_else(|| PathBuf::from("holdfast-logs"))
}

/// A one-line description of a TOML error: the message plus the line it points at, so a bad
/// value ("invalid value: ... expected a duration") names its key.
pub fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if line.is_empty() {
        return e.message().to_owned();
    }
    let shown: String = line.chars().take(80).collect();
    format!("{} (line {line_no}: `{shown}`)", e.message().trim_end())
}

//! The gateway's config file (`gateway.toml`) and client registry file. (Being written.)

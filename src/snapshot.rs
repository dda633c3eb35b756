//! The one atomically swapped session snapshot (the spec's `currentAuth : VpnAuthResponse option`).
//!
//! The spec's rules, and how this module enforces them:
//! - *Single source of truth, never decomposed*: [`VpnAuthResponse`] is immutable once built and is
//!   only ever handed out as an `Arc`, so a reader always sees one whole snapshot.
//! - *Swapped atomically*: [`AuthCell`] wraps one `ArcSwapOption`; [`AuthCell::swap_in`] replaces the
//!   whole reference in one store.
//! - *Initial value None; updated only on successful authentication; never cleared*: there is no
//!   method that stores `None`. The only writer is the supervisor driver, on `AuthSucceeded`.
//! - *Loops use a getter*: the data plane receives a [`GetAuth`] and calls it on every iteration.

//!
//! The session value itself ([`VpnAuthResponse`], its key and crypto state) is pure and lives in
//! [`crate::sansio::session`]; it is re-exported here, where the shell has always found it.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

pub use crate::sansio::session::{CryptoSlot, KeyFingerprint, SessionCrypto, SessionId, SessionKey, VpnAuthResponse};

/// The getter the data plane receives instead of session data (the spec's `getAuth`).
pub type GetAuth = Arc<dyn Fn() -> Option<Arc<VpnAuthResponse>> + Send + Sync>;

/// The client's one mutable session value.
///
/// Cloning an `AuthCell` clones the handle, not the value: all clones share the same slot.
#[derive(Clone, Default)]
pub struct AuthCell {
    slot: Arc<ArcSwapOption<VpnAuthResponse>>,
}

impl AuthCell {
    /// A cell holding `None`, as the spec's initial value.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot, if any: one atomic load, no lock.
    pub fn get_auth(&self) -> Option<Arc<VpnAuthResponse>> {
        self.slot.load_full()
    }

    /// Installs a new snapshot in one atomic reference swap and returns the previous one.
    ///
    /// There is deliberately no way to store `None`: the spec forbids clearing the snapshot.
    pub fn swap_in(&self, next: Arc<VpnAuthResponse>) -> Option<Arc<VpnAuthResponse>> {
        self.slot.swap(Some(next))
    }

    /// The getter handed to the data plane.
    pub fn getter(&self) -> GetAuth {
        let cell = self.clone();
        Arc::new(move || cell.get_auth())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, key: u8) -> Arc<VpnAuthResponse> {
        Arc::new(VpnAuthResponse::fixture(id, [key; 32]))
    }

    #[test]
    fn starts_empty_and_swaps_whole() {
        let cell = AuthCell::new();
        let get = cell.getter();
        assert!(get().is_none());
        assert!(cell.swap_in(snap(1, 7)).is_none());
        let a = get().expect("installed");
        assert_eq!(a.session_id, SessionId(1));
        let prev = cell.swap_in(snap(2, 9)).expect("previous returned");
        assert_eq!(prev.session_id, SessionId(1));
        // A reader holding the old Arc still sees the old snapshot, whole.
        assert_eq!(a.session_key.expose(), &[7u8; 32]);
        assert_eq!(get().map(|s| s.session_id), Some(SessionId(2)));
    }
}

//! Routing: the devices commands can reach, changed while the agent runs.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::devices::control::Outbox;
use crate::devices::DeviceConfig;

/// The devices commands can reach: their configs (for validation) and inboxes.
#[derive(Default)]
pub struct Routes {
    /// Each device's config, by id (what it accepts).
    pub configs: BTreeMap<String, DeviceConfig>,
    /// Each device's control inbox, by id.
    pub outboxes: BTreeMap<String, Outbox>,
}

/// Shared so that devices can be added and removed while the agent runs.
#[derive(Clone, Default)]
pub struct Router(Arc<RwLock<Routes>>);

impl Router {
    /// Adds or replaces a device (at start and on reload).
    pub fn insert(&self, cfg: DeviceConfig, outbox: Outbox) {
        let mut r = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let id = cfg.id().to_string();
        r.outboxes.insert(id.clone(), outbox);
        r.configs.insert(id, cfg);
    }

    /// Removes a device that a reload took away.
    pub fn remove(&self, id: &str) {
        let mut r = self.0.write().unwrap_or_else(PoisonError::into_inner);
        r.outboxes.remove(id);
        r.configs.remove(id);
    }

    /// Reads the routes under the lock.
    pub fn read<T>(&self, f: impl FnOnce(&Routes) -> T) -> T {
        f(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }
}

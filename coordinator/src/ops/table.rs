//! The key table: the configured keys by digest, and the live accounts of every key
//! and team ever configured.
//!
//! Invariant: a new key set is installed atomically ([`KeyTable::install`]); the
//! accounts and usage of keys (by digest) and teams (by name) that it keeps are reused,
//! so a reload neither drops nor double-counts anything in flight. Cost of a lookup:
//! one SHA-256 and one map probe under a read lock held only to clone an `Arc`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use super::accounts::{Caller, Ledger, Principal};
use super::keys::{self, KeyDigest, KeySet};
use super::limits::Account;
use super::usage::Usage;
use crate::error::AppError;

#[derive(Debug, Default)]
struct Table {
    by_digest: HashMap<KeyDigest, Arc<Principal>>,
}

/// The keys in force and the accounts behind them.
#[derive(Debug, Default)]
pub(super) struct KeyTable {
    table: RwLock<Arc<Table>>,
    /// Live state by key digest and by team name; survives reloads.
    accounts: Mutex<HashMap<KeyDigest, Ledger>>,
    teams: Mutex<BTreeMap<String, Ledger>>,
}

impl KeyTable {
    /// Installs a key set, reusing the accounts and usage of keys and teams it keeps;
    /// returns the number of keys in force.
    pub(super) fn install(&self, set: KeySet) -> usize {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut teams = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        for (name, (account, _)) in teams.iter() {
            account.set_limits(set.teams.get(name).copied().unwrap_or_default());
        }
        let mut by_digest = HashMap::with_capacity(set.keys.len());
        for spec in set.keys {
            let (team_account, team_usage) = teams
                .entry(spec.team.clone())
                .or_insert_with(|| {
                    let limits = set.teams.get(&spec.team).copied().unwrap_or_default();
                    (Account::new(limits), Arc::new(Usage::default()))
                })
                .clone();
            let (account, usage) = accounts
                .entry(spec.digest)
                .and_modify(|(a, _)| a.set_limits(spec.limits))
                .or_insert_with(|| (Account::new(spec.limits), Arc::new(Usage::default())))
                .clone();
            by_digest.insert(
                spec.digest,
                Arc::new(Principal {
                    spec,
                    account,
                    team_account,
                    usage,
                    team_usage,
                }),
            );
        }
        let n = by_digest.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Table { by_digest });
        n
    }

    fn current(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The caller a request's bearer key names; anyone when no keys are configured.
    pub(super) fn authenticate(&self, headers: &axum::http::HeaderMap) -> Result<Caller, AppError> {
        let table = self.current();
        if table.by_digest.is_empty() {
            return Ok(Caller(None));
        }
        keys::bearer(headers)
            .and_then(|k| keys::lookup(&table.by_digest, k))
            .map(|p| Caller(Some(p.clone())))
            .ok_or(AppError::Unauthorized)
    }

    /// The keys in force, by name.
    pub(super) fn principals(&self) -> Vec<Arc<Principal>> {
        let mut keys: Vec<_> = self.current().by_digest.values().cloned().collect();
        keys.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        keys
    }

    /// Every team ever configured with its ledger, by name.
    pub(super) fn teams(&self) -> Vec<(String, Ledger)> {
        self.teams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, ledger)| (name.clone(), ledger.clone()))
            .collect()
    }
}

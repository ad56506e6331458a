//! The decision core: pure functions over immutable snapshots of keys, trusted issuers and the
//! registry. No I/O, no clock, no gRPC: adapters and caches live outside and call in.

pub mod claims;
pub mod decision;
pub mod ids;
pub mod keys;
pub mod reason;
pub mod registry;
pub mod token;
pub mod trust;

#[cfg(test)]
mod tests;

/// The maps and sets every decision looks up in (issuers, keys by `kid`, audiences, the registry's
/// indexes), with hashbrown's default hasher (foldhash, seeded per process) instead of SipHash: a warm
/// decision makes about eight such lookups. Their contents come from configuration, the registry and
/// the trusted issuers' key sets, never from a caller; a caller only chooses what is looked up, which
/// cannot degrade a map built without it.
pub type FastMap<K, V> = hashbrown::HashMap<K, V>;
/// See [`FastMap`].
pub type FastSet<T> = hashbrown::HashSet<T>;

pub use claims::{AppClaims, AppOnlyEvidence, VerifiedClaims};
pub use decision::{
    Allowed, Caller, Check, Decision, DecisionSettings, Denied, Headers, KeyLookup, Outcome,
    Request, Trace, TraceStep, VerifiedToken,
};
pub use reason::{DenyReason, ProblemKind};

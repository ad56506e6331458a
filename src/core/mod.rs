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

pub use claims::{AppClaims, AppOnlyEvidence, VerifiedClaims};
pub use decision::{
    Allowed, Caller, Check, Decision, DecisionSettings, Denied, Headers, KeyLookup, Outcome,
    Request, Trace, TraceStep, VerifiedToken,
};
pub use reason::{DenyReason, ProblemKind};

//! s2s-authz: a gRPC policy-decision sidecar for Entra ID style service-to-service authorization.
//!
//! See `ARCHITECTURE.md` for the map. In short: `core` decides (pure), `jwks`/`directory`/`engine`
//! hold the caches, `grpc` and `metrics` adapt, `server` wires, `main` parses flags.

pub mod cli;
pub mod config;
pub mod core;
pub mod devissuer;
pub mod directory;
pub mod engine;
pub mod fetch;
pub mod grpc;
pub mod jwks;
pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod proto;
pub mod registry;
pub mod registry_cli;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token_cache;
pub mod transport;

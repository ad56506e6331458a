//! gRPC adapters: they convert protobuf to the core's types and back, and nothing more.

pub mod admin;
pub mod ext_authz;
pub mod native;
pub mod registry;

use std::collections::HashMap;

/// Header maps arrive with lower-case keys from Envoy; native callers are asked to do the same, but a
/// mixed-case key must not hide `clienttype` or `callerobjectid`, so keys are normalised here.
pub(crate) fn lower_case_keys(headers: HashMap<String, String>) -> HashMap<String, String> {
    if headers
        .keys()
        .all(|k| !k.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return headers;
    }
    headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

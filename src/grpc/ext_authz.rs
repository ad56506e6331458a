//! `envoy.service.auth.v3.Authorization/Check`: Envoy's external authorization API.
//!
//! The RPC always returns gRPC OK: allow and deny live in the `CheckResponse`, because an RPC error
//! would hand the decision to Envoy's `failure_mode_allow`.

use crate::core::decision::Request;
use crate::core::{Decision, DenyReason, ProblemKind};
use crate::engine::Authorizer;
use crate::metrics::Api;
use crate::proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::proto::envoy::service::auth::v3 as pb;
use crate::proto::envoy::r#type::v3::{HttpStatus, StatusCode};
use crate::proto::google::rpc;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Response, Status};

/// Identity headers set on allowed requests. Callers can never supply them: whatever of these the
/// sidecar does not set is removed, as is any other `x-s2s-*` header the caller sent.
pub const HEADER_CLIENT_APP_ID: &str = "x-s2s-client-app-id";
pub const HEADER_TENANT_ID: &str = "x-s2s-tenant-id";
pub const HEADER_OBJECT_ID: &str = "x-s2s-object-id";
pub const HEADER_APPLICATION_USER_ID: &str = "x-s2s-application-user-id";
pub const HEADER_APPLICATION_USER_NAME: &str = "x-s2s-application-user-name";
pub const HEADER_SECURITY_ROLE: &str = "x-s2s-security-role";
pub const HEADER_EFFECTIVE_USER: &str = "x-s2s-effective-user";
pub const HEADER_DENY_REASON: &str = "x-s2s-deny-reason";

/// Every `x-s2s-*` header the contract defines: on an allowed request, those the sidecar did not set
/// are always removed, even if Envoy's `allowed_headers` hid them from the check request.
pub const CONTRACT_HEADERS: [&str; 8] = [
    HEADER_CLIENT_APP_ID,
    HEADER_TENANT_ID,
    HEADER_OBJECT_ID,
    HEADER_APPLICATION_USER_ID,
    HEADER_APPLICATION_USER_NAME,
    HEADER_SECURITY_ROLE,
    HEADER_EFFECTIVE_USER,
    HEADER_DENY_REASON,
];

/// The gRPC codes of `google.rpc.Status` used in `CheckResponse.status`.
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

pub struct ExtAuthz {
    authorizer: Arc<Authorizer>,
}

impl ExtAuthz {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        ExtAuthz { authorizer }
    }
}

#[tonic::async_trait]
impl pb::authorization_server::Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let mut http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        // The downstream peer's identity as Envoy verified it: the URI SAN (SPIFFE id) of its client
        // certificate, set only when the caller connected to Envoy over mTLS.
        let source_principal = attributes
            .source
            .map(|peer| peer.principal)
            .filter(|p| !p.is_empty());
        let headers = request_headers(&mut http);
        let token = bearer(headers.get("authorization").map(String::as_str));
        let core_request = Request {
            token,
            method: &http.method,
            path: &http.path,
            headers: &headers,
            source_principal: source_principal.as_deref(),
        };
        let evaluation = self
            .authorizer
            .decide_via(Api::ExtAuthz, &core_request, false)
            .await;
        Ok(Response::new(check_response(
            &evaluation.decision,
            &headers,
        )))
    }
}

/// Envoy sends `headers` normally and `header_map` when configured to send raw bytes; accept either.
/// The request is ours, so its header map is moved out, never copied.
fn request_headers(http: &mut pb::attribute_context::HttpRequest) -> HashMap<String, String> {
    if !http.headers.is_empty() {
        return super::lower_case_keys(std::mem::take(&mut http.headers));
    }
    let mut headers = HashMap::new();
    if let Some(map) = &http.header_map {
        for h in &map.headers {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            headers
                .entry(h.key.to_ascii_lowercase())
                .and_modify(|v: &mut String| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
    }
    headers
}

/// The credentials of a `Bearer` authorization header; any other scheme sends no bearer token.
fn bearer(authorization: Option<&str>) -> &str {
    let Some(value) = authorization.map(str::trim) else {
        return "";
    };
    match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => "",
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
    }
}

/// The identity an allowed request carries: each header with its `dynamic_metadata` field name (the
/// header's name without `x-s2s-`, in snake case), in the order of `CONTRACT_HEADERS`.
const IDENTITY: [(&str, &str); 7] = [
    (HEADER_CLIENT_APP_ID, "client_app_id"),
    (HEADER_TENANT_ID, "tenant_id"),
    (HEADER_OBJECT_ID, "object_id"),
    (HEADER_APPLICATION_USER_ID, "application_user_id"),
    (HEADER_APPLICATION_USER_NAME, "application_user_name"),
    (HEADER_SECURITY_ROLE, "security_role"),
    (HEADER_EFFECTIVE_USER, "effective_user"),
];

/// The response to Envoy. Built straight into the protobuf types, from borrowed values: on the hot path
/// every allocation here is one Envoy needs in the message.
pub fn check_response(
    decision: &Decision,
    request_headers: &HashMap<String, String>,
) -> pb::CheckResponse {
    match decision {
        Decision::Allow(a) => {
            let values: [Option<&str>; 7] = [
                a.caller.client_app_id.as_ref().map(|c| c.as_str()),
                Some(a.caller.tenant_id.as_str()),
                a.caller.object_id.as_ref().map(|o| o.as_str()),
                Some(&a.application_user_id),
                Some(&a.application_user_name),
                Some(&a.security_role),
                a.effective_user.as_ref().map(|u| u.as_str()),
            ];
            let mut headers = Vec::with_capacity(IDENTITY.len());
            let mut fields = std::collections::BTreeMap::new();
            // Every contract header not set here is removed, whatever the caller sent.
            let mut headers_to_remove = Vec::with_capacity(2);
            for ((name, field), value) in IDENTITY.iter().zip(values) {
                // An empty value (e.g. no `oid`) is not set, so it is removed like any other unset header.
                match value.filter(|v| !v.is_empty()) {
                    Some(v) => {
                        headers.push(header(name, v));
                        fields.insert((*field).to_owned(), string_value(v));
                    }
                    None => headers_to_remove.push((*name).to_owned()),
                }
            }
            headers_to_remove.push(HEADER_DENY_REASON.to_owned());
            // And so is any other `x-s2s-*` header the caller made up, in a stable order.
            let mut spoofed: Vec<&String> = request_headers
                .keys()
                .filter(|k| k.starts_with("x-s2s-") && !CONTRACT_HEADERS.contains(&k.as_str()))
                .collect();
            if !spoofed.is_empty() {
                spoofed.sort();
                headers_to_remove.extend(spoofed.into_iter().cloned());
            }
            pb::CheckResponse {
                status: Some(rpc::Status {
                    code: CODE_OK,
                    message: String::new(),
                    details: Vec::new(),
                }),
                http_response: Some(pb::check_response::HttpResponse::OkResponse(
                    pb::OkHttpResponse {
                        headers,
                        headers_to_remove,
                        ..pb::OkHttpResponse::default()
                    },
                )),
                dynamic_metadata: Some(prost_types::Struct { fields }),
            }
        }
        Decision::Deny(d) => {
            let reason = d.reason.as_str();
            let (http, code, error, challenge) = deny_shape(d.reason);
            let mut headers = Vec::with_capacity(3);
            headers.push(header(HEADER_DENY_REASON, reason));
            headers.push(header("content-type", "application/json"));
            if let Some(challenge) = challenge {
                headers.push(header("www-authenticate", challenge));
            }
            // Both values are fixed ASCII identifiers (`error` from `deny_shape`, `reason` an enum name):
            // nothing to escape, so no JSON serializer is needed.
            let body = format!(r#"{{"error":"{error}","reason":"{reason}"}}"#);
            let metadata = prost_types::Struct {
                fields: [("deny_reason".to_owned(), string_value(reason))]
                    .into_iter()
                    .collect(),
            };
            pb::CheckResponse {
                status: Some(rpc::Status {
                    code,
                    message: reason.to_owned(),
                    details: Vec::new(),
                }),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                    pb::DeniedHttpResponse {
                        status: Some(HttpStatus { code: http as i32 }),
                        headers,
                        body,
                    },
                )),
                dynamic_metadata: Some(metadata),
            }
        }
    }
}

/// HTTP status, gRPC code, JSON `error` and `www-authenticate` challenge for a deny (SPEC §2.2, RFC 6750).
fn deny_shape(reason: DenyReason) -> (StatusCode, i32, &'static str, Option<&'static str>) {
    match reason.problem_kind() {
        ProblemKind::NoCredentials => (
            StatusCode::Unauthorized,
            CODE_UNAUTHENTICATED,
            "unauthorized",
            Some("Bearer"),
        ),
        ProblemKind::Token => (
            StatusCode::Unauthorized,
            CODE_UNAUTHENTICATED,
            "invalid_token",
            Some("Bearer error=\"invalid_token\""),
        ),
        ProblemKind::Authorization => (
            StatusCode::Forbidden,
            CODE_PERMISSION_DENIED,
            "insufficient_scope",
            Some("Bearer error=\"insufficient_scope\""),
        ),
        ProblemKind::Unavailable => (
            StatusCode::ServiceUnavailable,
            CODE_UNAVAILABLE,
            "temporarily_unavailable",
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_credentials_are_tokens() {
        assert_eq!(bearer(Some("Bearer abc")), "abc");
        assert_eq!(bearer(Some("bearer   abc ")), "abc");
        assert_eq!(bearer(Some("Basic abc")), "");
        assert_eq!(bearer(Some("Bearer")), "");
        assert_eq!(bearer(None), "");
    }

    #[test]
    fn denies_have_the_contract_shape() {
        for reason in DenyReason::ALL {
            let response = check_response(&Decision::deny(reason, "x"), &HashMap::new());
            let Some(pb::check_response::HttpResponse::DeniedResponse(denied)) =
                response.http_response
            else {
                panic!("deny must carry a denied response");
            };
            let status = denied.status.map(|s| s.code).unwrap_or_default();
            let find = |k: &str| {
                denied
                    .headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .find(|h| h.key == k)
                    .map(|h| h.value.clone())
            };
            assert_eq!(find(HEADER_DENY_REASON).as_deref(), Some(reason.as_str()));
            let code = response.status.map(|s| s.code).unwrap_or_default();
            match reason.problem_kind() {
                ProblemKind::NoCredentials => {
                    assert_eq!((status, code), (401, 16));
                    assert_eq!(find("www-authenticate").as_deref(), Some("Bearer"));
                }
                ProblemKind::Token => {
                    assert_eq!((status, code), (401, 16));
                    assert_eq!(
                        find("www-authenticate").as_deref(),
                        Some("Bearer error=\"invalid_token\"")
                    );
                }
                ProblemKind::Authorization => {
                    assert_eq!((status, code), (403, 7));
                    assert_eq!(
                        find("www-authenticate").as_deref(),
                        Some("Bearer error=\"insufficient_scope\"")
                    );
                }
                ProblemKind::Unavailable => {
                    assert_eq!((status, code), (503, 14));
                    assert_eq!(find("www-authenticate"), None);
                }
            }
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            assert_eq!(body["reason"], reason.as_str());
            // Byte for byte what a JSON serializer writes for the same object.
            let (_, _, error, _) = deny_shape(reason);
            assert_eq!(
                denied.body,
                serde_json::json!({ "error": error, "reason": reason.as_str() }).to_string()
            );
        }
    }

    fn allowed(object_id: Option<&str>, effective_user: Option<&str>) -> Decision {
        use crate::core::ids::{ClientAppId, ObjectId, TenantId};
        Decision::Allow(Box::new(crate::core::Allowed {
            caller: crate::core::Caller {
                tenant_id: TenantId::new("3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
                client_app_id: Some(ClientAppId::new("6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c")),
                object_id: object_id.map(ObjectId::new),
                token_version: Some("2.0".to_owned()),
                expires_at: 1_800_000_000,
            },
            application_user_id: "b78befa5-dc17-53a5-9661-c01e97822d0f".to_owned(),
            application_user_name: "Orders Service".to_owned(),
            entry_name: "orders-service".to_owned(),
            security_role: "Orders Integration".to_owned(),
            effective_user: effective_user.map(ObjectId::new),
        }))
    }

    /// (headers set, in order), headers_to_remove, dynamic_metadata as (field, value) in key order.
    type AllowShape = (Vec<(String, String)>, Vec<String>, Vec<(String, String)>);

    fn allow_shape(response: pb::CheckResponse) -> AllowShape {
        assert_eq!(response.status.map(|s| s.code), Some(CODE_OK));
        let Some(pb::check_response::HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("allow must carry an ok response");
        };
        let set = ok
            .headers
            .into_iter()
            .map(|h| {
                assert_eq!(
                    h.append_action,
                    HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    "identity headers overwrite"
                );
                let h = h.header.unwrap();
                (h.key, h.value)
            })
            .collect();
        let metadata = response
            .dynamic_metadata
            .unwrap()
            .fields
            .into_iter()
            .map(|(k, v)| match v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => (k, s),
                other => panic!("metadata `{k}` is not a string: {other:?}"),
            })
            .collect();
        (set, ok.headers_to_remove, metadata)
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn an_allow_sets_the_identity_and_removes_every_other_s2s_header() {
        let sent: HashMap<String, String> = [
            ("x-s2s-tenant-id", "spoofed"),
            ("x-s2s-zzz", "made up"),
            ("x-s2s-effective-user", "spoofed"),
            ("x-s2s-aaa", "made up"),
            ("x-other", "kept"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (set, removed, metadata) = allow_shape(check_response(
            &allowed(Some("9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a"), None),
            &sent,
        ));
        assert_eq!(
            set,
            pairs(&[
                (
                    "x-s2s-client-app-id",
                    "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c"
                ),
                ("x-s2s-tenant-id", "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
                ("x-s2s-object-id", "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a"),
                (
                    "x-s2s-application-user-id",
                    "b78befa5-dc17-53a5-9661-c01e97822d0f"
                ),
                ("x-s2s-application-user-name", "Orders Service"),
                ("x-s2s-security-role", "Orders Integration"),
            ])
        );
        // The contract's unset headers in contract order, then what the caller made up, sorted.
        assert_eq!(
            removed,
            [
                "x-s2s-effective-user",
                "x-s2s-deny-reason",
                "x-s2s-aaa",
                "x-s2s-zzz"
            ]
        );
        assert_eq!(
            metadata,
            pairs(&[
                (
                    "application_user_id",
                    "b78befa5-dc17-53a5-9661-c01e97822d0f"
                ),
                ("application_user_name", "Orders Service"),
                ("client_app_id", "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c"),
                ("object_id", "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a"),
                ("security_role", "Orders Integration"),
                ("tenant_id", "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
            ])
        );
    }

    #[test]
    fn an_allow_without_an_object_id_removes_it_and_an_impersonation_sets_the_effective_user() {
        let (set, removed, metadata) = allow_shape(check_response(
            &allowed(None, Some("44444444-5e4d-4c3b-8a29-1f0e9d8c7b6a")),
            &HashMap::new(),
        ));
        let names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-s2s-client-app-id",
                "x-s2s-tenant-id",
                "x-s2s-application-user-id",
                "x-s2s-application-user-name",
                "x-s2s-security-role",
                "x-s2s-effective-user"
            ]
        );
        assert_eq!(removed, ["x-s2s-object-id", "x-s2s-deny-reason"]);
        assert!(metadata.iter().all(|(k, _)| k != "object_id"));
        assert!(metadata.contains(&(
            "effective_user".to_owned(),
            "44444444-5e4d-4c3b-8a29-1f0e9d8c7b6a".to_owned()
        )));
    }

    mod properties {
        //! The adapter's conversions on arbitrary input: whatever Envoy (or anything speaking its
        //! protocol) sends, the headers come out lower-cased, only a `Bearer` credential is a token,
        //! and every decision becomes a well-formed `CheckResponse`.
        use super::*;
        use crate::core::ids::{ClientAppId, ObjectId, TenantId};
        use crate::proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
        use proptest::prelude::*;
        use proptest::sample::select;

        fn arb_name() -> impl Strategy<Value = String> {
            prop_oneof![
                select(vec![
                    "authorization",
                    "Authorization",
                    "AUTHORIZATION",
                    "x-s2s-tenant-id",
                    "X-S2S-Security-Role",
                    "x-s2s-deny-reason",
                    "x-s2s-made-up",
                    "clienttype",
                    "callerobjectid",
                ])
                .prop_map(str::to_owned),
                ".{0,12}",
            ]
        }

        fn arb_value() -> impl Strategy<Value = String> {
            prop_oneof![
                select(vec![
                    "Bearer ",
                    "bearer a.b.c",
                    "Basic dXNlcg==",
                    "Bearer\ta.b.c",
                    " BEARER  x "
                ])
                .prop_map(str::to_owned),
                ".{0,24}",
            ]
        }

        /// An HTTP request as Envoy may send it: a header map, or raw headers (possibly repeated,
        /// with values that are not UTF-8), or both.
        fn arb_http() -> impl Strategy<Value = pb::attribute_context::HttpRequest> {
            let raw = (
                arb_name(),
                arb_value(),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
            )
                .prop_map(|(key, value, raw_value)| match raw_value {
                    Some(raw_value) => HeaderValue {
                        key,
                        value: String::new(),
                        raw_value,
                    },
                    None => HeaderValue {
                        key,
                        value,
                        raw_value: Vec::new(),
                    },
                });
            (
                prop::collection::hash_map(arb_name(), arb_value(), 0..6),
                prop::option::of(prop::collection::vec(raw, 0..6)),
                ".{0,8}",
                ".{0,24}",
            )
                .prop_map(|(headers, raw, method, path)| {
                    pb::attribute_context::HttpRequest {
                        headers,
                        header_map: raw.map(|headers| HeaderMap { headers }),
                        method,
                        path,
                        ..Default::default()
                    }
                })
        }

        fn arb_decision() -> impl Strategy<Value = Decision> {
            let id = || prop::option::of(".{0,12}");
            prop_oneof![
                (select(DenyReason::ALL.to_vec()), ".{0,16}").prop_map(|(reason, message)| {
                    Decision::deny(reason, format!("message: {message}"))
                }),
                (id(), id(), ".{0,12}", ".{0,12}", ".{0,12}", id()).prop_map(
                    |(app, oid, user_id, user_name, role, effective)| {
                        Decision::Allow(Box::new(crate::core::Allowed {
                            caller: crate::core::Caller {
                                tenant_id: TenantId::new("3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
                                client_app_id: app.as_deref().map(ClientAppId::new),
                                object_id: oid.as_deref().map(ObjectId::new),
                                token_version: Some("2.0".to_owned()),
                                expires_at: 1_800_000_000,
                            },
                            application_user_id: user_id,
                            application_user_name: user_name,
                            entry_name: "entry".to_owned(),
                            security_role: role,
                            effective_user: effective.as_deref().map(ObjectId::new),
                        }))
                    }
                ),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_requests_convert_to_lower_case_headers_and_a_bearer_token(mut http in arb_http()) {
                let sent_headers: Vec<String> = http.headers.keys().cloned().collect();
                let sent_raw: Vec<String> = http
                    .header_map
                    .iter()
                    .flat_map(|m| m.headers.iter().map(|h| h.key.clone()))
                    .collect();
                let headers = request_headers(&mut http);
                prop_assert!(headers.keys().all(|k| !k.bytes().any(|b| b.is_ascii_uppercase())));
                // The header map wins when present; raw headers are read only without it.
                let expected = if sent_headers.is_empty() { sent_raw } else { sent_headers };
                for key in expected {
                    prop_assert!(headers.contains_key(&key.to_ascii_lowercase()), "{key:?} lost");
                }
                let authorization = headers.get("authorization").map(String::as_str);
                let token = bearer(authorization);
                if !token.is_empty() {
                    let value = authorization.unwrap_or_default().trim();
                    prop_assert!(value.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
                    prop_assert!(value.ends_with(token));
                    prop_assert_eq!(token, token.trim());
                }
            }

            #[test]
            fn every_decision_becomes_a_well_formed_check_response(
                decision in arb_decision(),
                sent in prop::collection::hash_map(arb_name().prop_map(|k| k.to_ascii_lowercase()), arb_value(), 0..6),
            ) {
                let response = check_response(&decision, &sent);
                let code = response.status.as_ref().map(|s| s.code);
                match (&decision, response.http_response) {
                    (Decision::Allow(_), Some(pb::check_response::HttpResponse::OkResponse(ok))) => {
                        prop_assert_eq!(code, Some(CODE_OK));
                        let set: Vec<&str> = ok
                            .headers
                            .iter()
                            .filter_map(|h| h.header.as_ref().map(|h| h.key.as_str()))
                            .collect();
                        // Every contract header is set or removed, never both; nothing the caller
                        // sent under `x-s2s-` survives unless the sidecar set it.
                        for name in CONTRACT_HEADERS {
                            let removed = ok.headers_to_remove.iter().any(|r| r == name);
                            prop_assert!(set.contains(&name) != removed, "{name}: set {set:?}, removed {:?}", ok.headers_to_remove);
                        }
                        for name in sent.keys().filter(|k| k.starts_with("x-s2s-")) {
                            prop_assert!(
                                set.contains(&name.as_str()) || ok.headers_to_remove.contains(name),
                                "{name} kept"
                            );
                        }
                    }
                    (Decision::Deny(d), Some(pb::check_response::HttpResponse::DeniedResponse(denied))) => {
                        let (http, grpc, _, challenge) = deny_shape(d.reason);
                        prop_assert_eq!(code, Some(grpc));
                        prop_assert_ne!(grpc, CODE_OK);
                        prop_assert_eq!(denied.status.map(|s| s.code), Some(http as i32));
                        let find = |k: &str| {
                            denied
                                .headers
                                .iter()
                                .filter_map(|h| h.header.as_ref())
                                .find(|h| h.key == k)
                                .map(|h| h.value.clone())
                        };
                        let deny_reason = find(HEADER_DENY_REASON);
                        prop_assert_eq!(deny_reason.as_deref(), Some(d.reason.as_str()));
                        let sent_challenge = find("www-authenticate");
                        prop_assert_eq!(sent_challenge.as_deref(), challenge);
                        let body: serde_json::Value = serde_json::from_str(&denied.body)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(body["reason"].as_str(), Some(d.reason.as_str()));
                        // The human message never reaches the proxy's client.
                        prop_assert!(!denied.body.contains("message:"));
                    }
                    (_, other) => prop_assert!(false, "{decision:?} became {other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_header_map_is_taken_from_the_request_with_lower_case_names() {
        let mut http = pb::attribute_context::HttpRequest {
            headers: [("Authorization", "Bearer t"), ("x-s2s-tenant-id", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        };
        let headers = request_headers(&mut http);
        assert_eq!(
            headers.get("authorization").map(String::as_str),
            Some("Bearer t")
        );
        assert!(headers.contains_key("x-s2s-tenant-id"));
        assert!(http.headers.is_empty(), "moved, not copied");
    }
}

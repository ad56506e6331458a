//! `envoy.service.auth.v3.Authorization/Check`: Envoy's external authorization API.
//!
//! The RPC always returns gRPC OK: allow and deny live in the `CheckResponse`, because an RPC error
//! would hand the decision to Envoy's `failure_mode_allow`.

use crate::core::decision::Request;
use crate::core::{Decision, DenyReason, ProblemKind};
use crate::engine::Authorizer;
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
        let http = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .unwrap_or_default();
        let headers = request_headers(&http);
        let token = bearer(headers.get("authorization").map(String::as_str));
        let core_request = Request {
            token,
            method: &http.method,
            path: &http.path,
            headers: &headers,
        };
        let evaluation = self.authorizer.decide(&core_request, false).await;
        Ok(Response::new(check_response(
            &evaluation.decision,
            &headers,
        )))
    }
}

/// Envoy sends `headers` normally and `header_map` when configured to send raw bytes; accept either.
fn request_headers(http: &pb::attribute_context::HttpRequest) -> HashMap<String, String> {
    if !http.headers.is_empty() {
        return super::lower_case_keys(http.headers.clone());
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

pub fn check_response(
    decision: &Decision,
    request_headers: &HashMap<String, String>,
) -> pb::CheckResponse {
    match decision {
        Decision::Allow(a) => {
            let mut set: Vec<(&str, String)> = vec![
                (
                    HEADER_CLIENT_APP_ID,
                    a.caller
                        .client_app_id
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                ),
                (HEADER_TENANT_ID, a.caller.tenant_id.to_string()),
                (
                    HEADER_OBJECT_ID,
                    a.caller
                        .object_id
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                ),
                (HEADER_APPLICATION_USER_ID, a.application_user_id.clone()),
                (
                    HEADER_APPLICATION_USER_NAME,
                    a.application_user_name.clone(),
                ),
                (HEADER_SECURITY_ROLE, a.security_role.clone()),
            ];
            if let Some(user) = &a.effective_user {
                set.push((HEADER_EFFECTIVE_USER, user.to_string()));
            }
            // An empty value (e.g. no `oid`) is not set, so it is removed like any other unset header.
            set.retain(|(_, v)| !v.is_empty());
            let is_set = |name: &str| set.iter().any(|(k, _)| *k == name);
            let mut headers_to_remove: Vec<String> = CONTRACT_HEADERS
                .iter()
                .filter(|h| !is_set(h))
                .map(|h| (*h).to_owned())
                .collect();
            let mut spoofed: Vec<&String> = request_headers
                .keys()
                .filter(|k| {
                    k.starts_with("x-s2s-") && !is_set(k) && !CONTRACT_HEADERS.contains(&k.as_str())
                })
                .collect();
            spoofed.sort();
            headers_to_remove.extend(spoofed.into_iter().cloned());
            let metadata = prost_types::Struct {
                fields: set
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.trim_start_matches("x-s2s-").replace('-', "_"),
                            string_value(v),
                        )
                    })
                    .collect(),
            };
            pb::CheckResponse {
                status: Some(rpc::Status {
                    code: CODE_OK,
                    message: String::new(),
                    details: Vec::new(),
                }),
                http_response: Some(pb::check_response::HttpResponse::OkResponse(
                    pb::OkHttpResponse {
                        headers: set.iter().map(|(k, v)| header(k, v)).collect(),
                        headers_to_remove,
                        ..pb::OkHttpResponse::default()
                    },
                )),
                dynamic_metadata: Some(metadata),
            }
        }
        Decision::Deny(d) => {
            let (http, code, error, challenge) = deny_shape(d.reason);
            let mut headers = vec![
                header(HEADER_DENY_REASON, d.reason.as_str()),
                header("content-type", "application/json"),
            ];
            if let Some(challenge) = challenge {
                headers.push(header("www-authenticate", challenge));
            }
            let body =
                serde_json::json!({ "error": error, "reason": d.reason.as_str() }).to_string();
            let metadata = prost_types::Struct {
                fields: [("deny_reason".to_owned(), string_value(d.reason.as_str()))]
                    .into_iter()
                    .collect(),
            };
            pb::CheckResponse {
                status: Some(rpc::Status {
                    code,
                    message: d.reason.as_str().to_owned(),
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
        }
    }
}

//! `s2sauthz.v1.Authorizer`: the native decision API.

use crate::core::decision::Request;
use crate::core::{Decision, Outcome, TraceStep};
use crate::engine::Authorizer;
use crate::proto::s2sauthz::v1 as pb;
use std::sync::Arc;
use tonic::{Response, Status};

pub struct NativeApi {
    authorizer: Arc<Authorizer>,
}

impl NativeApi {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        NativeApi { authorizer }
    }

    async fn run(
        &self,
        request: pb::DecideRequest,
        explain: bool,
    ) -> (pb::DecideResponse, Vec<TraceStep>) {
        let context = request.context.unwrap_or_default();
        let headers = super::lower_case_keys(context.headers);
        let core_request = Request {
            token: &request.token,
            method: &context.method,
            path: &context.path,
            headers: &headers,
            source_principal: Some(context.source_principal.as_str()).filter(|p| !p.is_empty()),
        };
        let evaluation = self.authorizer.decide(&core_request, explain).await;
        (to_response(&evaluation.decision), evaluation.trace)
    }
}

#[tonic::async_trait]
impl pb::authorizer_server::Authorizer for NativeApi {
    async fn decide(
        &self,
        request: tonic::Request<pb::DecideRequest>,
    ) -> Result<Response<pb::DecideResponse>, Status> {
        let (response, _) = self.run(request.into_inner(), false).await;
        Ok(Response::new(response))
    }

    async fn explain(
        &self,
        request: tonic::Request<pb::DecideRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let (decision, trace) = self.run(request.into_inner(), true).await;
        let trace = trace
            .into_iter()
            .map(|step| pb::TraceStep {
                check: step.check.as_str().to_owned(),
                outcome: match step.outcome {
                    Outcome::Passed => pb::CheckOutcome::Passed,
                    Outcome::Failed => pb::CheckOutcome::Failed,
                    Outcome::Skipped => pb::CheckOutcome::Skipped,
                } as i32,
                detail: step.detail,
            })
            .collect();
        Ok(Response::new(pb::ExplainResponse {
            decision: Some(decision),
            trace,
        }))
    }
}

pub fn deny_reason(reason: crate::core::DenyReason) -> pb::DenyReason {
    use crate::core::DenyReason as R;
    match reason {
        R::TokenMissing => pb::DenyReason::TokenMissing,
        R::TokenMalformed => pb::DenyReason::TokenMalformed,
        R::TokenTooLarge => pb::DenyReason::TokenTooLarge,
        R::AlgorithmNotAllowed => pb::DenyReason::AlgorithmNotAllowed,
        R::KeyNotFound => pb::DenyReason::KeyNotFound,
        R::SignatureInvalid => pb::DenyReason::SignatureInvalid,
        R::TokenExpired => pb::DenyReason::TokenExpired,
        R::TokenNotYetValid => pb::DenyReason::TokenNotYetValid,
        R::IssuerNotTrusted => pb::DenyReason::IssuerNotTrusted,
        R::AudienceMismatch => pb::DenyReason::AudienceMismatch,
        R::NotAppToken => pb::DenyReason::NotAppToken,
        R::ApplicationNotAllowed => pb::DenyReason::ApplicationNotAllowed,
        R::ApplicationDisabled => pb::DenyReason::ApplicationDisabled,
        R::RoleMissing => pb::DenyReason::RoleMissing,
        R::ClientTypeMissing => pb::DenyReason::ClientTypeMissing,
        R::PrivilegeMissing => pb::DenyReason::PrivilegeMissing,
        R::ImpersonationNotAllowed => pb::DenyReason::ImpersonationNotAllowed,
        R::IssuerUnavailable => pb::DenyReason::IssuerUnavailable,
    }
}

fn caller(c: &crate::core::Caller) -> pb::Caller {
    pb::Caller {
        tenant_id: c.tenant_id.to_string(),
        client_app_id: c
            .client_app_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        object_id: c
            .object_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        token_version: c.token_version.clone().unwrap_or_default(),
        expires_at: c.expires_at,
    }
}

pub fn to_response(decision: &Decision) -> pb::DecideResponse {
    match decision {
        Decision::Allow(a) => pb::DecideResponse {
            allowed: true,
            reason: pb::DenyReason::Unspecified as i32,
            message: "allowed".to_owned(),
            caller: Some(caller(&a.caller)),
            application_user: Some(pb::ApplicationUserRef {
                id: a.application_user_id.clone(),
                name: a.application_user_name.clone(),
                entry_name: a.entry_name.clone(),
            }),
            security_role: Some(pb::SecurityRoleRef {
                name: a.security_role.clone(),
            }),
            effective_user_object_id: a
                .effective_user
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        },
        Decision::Deny(d) => pb::DecideResponse {
            allowed: false,
            reason: deny_reason(d.reason) as i32,
            message: d.message.clone(),
            caller: d.caller.as_ref().map(caller),
            application_user: None,
            security_role: None,
            effective_user_object_id: String::new(),
        },
    }
}

//! Admission to the admin port: when admin calls need a token (always, when the admin port is not on
//! loopback), every call to `s2sauthz.v1.Registry` must carry `authorization: Bearer <token>`, a token
//! that passes the same verification as a decision's (trusted issuer, signature, lifetime, audience,
//! `clienttype` where required) and whose `roles` hold the admin app role. Refused calls are answered
//! UNAUTHENTICATED (no or bad token) or PERMISSION_DENIED (no admin role), and logged with the peer, the
//! method and the reason, never the token.
//!
//! It wraps the generated `RegistryServer` as a tower service, so no handler can be reached around it.

use crate::core::decision::{Headers, Request};
use crate::engine::{Authorizer, token_hash};
use crate::transport::PeerInfo;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// Who may call: the admin app role.
#[derive(Debug)]
pub struct AdminPolicy {
    authorizer: Arc<Authorizer>,
    role: String,
}

impl AdminPolicy {
    pub fn new(authorizer: Arc<Authorizer>, role: String) -> Arc<Self> {
        Arc::new(AdminPolicy { authorizer, role })
    }

    /// Admits the call, or says why not.
    async fn admit(&self, headers: &http::HeaderMap) -> Result<Admitted, Status> {
        let headers = HttpHeaders(headers);
        let Some(authorization) = headers.header("authorization") else {
            return Err(Status::unauthenticated(
                "admin calls need `authorization: Bearer <token>` with the admin app role",
            ));
        };
        let request = Request {
            token: authorization,
            method: "POST",
            path: "",
            headers: &headers,
            source_principal: None,
        };
        let verified = self
            .authorizer
            .authenticate(&request)
            .await
            .map_err(|denied| {
                Status::unauthenticated(format!(
                    "admin token refused: {} ({})",
                    denied.reason.as_str(),
                    denied.message
                ))
            })?;
        let caller = verified.caller();
        if !verified.claims.app.has_role(&self.role) {
            return Err(Status::permission_denied(format!(
                "the token's `roles` do not include the admin app role `{}`",
                self.role
            )));
        }
        Ok(Admitted {
            tenant_id: caller.tenant_id.to_string(),
            client_app_id: caller
                .client_app_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            token_hash: token_hash(crate::core::decision::bearer_token(authorization)),
        })
    }
}

struct Admitted {
    tenant_id: String,
    client_app_id: String,
    token_hash: String,
}

/// `http::HeaderMap` as the core's header lookup (gRPC metadata keys are lower case).
struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Headers for HttpHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The admin service behind its admission check.
#[derive(Clone, Debug)]
pub struct AdminGuard<S> {
    inner: S,
    policy: Arc<AdminPolicy>,
}

impl<S> AdminGuard<S> {
    pub fn new(inner: S, policy: Arc<AdminPolicy>) -> Self {
        AdminGuard { inner, policy }
    }
}

impl<S: NamedService> NamedService for AdminGuard<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tonic::codegen::Service<http::Request<Body>> for AdminGuard<S>
where
    S: tonic::codegen::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move {
            let method = request.uri().path().to_owned();
            let info = request.extensions().get::<PeerInfo>();
            let peer = info
                .and_then(|i| i.remote_addr)
                .map(|a| a.to_string())
                .unwrap_or_default();
            // Under mutual TLS, which certificate the caller presented (verified by the handshake).
            let client_cert = info
                .and_then(|i| i.client_certificate.as_ref())
                .map(|c| c.fingerprint())
                .unwrap_or_default();
            match policy.admit(request.headers()).await {
                Ok(admitted) => {
                    tracing::info!(
                        target: "s2s_authz::admin",
                        %peer,
                        client_cert,
                        method,
                        tenant_id = admitted.tenant_id,
                        client_app_id = admitted.client_app_id,
                        token_hash = admitted.token_hash,
                        "admin call admitted"
                    );
                    inner.call(request).await
                }
                Err(status) => {
                    tracing::warn!(
                        target: "s2s_authz::admin",
                        %peer,
                        client_cert,
                        method,
                        code = ?status.code(),
                        reason = status.message(),
                        "admin call refused"
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}

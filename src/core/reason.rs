//! The stable deny reasons of the contract (SPEC §2.3) and how each maps to an HTTP answer.

use std::fmt;

/// Why a request was denied. The names are part of the public contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    TokenMissing,
    TokenMalformed,
    TokenTooLarge,
    AlgorithmNotAllowed,
    KeyNotFound,
    SignatureInvalid,
    TokenExpired,
    TokenNotYetValid,
    IssuerNotTrusted,
    AudienceMismatch,
    NotAppToken,
    ApplicationNotAllowed,
    ApplicationDisabled,
    RoleMissing,
    ClientTypeMissing,
    PrivilegeMissing,
    ImpersonationNotAllowed,
    IssuerUnavailable,
}

/// What kind of problem a deny is, which decides the HTTP status and challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// No credentials at all: 401 with a bare `Bearer` challenge (RFC 6750 §3.1).
    NoCredentials,
    /// The token is at fault: 401 `invalid_token`.
    Token,
    /// The token is fine but grants too little: 403 `insufficient_scope`.
    Authorization,
    /// Nobody's fault but the identity provider's: 503, no challenge.
    Unavailable,
}

impl DenyReason {
    pub const ALL: [DenyReason; 18] = [
        Self::TokenMissing,
        Self::TokenMalformed,
        Self::TokenTooLarge,
        Self::AlgorithmNotAllowed,
        Self::KeyNotFound,
        Self::SignatureInvalid,
        Self::TokenExpired,
        Self::TokenNotYetValid,
        Self::IssuerNotTrusted,
        Self::AudienceMismatch,
        Self::NotAppToken,
        Self::ApplicationNotAllowed,
        Self::ApplicationDisabled,
        Self::RoleMissing,
        Self::ClientTypeMissing,
        Self::PrivilegeMissing,
        Self::ImpersonationNotAllowed,
        Self::IssuerUnavailable,
    ];

    /// The contract's name for the reason, as used in headers, metrics and JSON bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenMissing => "TOKEN_MISSING",
            Self::TokenMalformed => "TOKEN_MALFORMED",
            Self::TokenTooLarge => "TOKEN_TOO_LARGE",
            Self::AlgorithmNotAllowed => "ALGORITHM_NOT_ALLOWED",
            Self::KeyNotFound => "KEY_NOT_FOUND",
            Self::SignatureInvalid => "SIGNATURE_INVALID",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::TokenNotYetValid => "TOKEN_NOT_YET_VALID",
            Self::IssuerNotTrusted => "ISSUER_NOT_TRUSTED",
            Self::AudienceMismatch => "AUDIENCE_MISMATCH",
            Self::NotAppToken => "NOT_APP_TOKEN",
            Self::ApplicationNotAllowed => "APPLICATION_NOT_ALLOWED",
            Self::ApplicationDisabled => "APPLICATION_DISABLED",
            Self::RoleMissing => "ROLE_MISSING",
            Self::ClientTypeMissing => "CLIENT_TYPE_MISSING",
            Self::PrivilegeMissing => "PRIVILEGE_MISSING",
            Self::ImpersonationNotAllowed => "IMPERSONATION_NOT_ALLOWED",
            Self::IssuerUnavailable => "ISSUER_UNAVAILABLE",
        }
    }

    pub fn problem_kind(self) -> ProblemKind {
        match self {
            Self::TokenMissing => ProblemKind::NoCredentials,
            Self::IssuerUnavailable => ProblemKind::Unavailable,
            Self::TokenMalformed
            | Self::TokenTooLarge
            | Self::AlgorithmNotAllowed
            | Self::KeyNotFound
            | Self::SignatureInvalid
            | Self::TokenExpired
            | Self::TokenNotYetValid
            | Self::IssuerNotTrusted
            | Self::AudienceMismatch => ProblemKind::Token,
            Self::NotAppToken
            | Self::ApplicationNotAllowed
            | Self::ApplicationDisabled
            | Self::RoleMissing
            | Self::ClientTypeMissing
            | Self::PrivilegeMissing
            | Self::ImpersonationNotAllowed => ProblemKind::Authorization,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ten_and_unavailable_are_token_problems() {
        let token_side: Vec<_> = DenyReason::ALL
            .iter()
            .filter(|r| r.problem_kind() != ProblemKind::Authorization)
            .map(|r| r.as_str())
            .collect();
        assert_eq!(
            token_side,
            [
                "TOKEN_MISSING",
                "TOKEN_MALFORMED",
                "TOKEN_TOO_LARGE",
                "ALGORITHM_NOT_ALLOWED",
                "KEY_NOT_FOUND",
                "SIGNATURE_INVALID",
                "TOKEN_EXPIRED",
                "TOKEN_NOT_YET_VALID",
                "ISSUER_NOT_TRUSTED",
                "AUDIENCE_MISMATCH",
                "ISSUER_UNAVAILABLE"
            ]
        );
    }
}

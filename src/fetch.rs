//! Outbound HTTP for discovery and JWKS documents: https only (loopback excepted), a timeout on every
//! request, and a hard cap on the body size so a hostile or broken issuer cannot exhaust memory.

use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{0}` is not an https URL (plain http is allowed only on loopback hosts)")]
    InsecureUrl(String),
    #[error("`{0}` is not a valid URL")]
    InvalidUrl(String),
    #[error("request timed out")]
    Timeout,
    #[error("issuer answered HTTP {0}")]
    Status(u16),
    #[error("document is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("transport error: {0}")]
    Transport(String),
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

/// Fetches small JSON documents from identity providers.
#[derive(Clone, Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    max_bytes: usize,
}

impl Fetcher {
    pub fn new(timeout: Duration, max_bytes: usize) -> Result<Self, FetchError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect could leave the trusted host or drop to http; identity providers do not need one.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("s2s-authz/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Client(e.to_string()))?;
        Ok(Fetcher { client, max_bytes })
    }

    pub async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        check_url(url)?;
        let mut response = self.client.get(url).send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let limit = self.max_bytes;
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(FetchError::TooLarge { limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn classify(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout
    } else {
        // reqwest's messages name the URL, which is configuration, never a token or secret.
        FetchError::Transport(e.to_string())
    }
}

/// Discovery and JWKS URLs must be https, except on loopback hosts (local issuers and tests).
pub fn check_url(url: &str) -> Result<(), FetchError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| FetchError::InvalidUrl(url.to_owned()))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if parsed.host_str().is_some_and(is_loopback_host) => Ok(()),
        _ => Err(FetchError::InsecureUrl(url.to_owned())),
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://login.microsoftonline.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:8400/x").is_ok());
        assert!(check_url("http://[::1]:8400/x").is_ok());
        assert!(check_url("http://localhost/x").is_ok());
        assert!(matches!(
            check_url("http://login.microsoftonline.com/x"),
            Err(FetchError::InsecureUrl(_))
        ));
        assert!(matches!(
            check_url("http://10.0.0.1/x"),
            Err(FetchError::InsecureUrl(_))
        ));
        assert!(matches!(
            check_url("file:///etc/passwd"),
            Err(FetchError::InsecureUrl(_))
        ));
        assert!(matches!(
            check_url("not a url"),
            Err(FetchError::InvalidUrl(_))
        ));
    }
}

//! What the decision bench and the load generator share: the tenant, audience and application the
//! product is configured for, tokens signed for that application, and reading the product's metrics.

#[path = "../../tests/support/prom.rs"]
pub mod prom;

use s2s_authz::devissuer::{DevClient, DevIssuer, TokenVersion};

pub const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
pub const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
pub const AUDIENCE_GUID: &str = "b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
pub const APP: &str = "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c";

/// The calling application, as the development issuer knows it.
pub fn app() -> DevClient {
    DevClient {
        client_id: APP.to_owned(),
        client_secret: "bench".to_owned(),
        object_id: "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a".to_owned(),
        roles: vec!["S2SAppRole".to_owned()],
        token_version: TokenVersion::V2,
    }
}

/// `n` tokens for `app()`, each distinct (its own `uti`), signed on every core.
pub fn mint(dev: &DevIssuer, n: usize) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                scope.spawn(move || {
                    (0..count)
                        .map(|_| dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

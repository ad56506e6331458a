//! Token syntax: splits a compact JWS, decodes its header and claims strictly (RFC 7515, 7519, 8725)
//! and types the claims the decision needs. Nothing here is trusted yet: the signature is checked later.
//!
//! Errors name what is wrong, never what the token contained.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Tokens longer than this (without the `Bearer ` prefix) are refused before any parsing work.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token is not a well-formed JWT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("token must have three dot-separated segments")]
    Segments,
    #[error("{0} segment is not unpadded base64url")]
    Base64(Part),
    #[error("{0} segment is not a JSON object")]
    NotJsonObject(Part),
    #[error("{0} has a duplicate member name")]
    DuplicateName(Part),
    #[error("header `alg` is missing or not a string")]
    MissingAlg,
    #[error("header `crit` names extensions this service does not understand")]
    CriticalExtension,
    #[error("header `b64: false` (unencoded payload) is not accepted")]
    UnencodedPayload,
    #[error("nested JWTs are not accepted")]
    NestedJwt,
    #[error("claim `exp` is missing")]
    MissingExp,
    #[error("claim `{claim}` must be {expected}")]
    ClaimType {
        claim: &'static str,
        expected: &'static str,
    },
    #[error("configured claim `{0}` must be a string")]
    CustomClaimType(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Header,
    Claims,
    Signature,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Claims => "claims",
            Part::Signature => "signature",
        })
    }
}

/// The JOSE header fields the decision uses. `jku`, `x5u`, `jwk` and `x5c` are deliberately not read:
/// keys come only from the trusted issuer's JWKS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// The claims, typed where the contract needs a type, with the raw object kept for configured claim names.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Vec<String>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub tid: Option<String>,
    pub oid: Option<String>,
    pub appid: Option<String>,
    pub azp: Option<String>,
    pub ver: Option<String>,
    pub idtyp: Option<String>,
    pub scp: Option<String>,
    pub roles: Vec<String>,
    raw: Map<String, Value>,
}

impl Claims {
    /// A string claim under a configured name (generic OIDC issuers); absent is `None`, any other type an error.
    pub fn custom_str(&self, name: &str) -> Result<Option<&str>, SyntaxError> {
        match self.raw.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(SyntaxError::CustomClaimType(name.to_owned())),
        }
    }

    /// A roles-like claim under a configured name: an array of strings, or (some providers) one space-separated string.
    pub fn custom_roles(&self, name: &str) -> Result<Vec<String>, SyntaxError> {
        match self.raw.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
            Some(v) => string_array(v).ok_or_else(|| SyntaxError::CustomClaimType(name.to_owned())),
        }
    }
}

/// A token's signature segment: as sent, and decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureSegment<'a> {
    /// Base64url, as in the token.
    pub encoded: &'a str,
    pub bytes: Vec<u8>,
}

impl<'a> SignatureSegment<'a> {
    /// `None` unless `encoded` is canonical unpadded base64url.
    pub fn decode(encoded: &'a str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        Some(SignatureSegment { encoded, bytes })
    }
}

/// A syntactically valid token: what was signed, the signature, and the parsed parts.
#[derive(Clone, Debug)]
pub struct UnverifiedToken<'a> {
    pub header: Header,
    pub claims: Claims,
    /// `base64url(header) "." base64url(claims)`: the bytes the signature covers.
    pub signing_input: &'a str,
    /// The third segment.
    pub signature: SignatureSegment<'a>,
}

/// Parses a compact JWS. The caller has already stripped any `Bearer ` prefix and checked the size.
pub fn parse(token: &str) -> Result<UnverifiedToken<'_>, SyntaxError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SyntaxError::Segments);
    };
    // An empty signature is still a compact JWS (RFC 7515 §7.1): it is how `alg: none` tokens look, and
    // they must be refused as such by the algorithm check, not hidden as a syntax error.
    if h.is_empty() || c.is_empty() {
        return Err(SyntaxError::Segments);
    }
    // Decoded here, not only when verifying: a segment that is not canonical base64url is a syntax
    // failure (`TOKEN_MALFORMED`, SPEC §1), not a signature that happens not to verify.
    let signature = SignatureSegment::decode(s).ok_or(SyntaxError::Base64(Part::Signature))?;
    let header_obj = decode_object(h, Part::Header)?;
    let header = parse_header(&header_obj)?;
    let claims_obj = decode_object(c, Part::Claims)?;
    let claims = type_claims(claims_obj)?;
    Ok(UnverifiedToken {
        header,
        claims,
        signing_input: &token[..h.len() + 1 + c.len()],
        signature,
    })
}

fn decode_object(segment: &str, part: Part) -> Result<Map<String, Value>, SyntaxError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| SyntaxError::Base64(part))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let object = match <UniqueObject as de::Deserialize>::deserialize(&mut de) {
        Ok(UniqueObject(map)) => map,
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            return Err(SyntaxError::DuplicateName(part));
        }
        Err(_) => return Err(SyntaxError::NotJsonObject(part)),
    };
    de.end().map_err(|_| SyntaxError::NotJsonObject(part))?;
    Ok(object)
}

fn parse_header(obj: &Map<String, Value>) -> Result<Header, SyntaxError> {
    // We implement no JWS extensions, so any `crit` names something we do not understand (RFC 7515 §4.1.11).
    if obj.contains_key("crit") {
        return Err(SyntaxError::CriticalExtension);
    }
    match obj.get("b64") {
        None | Some(Value::Bool(true)) => {}
        Some(_) => return Err(SyntaxError::UnencodedPayload),
    }
    match obj.get("cty") {
        None => {}
        Some(Value::String(cty))
            if cty.eq_ignore_ascii_case("jwt") || cty.eq_ignore_ascii_case("application/jwt") =>
        {
            return Err(SyntaxError::NestedJwt);
        }
        Some(Value::String(_)) => {}
        // RFC 7515 §4.1.10: `cty` is a string. Anything else is not a header we can reason about.
        Some(_) => {
            return Err(SyntaxError::ClaimType {
                claim: "cty",
                expected: "a string",
            });
        }
    }
    let Some(Value::String(alg)) = obj.get("alg") else {
        return Err(SyntaxError::MissingAlg);
    };
    let kid = match obj.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => {
            return Err(SyntaxError::ClaimType {
                claim: "kid",
                expected: "a string",
            });
        }
    };
    Ok(Header {
        alg: alg.clone(),
        kid,
    })
}

fn type_claims(raw: Map<String, Value>) -> Result<Claims, SyntaxError> {
    let exp = match raw.get("exp") {
        None | Some(Value::Null) => return Err(SyntaxError::MissingExp),
        Some(v) => numeric_date(v).ok_or(SyntaxError::ClaimType {
            claim: "exp",
            expected: "a number of seconds",
        })?,
    };
    let nbf = match raw.get("nbf") {
        None | Some(Value::Null) => None,
        Some(v) => Some(numeric_date(v).ok_or(SyntaxError::ClaimType {
            claim: "nbf",
            expected: "a number of seconds",
        })?),
    };
    let aud = match raw.get("aud") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(v) => string_array(v).ok_or(SyntaxError::ClaimType {
            claim: "aud",
            expected: "a string or an array of strings",
        })?,
    };
    let roles = match raw.get("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => string_array(v).ok_or(SyntaxError::ClaimType {
            claim: "roles",
            expected: "an array of strings",
        })?,
    };
    Ok(Claims {
        iss: opt_string(&raw, "iss")?,
        sub: opt_string(&raw, "sub")?,
        aud,
        exp,
        nbf,
        tid: opt_string(&raw, "tid")?,
        oid: opt_string(&raw, "oid")?,
        appid: opt_string(&raw, "appid")?,
        azp: opt_string(&raw, "azp")?,
        ver: opt_string(&raw, "ver")?,
        idtyp: opt_string(&raw, "idtyp")?,
        scp: opt_string(&raw, "scp")?,
        roles,
        raw,
    })
}

fn opt_string(
    raw: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<String>, SyntaxError> {
    match raw.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SyntaxError::ClaimType {
            claim,
            expected: "a string",
        }),
    }
}

fn string_array(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|item| item.as_str().map(str::to_owned))
        .collect()
}

/// A NumericDate (RFC 7519 §2): integer or fractional seconds; fractions are truncated. Values that do not
/// fit an `i64` of seconds (JSON has no NaN, but `1e300` parses) are not dates.
fn numeric_date(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    // 2^53: beyond this, f64 seconds are not exact and no real token lives there.
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    (f.is_finite() && f.abs() < LIMIT).then(|| f.trunc() as i64)
}

const DUPLICATE: &str = "duplicate member name";

/// A JSON object whose member names are unique: RFC 7515 §5.2 lets a parser reject duplicates, and
/// rejecting them closes the door on parser-differential tricks (`{"aud":"a","aud":"b"}`).
struct UniqueObject(Map<String, Value>);

impl<'de> de::Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.insert(key, value).is_some() {
                        return Err(de::Error::custom(DUPLICATE));
                    }
                }
                Ok(UniqueObject(map))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(claims))
    }

    const H: &str = r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#;

    #[test]
    fn parses_a_well_formed_token() {
        let t = token(H, r#"{"exp":10,"aud":["a","b"],"roles":["r"],"nbf":1.9}"#);
        let parsed = parse(&t).unwrap();
        assert_eq!(parsed.header.alg, "RS256");
        assert_eq!(parsed.header.kid.as_deref(), Some("k1"));
        assert_eq!(parsed.claims.exp, 10);
        assert_eq!(parsed.claims.nbf, Some(1));
        assert_eq!(parsed.claims.aud, ["a", "b"]);
        assert_eq!(parsed.signature.encoded, "c2ln");
        assert_eq!(parsed.signature.bytes, b"sig");
        assert!(t.starts_with(parsed.signing_input));
    }

    #[test]
    fn rejects_malformed_inputs() {
        let cases: Vec<(String, SyntaxError)> = vec![
            ("a.b".into(), SyntaxError::Segments),
            ("a.b.c.d".into(), SyntaxError::Segments),
            (format!(".{}.c2ln", b64("{}")), SyntaxError::Segments),
            (
                format!("{}=.{}.c2ln", b64(H), b64("{}")),
                SyntaxError::Base64(Part::Header),
            ),
            (
                format!("{}.{}.c2ln+", b64(H), b64("{}")),
                SyntaxError::Base64(Part::Signature),
            ),
            // A signature segment of an impossible length, and one with non-zero trailing bits (a second
            // spelling of the same bytes).
            (
                format!("{}.{}.c2lnA", b64(H), b64("{}")),
                SyntaxError::Base64(Part::Signature),
            ),
            (
                format!("{}.{}.c2l", b64(H), b64("{}")),
                SyntaxError::Base64(Part::Signature),
            ),
            (token("[1]", "{}"), SyntaxError::NotJsonObject(Part::Header)),
            (
                token(H, "not json"),
                SyntaxError::NotJsonObject(Part::Claims),
            ),
            (
                token(H, r#"{"exp":1} x"#),
                SyntaxError::NotJsonObject(Part::Claims),
            ),
            (
                format!(
                    "{}.{}.c2ln",
                    b64(H),
                    URL_SAFE_NO_PAD.encode([0xff, 0xfe, b'{'])
                ),
                SyntaxError::NotJsonObject(Part::Claims),
            ),
            (
                token(H, r#"{"exp":1,"aud":"a","aud":"b"}"#),
                SyntaxError::DuplicateName(Part::Claims),
            ),
            (
                token(r#"{"alg":"RS256","alg":"none"}"#, "{}"),
                SyntaxError::DuplicateName(Part::Header),
            ),
            (
                token(r#"{"typ":"JWT"}"#, r#"{"exp":1}"#),
                SyntaxError::MissingAlg,
            ),
            (
                token(r#"{"alg":"RS256","crit":["exp"]}"#, r#"{"exp":1}"#),
                SyntaxError::CriticalExtension,
            ),
            (
                token(r#"{"alg":"RS256","b64":false}"#, r#"{"exp":1}"#),
                SyntaxError::UnencodedPayload,
            ),
            (
                token(r#"{"alg":"RS256","cty":"JWT"}"#, r#"{"exp":1}"#),
                SyntaxError::NestedJwt,
            ),
            (
                token(r#"{"alg":"RS256","cty":1}"#, r#"{"exp":1}"#),
                SyntaxError::ClaimType {
                    claim: "cty",
                    expected: "a string",
                },
            ),
            (token(H, r#"{"iss":"x"}"#), SyntaxError::MissingExp),
            (
                token(H, r#"{"exp":"1700000000"}"#),
                SyntaxError::ClaimType {
                    claim: "exp",
                    expected: "a number of seconds",
                },
            ),
            (
                token(H, r#"{"exp":1e300}"#),
                SyntaxError::ClaimType {
                    claim: "exp",
                    expected: "a number of seconds",
                },
            ),
            (
                token(H, r#"{"exp":1,"roles":"S2SAppRole"}"#),
                SyntaxError::ClaimType {
                    claim: "roles",
                    expected: "an array of strings",
                },
            ),
            (
                token(H, r#"{"exp":1,"roles":[1]}"#),
                SyntaxError::ClaimType {
                    claim: "roles",
                    expected: "an array of strings",
                },
            ),
            (
                token(H, r#"{"exp":1,"aud":5}"#),
                SyntaxError::ClaimType {
                    claim: "aud",
                    expected: "a string or an array of strings",
                },
            ),
            (
                token(H, r#"{"exp":1,"tid":7}"#),
                SyntaxError::ClaimType {
                    claim: "tid",
                    expected: "a string",
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(&input).unwrap_err(), expected, "input {input}");
        }
    }

    #[test]
    fn exp_beyond_json_range_is_malformed_not_a_panic() {
        // serde_json refuses numbers outside f64 range; that must surface as a typed error.
        let t = token(H, r#"{"exp":1e400}"#);
        assert!(parse(&t).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!(
            "{{\"exp\":1,\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(
            parse(&token(H, &deep)).unwrap_err(),
            SyntaxError::NotJsonObject(Part::Claims)
        );
    }

    #[test]
    fn custom_claims_are_typed_on_access() {
        let t = token(H, r#"{"exp":1,"client_id":"c","scope":"a b","n":1}"#);
        let parsed = parse(&t).unwrap();
        assert_eq!(parsed.claims.custom_str("client_id").unwrap(), Some("c"));
        assert_eq!(parsed.claims.custom_str("missing").unwrap(), None);
        assert!(parsed.claims.custom_str("n").is_err());
        assert_eq!(parsed.claims.custom_roles("scope").unwrap(), ["a", "b"]);
    }
}

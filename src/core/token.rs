//! Token syntax: splits a compact JWS, decodes its header and claims strictly (RFC 7515, 7519, 8725)
//! and types the claims the decision needs. Nothing here is trusted yet: the signature is checked later.
//!
//! Errors name what is wrong, never what the token contained.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

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

/// The claims, typed where the contract needs a type, with the decoded JSON kept for configured claim
/// names (generic OIDC issuers), which are read from it when asked for.
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
    raw: Vec<u8>,
}

impl Claims {
    /// A string claim under a configured name (generic OIDC issuers); absent is `None`, any other type an error.
    pub fn custom_str(&self, name: &str) -> Result<Option<String>, SyntaxError> {
        match find_member(&self.raw, name) {
            None | Some(Member::Null) => Ok(None),
            Some(Member::Str(s)) => Ok(Some(s)),
            Some(_) => Err(SyntaxError::CustomClaimType(name.to_owned())),
        }
    }

    /// A roles-like claim under a configured name: an array of strings, or (some providers) one space-separated string.
    pub fn custom_roles(&self, name: &str) -> Result<Vec<String>, SyntaxError> {
        match find_member(&self.raw, name) {
            None | Some(Member::Null) => Ok(Vec::new()),
            Some(Member::Str(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
            Some(Member::Strings(v)) => Ok(v),
            Some(_) => Err(SyntaxError::CustomClaimType(name.to_owned())),
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
    let (header, _) = decode_object::<HeaderMembers>(h, Part::Header)?;
    let header = parse_header(header)?;
    let (claims, raw) = decode_object::<ClaimMembers>(c, Part::Claims)?;
    let claims = type_claims(claims, raw)?;
    Ok(UnverifiedToken {
        header,
        claims,
        signing_input: &token[..h.len() + 1 + c.len()],
        signature,
    })
}

/// Decodes one base64url segment and reads it as a JSON object whose member names are unique, in one
/// pass: the members `M` names are kept as [`Member`]s, every other member is checked for syntax and
/// skipped. Returns the decoded bytes too, for members read later by a configured name.
fn decode_object<M: Members>(segment: &str, part: Part) -> Result<(M, Vec<u8>), SyntaxError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| SyntaxError::Base64(part))?;
    let members = read_object::<M>(&bytes, part)?;
    Ok((members, bytes))
}

fn read_object<M: Members>(json: &[u8], part: Part) -> Result<M, SyntaxError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let members = match de.deserialize_map(ObjectVisitor(PhantomData::<M>)) {
        Ok(m) => m,
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            return Err(SyntaxError::DuplicateName(part));
        }
        Err(_) => return Err(SyntaxError::NotJsonObject(part)),
    };
    de.end().map_err(|_| SyntaxError::NotJsonObject(part))?;
    Ok(members)
}

/// The JOSE header members the decision looks at.
#[derive(Default)]
struct HeaderMembers {
    alg: Option<Member>,
    kid: Option<Member>,
    crit: Option<Member>,
    b64: Option<Member>,
    cty: Option<Member>,
}

impl Members for HeaderMembers {
    fn slot(&mut self, name: &str) -> Option<&mut Option<Member>> {
        Some(match name {
            "alg" => &mut self.alg,
            "kid" => &mut self.kid,
            "crit" => &mut self.crit,
            "b64" => &mut self.b64,
            "cty" => &mut self.cty,
            _ => return None,
        })
    }
}

fn parse_header(m: HeaderMembers) -> Result<Header, SyntaxError> {
    // We implement no JWS extensions, so any `crit` names something we do not understand (RFC 7515 §4.1.11).
    if m.crit.is_some() {
        return Err(SyntaxError::CriticalExtension);
    }
    match m.b64 {
        None | Some(Member::Bool(true)) => {}
        Some(_) => return Err(SyntaxError::UnencodedPayload),
    }
    match m.cty {
        None => {}
        Some(Member::Str(cty))
            if cty.eq_ignore_ascii_case("jwt") || cty.eq_ignore_ascii_case("application/jwt") =>
        {
            return Err(SyntaxError::NestedJwt);
        }
        Some(Member::Str(_)) => {}
        // RFC 7515 §4.1.10: `cty` is a string. Anything else is not a header we can reason about.
        Some(_) => {
            return Err(SyntaxError::ClaimType {
                claim: "cty",
                expected: "a string",
            });
        }
    }
    let Some(Member::Str(alg)) = m.alg else {
        return Err(SyntaxError::MissingAlg);
    };
    let kid = opt_string(m.kid, "kid")?;
    Ok(Header { alg, kid })
}

/// The registered and Entra claims the decision types.
#[derive(Default)]
struct ClaimMembers {
    iss: Option<Member>,
    sub: Option<Member>,
    aud: Option<Member>,
    exp: Option<Member>,
    nbf: Option<Member>,
    tid: Option<Member>,
    oid: Option<Member>,
    appid: Option<Member>,
    azp: Option<Member>,
    ver: Option<Member>,
    idtyp: Option<Member>,
    scp: Option<Member>,
    roles: Option<Member>,
}

impl Members for ClaimMembers {
    fn slot(&mut self, name: &str) -> Option<&mut Option<Member>> {
        Some(match name {
            "iss" => &mut self.iss,
            "sub" => &mut self.sub,
            "aud" => &mut self.aud,
            "exp" => &mut self.exp,
            "nbf" => &mut self.nbf,
            "tid" => &mut self.tid,
            "oid" => &mut self.oid,
            "appid" => &mut self.appid,
            "azp" => &mut self.azp,
            "ver" => &mut self.ver,
            "idtyp" => &mut self.idtyp,
            "scp" => &mut self.scp,
            "roles" => &mut self.roles,
            _ => return None,
        })
    }
}

/// Types the claims, checking them in a fixed order so that a token with several bad claims always
/// gets the same message.
fn type_claims(m: ClaimMembers, raw: Vec<u8>) -> Result<Claims, SyntaxError> {
    let exp = match m.exp {
        None | Some(Member::Null) => return Err(SyntaxError::MissingExp),
        Some(v) => numeric_date(&v).ok_or(SyntaxError::ClaimType {
            claim: "exp",
            expected: "a number of seconds",
        })?,
    };
    let nbf = match m.nbf {
        None | Some(Member::Null) => None,
        Some(v) => Some(numeric_date(&v).ok_or(SyntaxError::ClaimType {
            claim: "nbf",
            expected: "a number of seconds",
        })?),
    };
    let aud = match m.aud {
        None | Some(Member::Null) => Vec::new(),
        Some(Member::Str(s)) => vec![s],
        Some(Member::Strings(v)) => v,
        Some(_) => {
            return Err(SyntaxError::ClaimType {
                claim: "aud",
                expected: "a string or an array of strings",
            });
        }
    };
    let roles = match m.roles {
        None | Some(Member::Null) => Vec::new(),
        Some(Member::Strings(v)) => v,
        Some(_) => {
            return Err(SyntaxError::ClaimType {
                claim: "roles",
                expected: "an array of strings",
            });
        }
    };
    Ok(Claims {
        iss: opt_string(m.iss, "iss")?,
        sub: opt_string(m.sub, "sub")?,
        aud,
        exp,
        nbf,
        tid: opt_string(m.tid, "tid")?,
        oid: opt_string(m.oid, "oid")?,
        appid: opt_string(m.appid, "appid")?,
        azp: opt_string(m.azp, "azp")?,
        ver: opt_string(m.ver, "ver")?,
        idtyp: opt_string(m.idtyp, "idtyp")?,
        scp: opt_string(m.scp, "scp")?,
        roles,
        raw,
    })
}

fn opt_string(member: Option<Member>, claim: &'static str) -> Result<Option<String>, SyntaxError> {
    match member {
        None | Some(Member::Null) => Ok(None),
        Some(Member::Str(s)) => Ok(Some(s)),
        Some(_) => Err(SyntaxError::ClaimType {
            claim,
            expected: "a string",
        }),
    }
}

/// A NumericDate (RFC 7519 §2): integer or fractional seconds; fractions are truncated. Values that do not
/// fit an `i64` of seconds (JSON has no NaN, but `1e300` parses) are not dates.
fn numeric_date(v: &Member) -> Option<i64> {
    let f = match *v {
        Member::Int(i) => return Some(i),
        Member::Float(f) => f,
        _ => return None,
    };
    // 2^53: beyond this, f64 seconds are not exact and no real token lives there.
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    (f.is_finite() && f.abs() < LIMIT).then(|| f.trunc() as i64)
}

const DUPLICATE: &str = "duplicate member name";

/// A member's value, reduced to the shapes claims and header parameters come in. Strings and arrays of
/// strings are kept; what no claim we read can be (objects, arrays with anything but strings) is only
/// checked for syntax and recorded as `Other`, which is always a type error.
#[derive(Clone, Debug, PartialEq)]
enum Member {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Strings(Vec<String>),
    Other,
}

impl<'de> de::Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MemberVisitor;
        impl<'de> Visitor<'de> for MemberVisitor {
            type Value = Member;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Member, E> {
                Ok(Member::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Member, E> {
                Ok(Member::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Member, E> {
                Ok(Member::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Member, E> {
                Ok(i64::try_from(v).map_or(Member::Float(v as f64), Member::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Member, E> {
                Ok(Member::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Member, E> {
                Ok(Member::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Member, E> {
                Ok(Member::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Member, A::Error> {
                let mut strings = Vec::new();
                let mut all_strings = true;
                while let Some(item) = seq.next_element::<Member>()? {
                    match item {
                        Member::Str(s) if all_strings => strings.push(s),
                        _ => all_strings = false,
                    }
                }
                Ok(if all_strings {
                    Member::Strings(strings)
                } else {
                    Member::Other
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Member, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Member::Other)
            }
        }
        deserializer.deserialize_any(MemberVisitor)
    }
}

/// A value read for its syntax only, and dropped. Unlike `serde::de::IgnoredAny`, which serde_json skips
/// without recursing (so at any depth), it nests through the deserializer and so stays under serde_json's
/// recursion limit: a member nested deeper than that makes the token malformed, whichever member it is.
struct Skip;

impl<'de> de::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SkipVisitor;
        impl<'de> Visitor<'de> for SkipVisitor {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        deserializer.deserialize_any(SkipVisitor)
    }
}

/// The members of an object that one reader looks at, by name.
trait Members: Default {
    /// Where the member `name` goes, or `None` to skip it.
    fn slot(&mut self, name: &str) -> Option<&mut Option<Member>>;
}

/// A member name, borrowed from the input unless it had to be unescaped.
struct Name<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Reads an object into `M`. Member names must be unique: RFC 7515 §5.2 lets a parser reject
/// duplicates, and rejecting them closes the door on parser-differential tricks
/// (`{"aud":"a","aud":"b"}`). Names are compared unescaped (`"a\u0075d"` is `"aud"`), all of them, not
/// only the ones `M` keeps; sorting them once makes that O(n log n) for a hostile token with thousands.
struct ObjectVisitor<M>(PhantomData<M>);

impl<'de, M: Members> Visitor<'de> for ObjectVisitor<M> {
    type Value = M;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<M, A::Error> {
        let mut members = M::default();
        let mut names: Vec<Cow<'de, str>> = Vec::with_capacity(32);
        while let Some(Name(name)) = access.next_key::<Name<'de>>()? {
            match members.slot(&name) {
                Some(slot) => {
                    if slot.is_some() {
                        return Err(de::Error::custom(DUPLICATE));
                    }
                    *slot = Some(access.next_value::<Member>()?);
                }
                None => {
                    access.next_value::<Skip>()?;
                }
            }
            names.push(name);
        }
        names.sort_unstable();
        if names.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(de::Error::custom(DUPLICATE));
        }
        Ok(members)
    }
}

/// The member `name` of an object already read once (so well-formed, names unique).
fn find_member(json: &[u8], name: &str) -> Option<Member> {
    struct Find<'n>(&'n str);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Member>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Option<Member>, A::Error> {
            // The object is read to its end even after the member is found: serde_json checks that
            // the visitor consumed it.
            let mut found = None;
            while let Some(Name(name)) = access.next_key::<Name<'de>>()? {
                if found.is_none() && name == self.0 {
                    found = Some(access.next_value::<Member>()?);
                } else {
                    access.next_value::<Skip>()?;
                }
            }
            Ok(found)
        }
    }
    serde_json::Deserializer::from_slice(json)
        .deserialize_map(Find(name))
        .ok()
        .flatten()
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
            // Names are compared unescaped, and members no claim reads are not exempt.
            (
                token(H, r#"{"exp":1,"aud":"a","a\u0075d":"b"}"#),
                SyntaxError::DuplicateName(Part::Claims),
            ),
            (
                token(H, r#"{"exp":1,"x":1,"y":2,"x":{"z":3}}"#),
                SyntaxError::DuplicateName(Part::Claims),
            ),
            (
                token(H, r#"{"exp":1,"roles":["r",null]}"#),
                SyntaxError::ClaimType {
                    claim: "roles",
                    expected: "an array of strings",
                },
            ),
            (
                token(H, r#"{"exp":1,"aud":["a",["b"]]}"#),
                SyntaxError::ClaimType {
                    claim: "aud",
                    expected: "a string or an array of strings",
                },
            ),
            (
                token(H, r#"{"exp":18446744073709551615}"#),
                SyntaxError::ClaimType {
                    claim: "exp",
                    expected: "a number of seconds",
                },
            ),
            (
                token(r#"{"alg":"RS256","b64":null}"#, r#"{"exp":1}"#),
                SyntaxError::UnencodedPayload,
            ),
            (
                token(r#"{"alg":null}"#, r#"{"exp":1}"#),
                SyntaxError::MissingAlg,
            ),
            // Several bad claims: always the first in the fixed order (`exp` before `iss`).
            (
                token(H, r#"{"iss":1,"exp":"x"}"#),
                SyntaxError::ClaimType {
                    claim: "exp",
                    expected: "a number of seconds",
                },
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
        // In a member the decision reads, and in the header, the same.
        let deep_aud = deep.replace("\"x\"", "\"aud\"");
        assert_eq!(
            parse(&token(H, &deep_aud)).unwrap_err(),
            SyntaxError::NotJsonObject(Part::Claims)
        );
        let deep_header = format!(
            "{{\"alg\":\"RS256\",\"x\":{}{}}}",
            "{\"a\":".repeat(200),
            "}".repeat(200)
        );
        assert_eq!(
            parse(&token(&deep_header, r#"{"exp":1}"#)).unwrap_err(),
            SyntaxError::NotJsonObject(Part::Header)
        );
    }

    #[test]
    fn custom_claims_are_typed_on_access() {
        let t = token(H, r#"{"exp":1,"client_id":"c","scope":"a b","n":1}"#);
        let parsed = parse(&t).unwrap();
        assert_eq!(
            parsed.claims.custom_str("client_id").unwrap().as_deref(),
            Some("c")
        );
        assert_eq!(parsed.claims.custom_str("missing").unwrap(), None);
        assert!(parsed.claims.custom_str("n").is_err());
        assert_eq!(parsed.claims.custom_roles("scope").unwrap(), ["a", "b"]);
        assert!(parsed.claims.custom_roles("n").is_err());
    }

    #[test]
    fn custom_claims_see_every_member_unescaped_and_typed_ones_too() {
        let t = token(
            H,
            r#"{"exp":1,"gr\u006fups":["g1","g2"],"roles":["r"],"obj":{"a":[1]},"cl":"\u0063"}"#,
        );
        let parsed = parse(&t).unwrap();
        assert_eq!(parsed.claims.custom_roles("groups").unwrap(), ["g1", "g2"]);
        assert_eq!(parsed.claims.custom_roles("roles").unwrap(), ["r"]);
        assert_eq!(
            parsed.claims.custom_str("cl").unwrap().as_deref(),
            Some("c")
        );
        assert_eq!(
            parsed.claims.custom_str("obj").unwrap_err(),
            SyntaxError::CustomClaimType("obj".into())
        );
        assert_eq!(parsed.claims.exp, 1);
    }
}

//! JSON Web Tokens as RequestAuthentication validates them: parse a compact JWS, find the key
//! in a JWKS, check the signature, then `iss`, `aud`, `exp` and `nbf`. Pure: keys and the
//! current time are inputs; fetching key sets is the proxy's job.
//!
//! Accepted algorithms are the asymmetric ones Envoy's `jwt_authn` supports: RS256/384/512,
//! PS256/384/512, ES256/384 and EdDSA (Ed25519). `alg: none` and HMAC (`HS*`) are always
//! refused: an HMAC token "signed" with a public key taken from the JWKS is the classic
//! algorithm-confusion attack.

use std::fmt;

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Envoy's default clock skew for `exp` and `nbf` ("clock_skew_seconds ... default 60").
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 60;

/// Longest token we parse (Envoy's default header limit is 60 KiB; tokens beyond this are not
/// tokens).
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Why a token was refused. Messages are for logs; the client only ever sees a generic 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("algorithm `{0}` is not accepted (use RS*, PS*, ES256/384 or EdDSA)")]
    UnsupportedAlgorithm(String),
    #[error("no key with kid `{0}` in the key set")]
    UnknownKid(String),
    #[error("no key in the key set fits algorithm {0}")]
    NoMatchingKey(String),
    #[error("signature verification failed")]
    BadSignature,
    #[error("issuer `{found}` is not the rule's issuer `{expected}`")]
    WrongIssuer { found: String, expected: String },
    #[error("token has no `iss` claim")]
    MissingIssuer,
    #[error("audiences {found:?} are not among the allowed {allowed:?}")]
    WrongAudience {
        found: Vec<String>,
        allowed: Vec<String>,
    },
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
}

/// Why a key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the key set is not JSON of the form {{\"keys\": [...]}}: {0}")]
    Json(String),
    #[error("key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("the key set has no usable signing key (RSA, EC P-256/P-384 or Ed25519)")]
    NoUsableKeys,
}

/// A signature algorithm we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    fn parse(s: &str) -> Result<Self, JwtError> {
        Ok(match s {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(JwtError::UnsupportedAlgorithm(other.to_string())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point `04 || x || y`.
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// One verification key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWKS pins one.
    pub alg: Option<String>,
    material: KeyMaterial,
}

impl Jwk {
    fn fits(&self, alg: Algorithm) -> bool {
        if let Some(a) = &self.alg
            && a != alg.name()
        {
            return false;
        }
        matches!(
            (&self.material, alg),
            (
                KeyMaterial::Rsa { .. },
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyMaterial::EcP256(_), Algorithm::ES256)
                | (KeyMaterial::EcP384(_), Algorithm::ES384)
                | (KeyMaterial::Ed25519(_), Algorithm::EdDSA)
        )
    }

    fn verify(&self, alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            KeyMaterial::Rsa { n, e } => {
                let params = match alg {
                    Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            KeyMaterial::EcP256(p) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::EcP384(p) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, p)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(msg, sig)
                .is_ok(),
        }
    }
}

/// A JSON Web Key Set (RFC 7517 §5) of verification keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(field: &str, v: &Option<String>) -> Result<Vec<u8>, String> {
    let s = v.as_deref().ok_or_else(|| format!("missing `{field}`"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let nz = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    v.drain(..nz);
    v
}

impl Jwks {
    /// Parses a key set. Keys that cannot verify signatures (`oct`, `use: enc`, other curves)
    /// are skipped; a malformed key of a supported type is an error; a set with no usable key
    /// is an error.
    pub fn parse(json: &str) -> Result<Jwks, JwksError> {
        let raw: RawJwks =
            serde_json::from_str(json).map_err(|e| JwksError::Json(e.to_string()))?;
        let mut keys = Vec::new();
        for (index, v) in raw.keys.into_iter().enumerate() {
            let k: RawJwk = serde_json::from_value(v).map_err(|e| JwksError::BadKey {
                index,
                reason: e.to_string(),
            })?;
            if k.use_.as_deref() == Some("enc") {
                continue;
            }
            let bad = |reason: String| JwksError::BadKey { index, reason };
            let material = match (k.kty.as_str(), k.crv.as_deref()) {
                ("RSA", _) => KeyMaterial::Rsa {
                    n: strip_leading_zeros(b64("n", &k.n).map_err(bad)?),
                    e: strip_leading_zeros(b64("e", &k.e).map_err(bad)?),
                },
                ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                    let x = b64("x", &k.x).map_err(bad)?;
                    let y = b64("y", &k.y).map_err(bad)?;
                    let len = if crv == "P-256" { 32 } else { 48 };
                    if x.len() != len || y.len() != len {
                        return Err(bad(format!("{crv} coordinates must be {len} bytes")));
                    }
                    let mut p = Vec::with_capacity(1 + 2 * len);
                    p.push(4);
                    p.extend_from_slice(&x);
                    p.extend_from_slice(&y);
                    if crv == "P-256" {
                        KeyMaterial::EcP256(p)
                    } else {
                        KeyMaterial::EcP384(p)
                    }
                }
                ("OKP", Some("Ed25519")) => {
                    let x = b64("x", &k.x).map_err(bad)?;
                    if x.len() != 32 {
                        return Err(bad("Ed25519 `x` must be 32 bytes".into()));
                    }
                    KeyMaterial::Ed25519(x)
                }
                // Symmetric keys and curves we do not verify with are not usable here.
                _ => continue,
            };
            keys.push(Jwk {
                kid: k.kid,
                alg: k.alg,
                material,
            });
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(Jwks { keys })
    }

    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A decoded, not yet verified, compact JWS.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// The payload (a JSON object).
    pub claims: serde_json::Value,
    /// The base64url payload as sent (for `outputPayloadToHeader`).
    pub payload_b64: &'a str,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Splits and decodes a compact JWS (`header.payload.signature`). Refuses `none`, HMAC and
/// anything that is not three base64url parts with JSON objects.
pub fn decode(raw: &str) -> Result<Token<'_>, JwtError> {
    if raw.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("longer than 64 KiB"));
    }
    let mut parts = raw.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: RawHeader = serde_json::from_slice(&header_bytes)
        .map_err(|_| JwtError::Malformed("header is not a JSON object with `alg`"))?;
    let alg = Algorithm::parse(&header.alg)?;
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed("payload is not JSON"))?;
    if !claims.is_object() {
        return Err(JwtError::Malformed("payload is not a JSON object"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    if signature.is_empty() {
        return Err(JwtError::Malformed("empty signature"));
    }
    Ok(Token {
        alg,
        kid: header.kid,
        claims,
        payload_b64: p,
        signing_input: &raw[..h.len() + 1 + p.len()],
        signature,
    })
}

/// What a rule requires of a token besides its signature.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRules<'a> {
    /// "Identifies the issuer that issued the JWT. Must match the iss claim in the JWT."
    pub issuer: &'a str,
    /// "The list of JWT audiences that are allowed to access. A JWT containing any of these
    /// audiences will be accepted." Empty: no audience check.
    pub audiences: &'a [String],
    /// Unix seconds.
    pub now: u64,
    pub clock_skew: u64,
}

fn numeric_claim(claims: &serde_json::Value, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| *f >= 0.0)
            .map(|f| Some(f as u64))
            .ok_or(JwtError::Malformed("exp/nbf/iat must be numbers")),
    }
}

impl Token<'_> {
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(serde_json::Value::as_str)
    }

    /// Checks the signature with the key set: the key named by `kid` if the token names one,
    /// else every key that fits the algorithm.
    pub fn verify_signature(&self, jwks: &Jwks) -> Result<(), JwtError> {
        let msg = self.signing_input.as_bytes();
        let mut tried = false;
        for k in jwks.keys() {
            if let Some(kid) = &self.kid
                && k.kid.as_deref() != Some(kid.as_str())
            {
                continue;
            }
            if !k.fits(self.alg) {
                continue;
            }
            tried = true;
            if k.verify(self.alg, msg, &self.signature) {
                return Ok(());
            }
        }
        match (&self.kid, tried) {
            (Some(kid), false) if !jwks.has_kid(kid) => Err(JwtError::UnknownKid(kid.clone())),
            (_, false) => Err(JwtError::NoMatchingKey(self.alg.to_string())),
            (_, true) => Err(JwtError::BadSignature),
        }
    }

    /// Checks `iss`, `aud`, `exp` and `nbf` (with the clock skew).
    pub fn check_claims(&self, rules: &ClaimRules<'_>) -> Result<(), JwtError> {
        match self.issuer() {
            None => return Err(JwtError::MissingIssuer),
            Some(iss) if iss != rules.issuer => {
                return Err(JwtError::WrongIssuer {
                    found: iss.to_string(),
                    expected: rules.issuer.to_string(),
                });
            }
            Some(_) => {}
        }
        if let Some(exp) = numeric_claim(&self.claims, "exp")?
            && rules.now > exp.saturating_add(rules.clock_skew)
        {
            return Err(JwtError::Expired {
                exp,
                now: rules.now,
            });
        }
        if let Some(nbf) = numeric_claim(&self.claims, "nbf")?
            && rules.now.saturating_add(rules.clock_skew) < nbf
        {
            return Err(JwtError::NotYetValid {
                nbf,
                now: rules.now,
            });
        }
        if !rules.audiences.is_empty() {
            let found: Vec<String> = match self.claims.get("aud") {
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if !found.iter().any(|a| rules.audiences.contains(a)) {
                return Err(JwtError::WrongAudience {
                    found,
                    allowed: rules.audiences.to_vec(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

    fn enc(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn token(header: &str, claims: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", enc(header.as_bytes()), enc(claims.as_bytes()));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", enc(&sig))
    }

    struct Keys {
        rsa: RsaKeyPair,
        ec: EcdsaKeyPair,
        ed: Ed25519KeyPair,
        jwks: Jwks,
        json: String,
    }

    fn keys() -> Keys {
        let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let ec = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let ed = Ed25519KeyPair::generate().unwrap();
        let comps: RsaPublicKeyComponents<Vec<u8>> = rsa.public_key().into();
        let ec_pub = ec.public_key().as_ref();
        let json = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "n": enc(&comps.n), "e": enc(&comps.e)},
            {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": enc(&ec_pub[1..33]), "y": enc(&ec_pub[33..])},
            {"kty": "OKP", "kid": "ed-1", "crv": "Ed25519", "x": enc(ed.public_key().as_ref())},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        ]})
        .to_string();
        let jwks = Jwks::parse(&json).unwrap();
        Keys {
            rsa,
            ec,
            ed,
            jwks,
            json,
        }
    }

    const CLAIMS: &str = r#"{"iss":"https://issuer.example","sub":"alice","aud":["api","web"],"exp":2000,"nbf":1000}"#;

    fn rules(now: u64) -> ClaimRules<'static> {
        static AUD: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| vec!["api".into()]);
        ClaimRules {
            issuer: "https://issuer.example",
            audiences: &AUD,
            now,
            clock_skew: DEFAULT_CLOCK_SKEW_SECS,
        }
    }

    #[test]
    fn every_algorithm_verifies_and_bad_signatures_fail() {
        let k = keys();
        assert_eq!(k.jwks.keys().len(), 3, "the oct key is skipped: {}", k.json);
        let rng = SystemRandom::new();
        let rsa_sign = |enc_: &'static dyn signature::RsaEncoding| {
            let rsa = &k.rsa;
            let rng = &rng;
            move |m: &[u8]| {
                let mut sig = vec![0; rsa.public_modulus_len()];
                rsa.sign(enc_, rng, m, &mut sig).unwrap();
                sig
            }
        };
        type Signer<'a> = Box<dyn Fn(&[u8]) -> Vec<u8> + 'a>;
        let cases: Vec<(&str, Signer)> = vec![
            ("RS256", Box::new(rsa_sign(&signature::RSA_PKCS1_SHA256))),
            ("RS384", Box::new(rsa_sign(&signature::RSA_PKCS1_SHA384))),
            ("RS512", Box::new(rsa_sign(&signature::RSA_PKCS1_SHA512))),
            ("PS256", Box::new(rsa_sign(&signature::RSA_PSS_SHA256))),
            ("PS384", Box::new(rsa_sign(&signature::RSA_PSS_SHA384))),
            ("PS512", Box::new(rsa_sign(&signature::RSA_PSS_SHA512))),
            (
                "ES256",
                Box::new(|m: &[u8]| k.ec.sign(&rng, m).unwrap().as_ref().to_vec()),
            ),
            ("EdDSA", Box::new(|m: &[u8]| k.ed.sign(m).as_ref().to_vec())),
        ];
        for (alg, sign) in &cases {
            let t = token(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#), CLAIMS, sign);
            let d = decode(&t).unwrap();
            d.verify_signature(&k.jwks)
                .unwrap_or_else(|e| panic!("{alg}: {e}"));
            d.check_claims(&rules(1500)).unwrap();
            // One flipped bit in the payload breaks it.
            let mut bad = t.clone().into_bytes();
            let i = t.find('.').unwrap() + 3;
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(bad).unwrap();
            let err = decode(&bad).and_then(|d| d.verify_signature(&k.jwks));
            assert!(err.is_err(), "{alg}: tampered token verified");
        }
    }

    #[test]
    fn kid_selects_the_key_and_unknown_kid_is_reported() {
        let k = keys();
        let t = token(r#"{"alg":"EdDSA","kid":"ed-1"}"#, CLAIMS, |m| {
            k.ed.sign(m).as_ref().to_vec()
        });
        decode(&t).unwrap().verify_signature(&k.jwks).unwrap();
        let t = token(r#"{"alg":"EdDSA","kid":"rotated-2"}"#, CLAIMS, |m| {
            k.ed.sign(m).as_ref().to_vec()
        });
        assert_eq!(
            decode(&t).unwrap().verify_signature(&k.jwks),
            Err(JwtError::UnknownKid("rotated-2".into()))
        );
        // The right kid but another key's signature.
        let other = Ed25519KeyPair::generate().unwrap();
        let t = token(r#"{"alg":"EdDSA","kid":"ed-1"}"#, CLAIMS, |m| {
            other.sign(m).as_ref().to_vec()
        });
        assert_eq!(
            decode(&t).unwrap().verify_signature(&k.jwks),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn none_and_hmac_are_refused() {
        let k = keys();
        let none = format!("{}.{}.", enc(br#"{"alg":"none"}"#), enc(CLAIMS.as_bytes()));
        assert!(matches!(decode(&none), Err(JwtError::UnsupportedAlgorithm(a)) if a == "none"));
        // HS256 "signed" with the RSA public key's bytes: algorithm confusion.
        let comps: RsaPublicKeyComponents<Vec<u8>> = k.rsa.public_key().into();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &comps.n);
        let t = token(r#"{"alg":"HS256"}"#, CLAIMS, |m| {
            aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec()
        });
        assert!(matches!(decode(&t), Err(JwtError::UnsupportedAlgorithm(a)) if a == "HS256"));
    }

    #[test]
    fn claims_are_checked_with_clock_skew() {
        let k = keys();
        let t = token(r#"{"alg":"EdDSA"}"#, CLAIMS, |m| {
            k.ed.sign(m).as_ref().to_vec()
        });
        let d = decode(&t).unwrap();
        assert!(
            d.check_claims(&rules(2060)).is_ok(),
            "within the skew after exp"
        );
        assert!(matches!(
            d.check_claims(&rules(2061)),
            Err(JwtError::Expired { .. })
        ));
        assert!(
            d.check_claims(&rules(940)).is_ok(),
            "within the skew before nbf"
        );
        assert!(matches!(
            d.check_claims(&rules(939)),
            Err(JwtError::NotYetValid { .. })
        ));
        let mut r = rules(1500);
        r.issuer = "https://other.example";
        assert!(matches!(
            d.check_claims(&r),
            Err(JwtError::WrongIssuer { .. })
        ));
        let aud = vec!["billing".to_string()];
        let mut r = rules(1500);
        r.audiences = &aud;
        assert!(matches!(
            d.check_claims(&r),
            Err(JwtError::WrongAudience { .. })
        ));
        r.audiences = &[];
        assert!(
            d.check_claims(&r).is_ok(),
            "no audiences configured: no check"
        );
    }

    #[test]
    fn malformed_tokens_and_key_sets() {
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.e30.c2ln",
            "e30.e30.c2ln",
            "eyJhbGciOiJFUzI1NiJ9.W10.c2ln",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(Jwks::parse("[]"), Err(JwksError::Json(_))));
        assert_eq!(Jwks::parse(r#"{"keys":[]}"#), Err(JwksError::NoUsableKeys));
        assert!(matches!(
            Jwks::parse(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"}]}"#),
            Err(JwksError::BadKey { index: 0, .. })
        ));
    }

    #[test]
    fn istio_sample_tokens_verify_with_istio_sample_keys() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/istio-jwt");
        let Ok(jwks) = std::fs::read_to_string(dir.join("istio-demo-jwks.json")) else {
            panic!("fixtures missing at {}", dir.display());
        };
        let jwks = Jwks::parse(&jwks).unwrap();
        let demo = std::fs::read_to_string(dir.join("demo.jwt")).unwrap();
        let d = decode(demo.trim()).unwrap();
        d.verify_signature(&jwks).unwrap();
        assert_eq!(d.issuer(), Some("testing@secure.istio.io"));
        let common =
            Jwks::parse(&std::fs::read_to_string(dir.join("istio-common-jwks.json")).unwrap())
                .unwrap();
        for f in [
            "token-issuer1.jwt",
            "token-issuer2.jwt",
            "token-expired.jwt",
        ] {
            let t = std::fs::read_to_string(dir.join(f)).unwrap();
            decode(t.trim())
                .unwrap()
                .verify_signature(&common)
                .unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        let expired = std::fs::read_to_string(dir.join("token-expired.jwt")).unwrap();
        let d = decode(expired.trim()).unwrap();
        let r = ClaimRules {
            issuer: d.issuer().unwrap(),
            audiences: &[],
            now: 4_000_000_000,
            clock_skew: 60,
        };
        assert!(matches!(d.check_claims(&r), Err(JwtError::Expired { .. })));
    }
}

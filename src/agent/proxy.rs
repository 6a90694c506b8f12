//! What the agent does with each request from the hub: refuse what policy forbids, then
//! forward it to its own apiserver with its own credentials and stream the response back. A
//! request the hub makes for a person (kubectl through the hub) names them in the ShapeBlock
//! act-as headers; the agent then impersonates `shapeblock:user:<id>` and their teams'
//! `shapeblock:team:<name>` groups itself, and nothing else ([`acting_for`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;

use super::apiserver::Upstream;
use crate::tunnel::{
    ACT_AS_TEAM_HEADER, ACT_AS_USER_HEADER, AGENT_LOCAL_PREFIX, AGENT_PING_PATH,
    IMPERSONATED_GROUP_PREFIX, IMPERSONATED_USER_PREFIX, valid_team_name, valid_user_id,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of a response sent back through the tunnel.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which requests the agent forwards.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Refused subresources (`exec`, `attach`, `portforward`, `proxy` unless allowed).
    pub refused_subresources: Vec<String>,
    pub max_request_body_bytes: usize,
}

/// Why a request was not forwarded.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Policy forbids it (403).
    Forbidden(String),
    /// The path is not a clean API path (400).
    BadPath(String),
}

impl Policy {
    /// Decides whether a request path may be forwarded. The path is percent-decoded first, as
    /// the apiserver routes on the decoded path.
    pub fn check(&self, path: &str) -> Result<(), Refusal> {
        let decoded = percent_decode(path)
            .ok_or_else(|| Refusal::BadPath(format!("{path:?} is not valid percent-encoding")))?;
        if !decoded.starts_with('/') {
            return Err(Refusal::BadPath(format!(
                "{path:?} is not an absolute path"
            )));
        }
        let segments: Vec<&str> = decoded[1..].split('/').collect();
        let trailing_slash_only = |i: usize| i + 1 == segments.len() && segments[i].is_empty();
        for (i, segment) in segments.iter().enumerate() {
            if *segment == "."
                || *segment == ".."
                || (segment.is_empty() && !trailing_slash_only(i))
            {
                return Err(Refusal::BadPath(format!(
                    "{path:?} has empty or dot segments"
                )));
            }
        }
        // Resource paths: /api/v1/... or /apis/<group>/<version>/..., then optionally
        // namespaces/<ns>, then <resource>/<name>/<subresource>. Only the subresource position
        // is checked: that is where the apiserver routes exec, attach, portforward and proxy,
        // for namespaced and cluster-scoped objects alike (`nodes/<n>/proxy/…`,
        // `namespaces/<ns>/services/<s>/proxy/…`). An object merely named like a refused
        // subresource is not refused, and segments after the subresource (a proxied path) are
        // the target's business, not checked here.
        let rest = match segments.as_slice() {
            ["api", _version, rest @ ..] => rest,
            ["apis", _group, _version, rest @ ..] => rest,
            _ => return Ok(()),
        };
        let rest = match rest {
            ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
            other => other,
        };
        if let [_resource, _name, subresource, ..] = rest
            && self.refused_subresources.iter().any(|r| r == subresource)
        {
            return Err(Refusal::Forbidden(format!(
                "the ShapeBlock agent refuses the {subresource} subresource (allow it in the agent's allowed_subresources)"
            )));
        }
        Ok(())
    }
}

fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A Kubernetes `Status` object, so the hub's client reports the refusal as an API error
/// with this message.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The person a request is made for: a ShapeBlock user id and the names of their Teams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActingFor {
    pub user: String,
    pub teams: Vec<String>,
}

/// Most Teams one request may name.
pub const MAX_TEAMS: usize = 100;

/// Who a request from the hub asks the agent to act for (pure). The hub may ask only through
/// the ShapeBlock act-as headers; a request that carries `Impersonate-*` headers of its own, a
/// malformed user id or team name, teams without a user, or more than one user is refused: the
/// agent impersonates nothing but `shapeblock:user:<id>` and `shapeblock:team:<name>`, never
/// a `system:` user or group, a uid or extra fields, whatever the hub sends.
pub fn acting_for(headers: &HeaderMap) -> Result<Option<ActingFor>, String> {
    let refuse = |why: String| {
        format!(
            "the ShapeBlock agent acts only for ShapeBlock users and teams, as the hub asks for them: {why}"
        )
    };
    if let Some(name) = headers
        .keys()
        .find(|k| k.as_str().starts_with("impersonate-"))
    {
        return Err(refuse(format!(
            "it does not forward impersonation headers ({name})"
        )));
    }
    let text = |v: &http::HeaderValue| {
        v.to_str()
            .map(str::to_owned)
            .map_err(|_| refuse("an act-as header is not ASCII".into()))
    };
    let users: Vec<String> = headers
        .get_all(ACT_AS_USER_HEADER)
        .iter()
        .map(text)
        .collect::<Result<_, _>>()?;
    let teams: Vec<String> = headers
        .get_all(ACT_AS_TEAM_HEADER)
        .iter()
        .map(text)
        .collect::<Result<_, _>>()?;
    let user = match users.as_slice() {
        [] if teams.is_empty() => return Ok(None),
        [] => {
            return Err(refuse(
                "teams were named without the user they are for".into(),
            ));
        }
        [user] => user.clone(),
        _ => return Err(refuse("a request is made for one user only".into())),
    };
    if !valid_user_id(&user) {
        return Err(refuse(format!("{user:?} is not a ShapeBlock user id")));
    }
    if teams.len() > MAX_TEAMS {
        return Err(refuse(format!("more than {MAX_TEAMS} teams")));
    }
    if let Some(bad) = teams.iter().find(|t| !valid_team_name(t)) {
        return Err(refuse(format!("{bad:?} is not a Team name")));
    }
    Ok(Some(ActingFor { user, teams }))
}

/// Sets the impersonation of `who` on a request to the apiserver.
fn impersonate(headers: &mut HeaderMap, who: &ActingFor) -> Result<(), String> {
    let value = |s: String| http::HeaderValue::try_from(s).map_err(|e| e.to_string());
    headers.insert(
        "impersonate-user",
        value(format!("{IMPERSONATED_USER_PREFIX}{}", who.user))?,
    );
    for team in &who.teams {
        headers.append(
            "impersonate-group",
            value(format!("{IMPERSONATED_GROUP_PREFIX}{team}"))?,
        );
    }
    Ok(())
}

/// Request headers never forwarded: hop-by-hop headers, and anything that would let the hub
/// choose the identity the agent acts as (the agent uses its own credentials, and sets the
/// impersonation of a person itself, from what [`acting_for`] accepted).
fn strip_request_headers(headers: &mut HeaderMap) {
    for name in [
        header::AUTHORIZATION,
        header::HOST,
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove(ACT_AS_USER_HEADER);
    headers.remove(ACT_AS_TEAM_HEADER);
    let impersonation: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for name in impersonation {
        headers.remove(name);
    }
}

/// Response headers that HTTP/2 forbids.
fn strip_response_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The agent's request handler.
#[derive(Clone)]
pub struct Proxy {
    upstream: Arc<dyn Upstream>,
    policy: Policy,
}

impl Proxy {
    pub fn new(upstream: Arc<dyn Upstream>, policy: Policy) -> Self {
        Self { upstream, policy }
    }

    /// Serves one request from the hub. Never fails: every problem becomes a Status response.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let path = request.uri().path().to_owned();
        if path.starts_with(AGENT_LOCAL_PREFIX) {
            return Ok(if path == AGENT_PING_PATH {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            } else {
                status_response(StatusCode::NOT_FOUND, "NotFound", "no such agent endpoint")
            });
        }
        match self.policy.check(&path) {
            Ok(()) => {}
            Err(Refusal::Forbidden(message)) => {
                tracing::info!(%path, method = %request.method(), "refused by policy");
                return Ok(status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &message,
                ));
            }
            Err(Refusal::BadPath(message)) => {
                return Ok(status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &message,
                ));
            }
        }
        if request.headers().contains_key(header::UPGRADE) {
            return Ok(status_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "the ShapeBlock agent does not forward connection upgrades",
            ));
        }
        let acting_for = match acting_for(request.headers()) {
            Ok(who) => who,
            Err(message) => {
                tracing::warn!(%path, method = %request.method(), %message, "refused impersonation");
                return Ok(status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &message,
                ));
            }
        };
        let (mut parts, body) = request.into_parts();
        let limit = self.policy.max_request_body_bytes;
        let body = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                return Ok(status_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    &format!("request body larger than the agent's limit of {limit} bytes"),
                ));
            }
            Err(err) => {
                return Ok(status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("reading request body: {err}"),
                ));
            }
        };
        strip_request_headers(&mut parts.headers);
        if let Some(who) = &acting_for
            && let Err(message) = impersonate(&mut parts.headers, who)
        {
            return Ok(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &message,
            ));
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match path_and_query.parse() {
            Ok(uri) => uri,
            Err(_) => {
                return Ok(status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid request URI",
                ));
            }
        };
        parts.version = http::Version::HTTP_11;
        match self
            .upstream
            .send(Request::from_parts(parts, Full::new(body)))
            .await
        {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_response_headers(&mut parts.headers);
                parts.version = http::Version::HTTP_2;
                Ok(Response::from_parts(parts, body))
            }
            Err(err) => {
                tracing::warn!(error = %err, %path, "apiserver request failed");
                Ok(status_response(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!("the ShapeBlock agent could not reach its apiserver: {err}"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            refused_subresources: crate::agent::config::REFUSED_SUBRESOURCES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_request_body_bytes: 1024,
        }
    }

    #[test]
    fn api_paths_pass() {
        for path in [
            "/api/v1/namespaces",
            "/api/v1/namespaces/default/configmaps",
            "/api/v1/namespaces/default/pods/web-0/log",
            "/api/v1/namespaces/default/pods/web-0/status",
            "/apis/apps.shapeblock.io/v1alpha1/namespaces/p/appbuilds/b1/status",
            "/apis/batch/v1/namespaces/p/jobs",
            "/version",
            "/readyz",
            "/api/v1/namespaces/exec",
            "/api/v1/namespaces/proxy/configmaps/exec",
        ] {
            assert_eq!(policy().check(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn interactive_subresources_are_refused() {
        for path in [
            "/api/v1/namespaces/default/pods/web-0/exec",
            "/api/v1/namespaces/default/pods/web-0/attach",
            "/api/v1/namespaces/default/pods/web-0/portforward",
            "/api/v1/namespaces/default/pods/web-0/proxy/metrics",
            "/api/v1/namespaces/default/services/web:80/proxy/",
            "/api/v1/nodes/node-1/proxy/configz",
            "/api/v1/namespaces/default/pods/web-0/ex%65c",
            "/apis/kubevirt.io/v1/namespaces/x/virtualmachineinstances/vm/portforward",
        ] {
            assert!(
                matches!(policy().check(path), Err(Refusal::Forbidden(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn allowed_subresources_pass() {
        let mut p = policy();
        p.refused_subresources.retain(|s| s != "exec");
        assert_eq!(
            p.check("/api/v1/namespaces/default/pods/web-0/exec"),
            Ok(())
        );
    }

    #[test]
    fn unclean_paths_are_rejected() {
        for path in [
            "/api/v1/namespaces/default/pods/web-0/../web-0/exec",
            "/api/v1//namespaces",
            "/api/v1/namespaces/%zz",
            "/api/v1/./namespaces",
        ] {
            assert!(
                matches!(policy().check(path), Err(Refusal::BadPath(_))),
                "{path}"
            );
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        headers
    }

    #[test]
    fn the_agent_acts_for_shapeblock_users_and_teams_only() {
        assert_eq!(
            acting_for(&headers(&[("accept", "application/json")])),
            Ok(None)
        );
        let who = acting_for(&headers(&[
            (ACT_AS_USER_HEADER, "alice@example.com"),
            (ACT_AS_TEAM_HEADER, "web"),
            (ACT_AS_TEAM_HEADER, "ops"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(who.user, "alice@example.com");
        let mut out = HeaderMap::new();
        impersonate(&mut out, &who).unwrap();
        assert_eq!(out["impersonate-user"], "shapeblock:user:alice@example.com");
        let groups: Vec<_> = out.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["shapeblock:team:web", "shapeblock:team:ops"]);
        // What a compromised hub might try: its own impersonation, system names, uids,
        // extras, prefixes smuggled into the id, several users, teams without a user.
        for refused in [
            vec![("impersonate-user", "system:admin")],
            vec![("impersonate-group", "system:masters")],
            vec![
                (ACT_AS_USER_HEADER, "alice"),
                ("impersonate-group", "system:masters"),
            ],
            vec![(ACT_AS_USER_HEADER, "alice"), ("impersonate-uid", "0")],
            vec![
                (ACT_AS_USER_HEADER, "alice"),
                ("impersonate-extra-scopes", "x"),
            ],
            vec![(ACT_AS_USER_HEADER, "system:admin")],
            vec![(ACT_AS_USER_HEADER, "x:system:masters")],
            vec![(ACT_AS_USER_HEADER, "")],
            vec![(ACT_AS_USER_HEADER, "alice ")],
            vec![(ACT_AS_USER_HEADER, "alice"), (ACT_AS_USER_HEADER, "bob")],
            vec![(ACT_AS_TEAM_HEADER, "web")],
            vec![
                (ACT_AS_USER_HEADER, "alice"),
                (ACT_AS_TEAM_HEADER, "system:masters"),
            ],
            vec![(ACT_AS_USER_HEADER, "alice"), (ACT_AS_TEAM_HEADER, "Web")],
        ] {
            assert!(acting_for(&headers(&refused)).is_err(), "{refused:?}");
        }
        assert!(!valid_user_id(&"a".repeat(129)));
        assert!(valid_user_id(&"a".repeat(128)));
    }

    #[test]
    fn identity_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer hub-token".parse().unwrap());
        headers.insert("impersonate-user", "system:admin".parse().unwrap());
        headers.insert("impersonate-group", "system:masters".parse().unwrap());
        headers.insert(ACT_AS_USER_HEADER, "alice".parse().unwrap());
        headers.insert(header::ACCEPT, "application/json".parse().unwrap());
        strip_request_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }
}

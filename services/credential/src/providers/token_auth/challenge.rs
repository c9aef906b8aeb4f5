//! `WWW-Authenticate: Bearer realm="..",service="..",scope=".."` (RFC 6750 / 7235 auth-params).

use imagemesh_proto::v1::Scope;
use reqwest::Url;

/// Where and for which service tokens are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: Url,
    pub service: Option<String>,
}

impl Challenge {
    /// Parses a Bearer challenge; `None` for other schemes or without a usable realm.
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = auth_params(params)?;
        let find = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        let realm = Url::parse(&find("realm")?).ok()?;
        if !matches!(realm.scheme(), "http" | "https") {
            return None;
        }
        Some(Challenge {
            realm,
            service: find("service"),
        })
    }

    /// The realm with `service` and `scope` query parameters (an empty repository asks for no
    /// repository scope).
    pub fn token_url(&self, scope: &Scope) -> Url {
        let mut url = self.realm.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = &self.service {
                query.append_pair("service", service);
            }
            if !scope.repository.is_empty() {
                let scope = format!(
                    "repository:{}:{}",
                    scope.repository,
                    scope.actions.join(",")
                );
                query.append_pair("scope", &scope);
            }
        }
        url
    }

    /// The realm as errors show it: scheme, host and path; no query, no userinfo.
    pub fn realm_for_messages(&self) -> String {
        let realm = &self.realm;
        format!(
            "{}://{}{}",
            realm.scheme(),
            realm.host_str().unwrap_or(""),
            realm.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + realm.path()
    }
}

/// `k1="v1", k2=v2` -> [(k1, v1), (k2, v2)]; quoted strings may hold commas and `\"`.
fn auth_params(input: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let mut rest = input.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            quoted_string(quoted)?
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key, value));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(params)
}

/// Reads up to the closing quote (after the opening one); returns the value and what follows.
fn quoted_string(input: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = input.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?.1),
            '"' => return Some((value, &input[i + 1..])),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_and_docker_hub_challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#;
        let challenge = Challenge::parse(hub).unwrap();
        assert_eq!(challenge.realm.as_str(), "https://auth.docker.io/token");
        assert_eq!(challenge.service.as_deref(), Some("registry.docker.io"));

        let spaced = r#"bearer  realm = "http://127.0.0.1:5001/token" , service=local,error="invalid_token""#;
        let challenge = Challenge::parse(spaced).unwrap();
        assert_eq!(challenge.realm.as_str(), "http://127.0.0.1:5001/token");
        assert_eq!(challenge.service.as_deref(), Some("local"));

        let escaped = r#"Bearer realm="https://a.example/t",service="s \"quoted\", yes""#;
        assert_eq!(
            Challenge::parse(escaped).unwrap().service.as_deref(),
            Some(r#"s "quoted", yes"#)
        );
    }

    #[test]
    fn refuses_what_is_not_a_bearer_challenge_with_a_web_realm() {
        for header in [
            r#"Basic realm="imagemesh""#,
            r#"Bearer service="x""#,
            r#"Bearer realm="file:///etc/passwd""#,
            r#"Bearer realm="https://a.example/t"#,
            "",
        ] {
            assert_eq!(Challenge::parse(header), None, "{header}");
        }
    }

    #[test]
    fn token_url_carries_service_and_scope() {
        let challenge = Challenge {
            realm: Url::parse("https://auth.example/token?x=1").unwrap(),
            service: Some("reg".into()),
        };
        let scope = Scope {
            repository: "team/app".into(),
            actions: vec!["pull".into(), "push".into()],
        };
        assert_eq!(
            challenge.token_url(&scope).as_str(),
            "https://auth.example/token?x=1&service=reg&scope=repository%3Ateam%2Fapp%3Apull%2Cpush"
        );
        assert_eq!(challenge.realm_for_messages(), "https://auth.example/token");
    }
}

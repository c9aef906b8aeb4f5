//! Configuration: defaults, then a TOML file, then environment overrides.
//!
//! Environment variables `IMAGEMESH_<SECTION>__<KEY>` override `<section>.<key>` (double
//! underscore = one level of nesting; a variable without one, such as `IMAGEMESH_CONFIG`, is not
//! an override), and the conventional `NATS_URL` overrides `nats.url`.
//! Tests pass their own variables to [`load_from`] instead of mutating the process environment.

use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "IMAGEMESH_";

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// Loads `T` from its defaults, the optional TOML `file` and the process environment.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    load_from(file, std::env::vars())
}

/// Loads `T` from its defaults, the optional TOML `file` and the given environment.
pub fn load_from<T, I>(file: Option<&Path>, env: I) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    I: IntoIterator<Item = (String, String)>,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            let missing =
                figment::Error::from(format!("config file {} does not exist", file.display()));
            return Err(ConfigError(Box::new(missing)));
        }
        figment = figment.merge(Toml::file(file));
    }
    for provider in env_overrides(env) {
        figment = figment.merge(provider);
    }
    figment.extract().map_err(|e| ConfigError(Box::new(e)))
}

/// Loads the sample configuration `deploy/config/<service>.toml` of this repository, without
/// environment overrides: each service's tests keep its sample loadable as its settings change.
pub fn load_deploy_sample<T>(service: &str) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/config")
        .join(format!("{service}.toml"));
    load_from(Some(&sample), [])
}

/// One environment variable overriding one key; named so errors say which variable is wrong.
struct EnvOverride {
    variable: String,
    key: String,
    value: Value,
}

impl Provider for EnvOverride {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.variable))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let nested = figment::util::nest(&self.key, self.value.clone());
        let dict = nested.into_dict().unwrap_or_default();
        Ok(Profile::Default.collect(dict))
    }
}

/// Maps environment variables to dotted config keys with parsed values.
fn env_overrides<I: IntoIterator<Item = (String, String)>>(env: I) -> Vec<EnvOverride> {
    let mut overrides = Vec::new();
    for (variable, raw) in env {
        let key = if variable == "NATS_URL" {
            "nats.url".to_string()
        } else if let Some(rest) = variable
            .strip_prefix(ENV_PREFIX)
            .filter(|r| r.contains("__"))
        {
            rest.to_ascii_lowercase().replace("__", ".")
        } else {
            continue;
        };
        // Values parse like TOML scalars: "true", "3", "1.5"; anything else stays a string.
        let value: Value = raw.parse().expect("figment value parsing is infallible");
        overrides.push(EnvOverride {
            variable,
            key,
            value,
        });
    }
    overrides
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Nats {
        url: String,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Section {
        limit: u32,
        name: String,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Sample {
        nats: Nats,
        section: Section,
    }

    #[test]
    fn file_then_environment() {
        let dir = std::env::temp_dir().join(format!("imagemesh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[section]\nlimit = 3\nname = \"file\"\n").unwrap();
        let env = [
            ("IMAGEMESH_SECTION__LIMIT".to_string(), "7".to_string()),
            ("NATS_URL".to_string(), "nats://127.0.0.1:4999".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
            (
                "IMAGEMESH_CONFIG".to_string(),
                "not an override".to_string(),
            ),
        ];
        let cfg: Sample = load_from(Some(&file), env).unwrap();
        assert_eq!(cfg.section.limit, 7);
        assert_eq!(cfg.section.name, "file");
        assert_eq!(cfg.nats.url, "nats://127.0.0.1:4999");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_problem() {
        let env = [("IMAGEMESH_SECTION__LIMIT".to_string(), "many".to_string())];
        let err = load_from::<Sample, _>(None, env).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
        assert!(
            err.contains("environment variable IMAGEMESH_SECTION__LIMIT"),
            "{err}"
        );
        let err = load_from::<Sample, _>(Some(Path::new("/nonexistent/x.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}

//! Reading `config.json` from the mounted config disk. The format, its validation and its
//! error texts are the host/guest contract in `guest_protocol::config`.

use std::path::{Path, PathBuf};

use guest_protocol::config::{self, Config, ConfigError};

pub use guest_protocol::config::FILE_NAME;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}; the host must write config.json on the config disk")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The config and one warning per unknown key.
pub fn load(path: &Path) -> Result<(Config, Vec<String>), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(config::parse(&text, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_path_and_the_host_s_duty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let err = load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}", path.display()))
        );
        assert!(
            err.to_string()
                .ends_with("the host must write config.json on the config disk")
        );
    }

    #[test]
    fn invalid_values_keep_the_contract_s_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, r#"{"guest_cidr": 33, "colour": 1}"#).unwrap();
        assert_eq!(
            load(&path).unwrap_err().to_string(),
            "config key `guest_cidr` has invalid value 33: expected a prefix length, an integer from 0 to 32"
        );
        std::fs::write(&path, r#"{"cmd": ["true"], "colour": 1}"#).unwrap();
        let (config, warnings) = load(&path).unwrap();
        assert_eq!(config.argv(), ["true"]);
        assert_eq!(warnings, ["unknown config key `colour` ignored"]);
    }
}

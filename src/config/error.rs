//! What can be wrong with `arbiter serve`'s settings: the config file
//! cannot be read or parsed, or a value is out of range. The CLI prints it
//! and exits with the usage code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file `{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("`{key}` must be greater than zero")]
    Zero { key: &'static str },
}

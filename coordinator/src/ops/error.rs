//! The error that stops the ops layer from starting, or a key-file reload from applying.

/// Errors that stop the ops layer from starting (or a reload from applying).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("--served-model-name {0}")]
    Alias(String),
    #[error("--fallback-url {0}")]
    Fallback(String),
    #[error("--fallback-ca-file {0}")]
    FallbackCa(String),
}

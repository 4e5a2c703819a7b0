//! The worker protocol (ARCHITECTURE §6): `worker.proto` and the tonic/prost types
//! generated from it at build time without a system `protoc`.
//!
//! Owns: `service Worker { Init, Steps (bidirectional stream), Health }`, with
//! `StepPlan`s that carry only what one forward step needs (token and block ids
//! packed). The semantics of every field are documented in `worker.proto`.
//! Invariant: the coordinator owns block tables; plans carry diffs that workers
//! mirror. Cost: a decode step of `n` sequences is ~`n · 20` bytes on the wire.

/// Package `stral.worker.v1`: messages, `worker_client::WorkerClient` and
/// `worker_server::{Worker, WorkerServer}`.
pub mod v1 {
    tonic::include_proto!("stral.worker.v1");
}

/// The shared secret between a coordinator and its workers (ARCHITECTURE §6): every
/// worker RPC carries it in the [`auth::TOKEN_HEADER`] metadata entry; a worker started
/// with a token refuses calls without it.
pub mod auth {
    /// gRPC metadata key holding the worker token.
    pub const TOKEN_HEADER: &str = "x-stral-worker-token";

    /// Reads a token file: its contents without surrounding whitespace, which must be
    /// non-empty, printable ASCII (a gRPC metadata value) and at least 16 bytes.
    pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read worker token file {}: {e}", path.display()))?;
        let token = raw.trim();
        if token.len() < 16 {
            return Err(format!(
                "worker token file {} holds {} bytes; a token needs at least 16 (e.g. `openssl rand -hex 32 > {}`)",
                path.display(),
                token.len(),
                path.display()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "worker token file {} must hold printable ASCII without spaces",
                path.display()
            ));
        }
        Ok(token.to_string())
    }

    /// Compares `given` with `expected` in time that depends only on their lengths.
    pub fn token_matches(given: &[u8], expected: &[u8]) -> bool {
        if given.len() != expected.len() {
            return false;
        }
        given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_match_only_when_equal() {
            assert!(token_matches(b"0123456789abcdef", b"0123456789abcdef"));
            assert!(!token_matches(b"0123456789abcdeX", b"0123456789abcdef"));
            assert!(!token_matches(b"0123456789abcde", b"0123456789abcdef"));
            assert!(!token_matches(b"", b"0123456789abcdef"));
        }

        #[test]
        fn token_files_are_trimmed_and_checked() {
            let dir = std::env::temp_dir().join(format!("stral-token-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join("t");
            std::fs::write(&f, "  0123456789abcdef0123\n").unwrap();
            assert_eq!(read_token_file(&f).unwrap(), "0123456789abcdef0123");
            std::fs::write(&f, "short\n").unwrap();
            assert!(read_token_file(&f).unwrap_err().contains("at least 16"));
            std::fs::write(&f, "0123456789 abcdef0123").unwrap();
            assert!(read_token_file(&f).unwrap_err().contains("printable"));
            assert!(read_token_file(&dir.join("missing"))
                .unwrap_err()
                .contains("cannot read"));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

//! Who may call a worker: a worker listening beyond loopback requires the shared token
//! (ARCHITECTURE §6) on every RPC — `Init`, each `Steps` stream and `Health` — and
//! refuses to start without one.
//!
//! Owns the listen-address rule and the gRPC interceptor. The token travels in the
//! [`proto::auth::TOKEN_HEADER`] metadata entry and is compared in constant time. A worker
//! on loopback without a token accepts any local caller, as before (`stral serve` still
//! gives its local workers a fresh token).

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::Arc;

use tonic::{Request, Status};

use crate::WorkerError;

/// Whether every address `listen` (`host:port`) resolves to is a loopback address.
pub fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => listen
            .to_socket_addrs()
            .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
            .unwrap_or(false),
    }
}

/// Reads `--worker-token-file` (see [`proto::auth::read_token_file`]).
pub fn read_token_file(path: &std::path::Path) -> Result<String, WorkerError> {
    proto::auth::read_token_file(path).map_err(WorkerError::Config)
}

/// Refuses to serve beyond loopback without a token.
pub fn check_listen(listen: &str, token: Option<&str>) -> Result<(), WorkerError> {
    if token.is_none() && !is_loopback(listen) {
        return Err(WorkerError::Config(format!(
            "--listen {listen} is reachable from other machines, so the worker needs a shared \
             token: pass --worker-token-file FILE (the same file as the coordinator's \
             `stral serve --worker-token-file`; e.g. `openssl rand -hex 32 > FILE`), or listen \
             on 127.0.0.1"
        )));
    }
    Ok(())
}

/// The interceptor for the worker's gRPC server: with a token, a call without the
/// matching [`proto::auth::TOKEN_HEADER`] is refused with `UNAUTHENTICATED`.
pub fn interceptor(
    token: Option<Arc<str>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(expected) = &token else {
            return Ok(req);
        };
        match req.metadata().get(proto::auth::TOKEN_HEADER) {
            Some(given) if proto::auth::token_matches(given.as_bytes(), expected.as_bytes()) => {
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated("wrong worker token")),
            None => Err(Status::unauthenticated(format!(
                "this worker requires a token in the {} metadata entry (stral serve --worker-token-file)",
                proto::auth::TOKEN_HEADER
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_recognised() {
        for a in [
            "127.0.0.1:50051",
            "127.0.0.2:1",
            "[::1]:50051",
            "localhost:9",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:50051",
            "[::]:50051",
            "10.1.2.3:50051",
            "192.168.0.1:1",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn beyond_loopback_needs_a_token() {
        assert!(check_listen("127.0.0.1:0", None).is_ok());
        assert!(check_listen("0.0.0.0:50051", Some("0123456789abcdef")).is_ok());
        let err = check_listen("0.0.0.0:50051", None).unwrap_err().to_string();
        assert!(err.contains("--worker-token-file"), "{err}");
    }

    #[test]
    fn the_interceptor_checks_the_token() {
        let mut open = interceptor(None);
        assert!(open(Request::new(())).is_ok());
        let mut guarded = interceptor(Some("0123456789abcdef".into()));
        let err = guarded(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(
            proto::auth::TOKEN_HEADER,
            "0123456789abcdeX".parse().unwrap(),
        );
        assert_eq!(guarded(wrong).unwrap_err().message(), "wrong worker token");
        let mut right = Request::new(());
        right.metadata_mut().insert(
            proto::auth::TOKEN_HEADER,
            "0123456789abcdef".parse().unwrap(),
        );
        assert!(guarded(right).is_ok());
    }
}

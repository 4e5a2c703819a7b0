//! Shared by the worker's gRPC tests: a client of a real `WorkerService` over an
//! in-memory duplex transport (the real tonic server and client, no socket).

use hyper_util::rt::TokioIo;
use proto::v1::worker_client::WorkerClient;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use worker::service::WorkerService;

/// A client of `svc` over an in-memory duplex transport.
pub async fn connect(svc: WorkerService) -> WorkerClient<Channel> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(
        Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io))),
    );
    let mut client_io = Some(client_io);
    let channel = Endpoint::try_from("http://in-memory.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the duplex is already connected"))
            }
        }))
        .await
        .unwrap();
    WorkerClient::new(channel)
}

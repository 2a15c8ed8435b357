//! The CLI's side of the local API: one HTTP/1 request per call over the Unix socket.

use super::ErrorBody;
use anyhow::{Context, anyhow};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// How long a CLI call waits for the agent before giving up with a clear message.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(data_dir: &Path) -> Self {
        Self { socket: super::socket_path(data_dir) }
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> anyhow::Result<R> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<R> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<R: DeserializeOwned>(&self, path: &str) -> anyhow::Result<R> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| anyhow!("the agent at {} did not answer within {CALL_TIMEOUT:?}", self.socket.display()))?
    }

    async fn call_inner<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "no agent is running with this data dir (cannot connect to {}); start one with `agent start` or \
                 `agent join`, or pass the right --data-dir",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await.context("sending the API request")?;
        let status = response.status();
        let bytes = response.into_body().collect().await.context("reading the API response")?.to_bytes();
        drop(sender);
        let _ = connection.await;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(anyhow!("{message}"));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("decoding the agent's answer to {path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiError, ApiResult, server};
    use axum::{Json, Router, routing::get};

    async fn hello() -> ApiResult<String> {
        Ok(Json("hello".to_string()))
    }
    async fn refuse() -> ApiResult<String> {
        Err(ApiError::conflict("address 10.30.0.5 is taken"))
    }

    #[tokio::test]
    async fn round_trip_and_error_message() {
        let dir = std::env::temp_dir().join(format!("canopy-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = server::bind(&crate::api::socket_path(&dir)).await.unwrap();
        let router = Router::new().route("/hello", get(hello)).route("/refuse", get(refuse));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server::serve(listener, router, async {
            let _ = stopped.await;
        }));

        let client = Client::new(&dir);
        let answer: String = client.get("/hello").await.unwrap();
        assert_eq!(answer, "hello");
        let err = client.get::<String>("/refuse").await.unwrap_err();
        assert_eq!(err.to_string(), "address 10.30.0.5 is taken");
        // A second server on the same data dir is refused while the first is alive.
        let second = server::bind(&crate::api::socket_path(&dir)).await.unwrap_err();
        assert!(second.to_string().contains("another agent is already running"), "{second}");

        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
        let gone = client.get::<String>("/hello").await.unwrap_err();
        assert!(gone.to_string().contains("no agent is running"), "{gone}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

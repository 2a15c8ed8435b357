//! Serving the local API on the data dir's Unix socket.

use anyhow::{Context, bail};
use axum::Router;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::{UnixListener, UnixStream};

/// Binds the API socket, refusing to steal it from a live agent. A socket left by a crashed agent (nobody accepts on
/// it) is removed first.
pub async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another agent is already running with this data dir (its API socket {} answers); \
                 stop it or use another --data-dir",
                socket.display()
            );
        }
        std::fs::remove_file(socket).with_context(|| format!("removing stale API socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding the API socket {}", socket.display()))?;
    // The API controls the machine's network: root (the owner) only.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting permissions of {}", socket.display()))?;
    Ok(listener)
}

/// Serves `router` until `shutdown` resolves, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let path = listener.local_addr()?.as_pathname().map(Path::to_path_buf);
    let result = axum::serve(listener, router).with_graceful_shutdown(shutdown).await;
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    result.context("serving the local API")
}

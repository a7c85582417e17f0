//! Where the REST API is served from: the socket systemd passed, or one the
//! daemon creates, refusing a live one or a file that is not a socket.

use tokio::net::UnixListener;

/// Why the API socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; remove it or choose another --api-socket")]
    NotASocket { path: String },
    #[error("another daemon answers on the API socket {path}")]
    Taken { path: String },
    #[error("cannot use the socket systemd passed: {0}")]
    Activation(#[source] std::io::Error),
}

/// Where the API is served from.
pub struct Listening {
    pub listener: UnixListener,
    /// The file this daemon created (removed at a clean stop); none when
    /// systemd passed the socket.
    pub created: Option<std::path::PathBuf>,
}

/// The socket systemd passed (socket activation: `hypemand-api.socket`, or
/// `systemd-socket-activate`), if any: it is served whatever `--api-socket`
/// says, since whoever started the daemon this way wants it served.
pub fn activated() -> Result<Option<Listening>, SocketError> {
    use std::os::fd::FromRawFd;
    let Some(fd) = sd_notify::listen_fds().ok().and_then(|mut fds| fds.next()) else {
        return Ok(None);
    };
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID is ours) and
    // nothing else in the process takes it.
    let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std.set_nonblocking(true).map_err(SocketError::Activation)?;
    let listener = UnixListener::from_std(std).map_err(SocketError::Activation)?;
    tracing::info!("API socket passed by systemd");
    Ok(Some(Listening {
        listener,
        created: None,
    }))
}

/// `path`, created mode 0666 (polkit decides who may change what) in a
/// directory created 0755. A stale socket left by a crash is replaced; a
/// live one, or any other file, is refused.
pub fn listen(path: &std::path::Path) -> Result<Listening, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let shown = path.display().to_string();
    let bind_err = |source| SocketError::Bind {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(bind_err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::Taken { path: shown });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => return Err(SocketError::NotASocket { path: shown }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    tracing::info!(path = %shown, "API socket listening");
    Ok(Listening {
        listener,
        created: Some(path.to_path_buf()),
    })
}

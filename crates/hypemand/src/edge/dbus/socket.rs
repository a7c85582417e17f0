//! *(issue 30)* The daemon's socket to the bus: a unix stream that zbus
//! drives (authentication, messages, file descriptors), whose read half
//! hands the method calls on device objects to [`super::fallback`] instead
//! of to zbus's object server.
//!
//! Why a socket of our own: zbus's object server keeps a node per object
//! (about 1.1 KB each: most of the daemon's heap at 4096 devices, and a
//! quarter of its start-up at 16384), and has nothing like sd-bus's fallback
//! vtables. A call on a path it has no node for, it answers `UnknownObject`
//! itself, and nothing of ours runs before it. Its transport is the one
//! place it lets us in (`Socket`), so those calls are taken out as they are
//! read. Everything else stays zbus's: it parses the messages, shares out
//! their file descriptors and does the handshake over these halves. Only the
//! two system calls zbus keeps private are here: `recvmsg` and `sendmsg` with
//! `SCM_RIGHTS` (Attach's `holder_pidfd` is a file descriptor).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use async_trait::async_trait;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, Shutdown,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use zbus::address::transport::{Transport, UnixSocket};
use zbus::connection::socket::{ReadHalf, Socket, Split, WriteHalf};
use zbus::Message;

/// How many file descriptors one read takes at most (as zbus and sd-bus).
const FDS_MAX: usize = 1024;

/// How many taken calls wait for the dispatcher before the reader waits for
/// it, as zbus's reader waits for its own full streams. The dispatcher only
/// spawns a task per call, so the queue is short-lived.
pub const DIVERTED_QUEUE: usize = 64;

/// Why the bus's socket cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot read the bus address: {0}")]
    Address(#[source] zbus::Error),
    #[error(
        "the bus address {0} is not a unix socket: hypemand serves only on a unix socket's bus \
         (unix:path=... or unix:abstract=...)"
    )]
    NotUnix(String),
    #[error("cannot connect to the bus socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The unix socket address `address` names, and how to say it.
fn socket_address(
    address: &zbus::Address,
) -> Result<(std::os::unix::net::SocketAddr, String), SocketError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let not_unix = || SocketError::NotUnix(address.to_string());
    let Transport::Unix(unix) = address.transport() else {
        return Err(not_unix());
    };
    let connect = |e| SocketError::Connect {
        path: address.to_string(),
        source: e,
    };
    match unix.path() {
        UnixSocket::File(path) => Ok((
            std::os::unix::net::SocketAddr::from_pathname(path).map_err(connect)?,
            path.display().to_string(),
        )),
        UnixSocket::Abstract(name) => Ok((
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(connect)?,
            format!("@{}", name.to_string_lossy()),
        )),
        // dir= and tmpdir= are for servers to listen on.
        _ => Err(not_unix()),
    }
}

/// A socket to the bus at `address`, and the receiving end of the calls its
/// reader takes out for [`super::fallback`] (those `divert` picks).
pub async fn connect(
    address: zbus::Address,
    divert: fn(&Message) -> bool,
) -> Result<(BusSocket, mpsc::Receiver<Message>), SocketError> {
    let (addr, said) = socket_address(&address)?;
    let failed = |source| SocketError::Connect {
        path: said.clone(),
        source,
    };
    // A connect to a unix socket does not wait on the network, but may on a
    // full listen backlog: off the runtime's threads.
    let std_stream =
        tokio::task::spawn_blocking(move || std::os::unix::net::UnixStream::connect_addr(&addr))
            .await
            .map_err(|e| failed(io::Error::other(e)))?
            .map_err(failed)?;
    std_stream.set_nonblocking(true).map_err(failed)?;
    let stream = UnixStream::from_std(std_stream).map_err(failed)?;
    let (tx, rx) = mpsc::channel(DIVERTED_QUEUE);
    Ok((
        BusSocket {
            stream: Arc::new(stream),
            divert,
            diverted: tx,
        },
        rx,
    ))
}

/// The daemon's unix stream to the bus, for `zbus::connection::Builder::socket`.
#[derive(Debug)]
pub struct BusSocket {
    stream: Arc<UnixStream>,
    divert: fn(&Message) -> bool,
    diverted: mpsc::Sender<Message>,
}

impl Socket for BusSocket {
    type ReadHalf = Reader;
    type WriteHalf = Writer;

    fn split(self) -> Split<Reader, Writer> {
        Split::new(
            Reader {
                raw: Raw(self.stream.clone()),
                divert: self.divert,
                diverted: self.diverted,
            },
            Writer(self.stream),
        )
    }
}

/// The stream's reads, as bytes and file descriptors: zbus's own message
/// reading (`ReadHalf::receive_message`'s default) runs on these.
#[derive(Debug)]
struct Raw(Arc<UnixStream>);

#[async_trait]
impl ReadHalf for Raw {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        self.0
            .async_io(Interest::READABLE, || fd_recvmsg(self.0.as_fd(), buf))
            .await
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

/// The read half: zbus's messages, less the calls `divert` picks, which go
/// to the fallback's queue.
#[derive(Debug)]
pub struct Reader {
    raw: Raw,
    divert: fn(&Message) -> bool,
    diverted: mpsc::Sender<Message>,
}

#[async_trait]
impl ReadHalf for Reader {
    async fn receive_message(
        &mut self,
        seq: u64,
        already_received_bytes: &mut Vec<u8>,
        already_received_fds: &mut Vec<OwnedFd>,
    ) -> zbus::Result<Message> {
        loop {
            let msg = self
                .raw
                .receive_message(seq, already_received_bytes, already_received_fds)
                .await?;
            if !(self.divert)(&msg) {
                return Ok(msg);
            }
            match self.diverted.send(msg).await {
                Ok(()) => continue,
                // The fallback is gone (the daemon is stopping): zbus
                // answers it, as it answers any path it has no node for.
                Err(mpsc::error::SendError(msg)) => return Ok(msg),
            }
        }
    }

    // The handshake reads through this.
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        self.raw.recvmsg(buf).await
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

/// The write half.
#[derive(Debug)]
pub struct Writer(Arc<UnixStream>);

#[async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        self.0
            .async_io(Interest::WRITABLE, || {
                fd_sendmsg(self.0.as_fd(), &[IoSlice::new(buffer)], fds)
            })
            .await
    }

    async fn close(&mut self) -> io::Result<()> {
        rustix::net::shutdown(self.0.as_fd(), Shutdown::Both).map_err(io::Error::from)
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

/// One `recvmsg`: the bytes read, and the file descriptors that came with
/// them (close-on-exec: hypemand starts helpers, which must not get them).
fn fd_recvmsg(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(fd, &mut iov, &mut ancillary, RecvFlags::CMSG_CLOEXEC)?;
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the bus closed the connection",
        ));
    }
    let mut fds = Vec::new();
    for m in ancillary.drain() {
        match m {
            RecvAncillaryMessage::ScmRights(got) => fds.extend(got),
            // Credentials are not asked for; any that come are not ours to keep.
            RecvAncillaryMessage::ScmCredentials(_) => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the bus sent control data other than file descriptors",
                ))
            }
        }
    }
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the bus sent more than {FDS_MAX} file descriptors at once"),
        ));
    }
    Ok((msg.bytes, fds))
}

/// One `sendmsg` of `buffers`, with `fds` (the first write of a message).
fn fd_sendmsg(
    fd: BorrowedFd<'_>,
    buffers: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a message carries more than {FDS_MAX} file descriptors"),
        ));
    }
    Ok(sendmsg(fd, buffers, &mut ancillary, SendFlags::NOSIGNAL)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file descriptor sent with bytes arrives with them, close-on-exec,
    /// and refers to the same open file.
    #[test]
    fn file_descriptors_travel_with_the_bytes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let sent = fd_sendmsg(a.as_fd(), &[IoSlice::new(b"hello")], &[file.as_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 16];
        let (n, fds) = fd_recvmsg(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        use std::os::unix::fs::MetadataExt;
        let theirs = std::fs::File::from(fds.into_iter().next().unwrap());
        assert_eq!(
            theirs.metadata().unwrap().ino(),
            file.metadata().unwrap().ino()
        );
    }

    /// A closed peer is an error, not a read of nothing forever.
    #[test]
    fn a_closed_peer_is_an_error() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        let mut buf = [0u8; 16];
        let e = fd_recvmsg(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    /// Only unix socket addresses are served on.
    #[test]
    fn a_tcp_bus_address_is_refused_with_a_reason() {
        let address: zbus::Address = "tcp:host=127.0.0.1,port=4242".parse().unwrap();
        let e = socket_address(&address).unwrap_err();
        assert!(e.to_string().contains("not a unix socket"), "{e}");
        let address: zbus::Address = "unix:path=/run/dbus/system_bus_socket".parse().unwrap();
        assert_eq!(
            socket_address(&address).unwrap().1,
            "/run/dbus/system_bus_socket"
        );
    }
}

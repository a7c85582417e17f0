//! *(issue 27)* `hypemanctl attach DEVICE INSTANCE -- COMMAND [ARGS…]`: the
//! device is attached under a lease on the command, which runs, and
//! hypemanctl exits with its status once hypemand has released the device.
//! The model is `systemd-inhibit`, which holds a lock for a command's life.
//!
//! The command must not run before it holds the device, and the lease must
//! be on the command itself (not on hypemanctl, which may be killed on its
//! own): hypemanctl forks a child that waits on a pipe, attaches with a
//! pidfd of that child, and only then lets it exec the command. If the
//! attach is refused, the child exits without running anything.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use hypeman_api::{Error, Options};
use zbus::{MatchRule, MessageStream};

use crate::Client;

/// The child's status when it was told not to run the command.
const NOT_RUN: i32 = 125;
/// The child's status when the command cannot be executed.
const CANNOT_EXEC: i32 = 127;

pub use hypeman_api::options::pidfd_open;

/// The program a command names: a path as given, else the first
/// executable file of that name in `PATH`.
fn resolve(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child forked and waiting for the word to exec.
struct Waiting {
    pid: libc::pid_t,
    go: Option<OwnedFd>,
}

impl Waiting {
    /// Forks a child that execs `argv` once told to, or exits.
    fn fork(argv: &[OsString]) -> Result<Waiting, Error> {
        let program = argv
            .first()
            .ok_or_else(|| Error::InvalidArgument("no command after --".into()))?;
        let path = resolve(program).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "cannot find {} in PATH",
                Path::new(program).display()
            ))
        })?;
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes())
                .map_err(|_| Error::InvalidArgument("a command argument holds a NUL byte".into()))
        };
        let path = cstr(path.as_os_str())?;
        let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::Failed(format!(
                "cannot make a pipe: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: both fds were just made and are owned here alone.
        let (wait, go) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child calls only async-signal-safe functions (close,
        // read, execv, write, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::Failed(format!(
                "cannot start the command: {}",
                std::io::Error::last_os_error()
            )));
        }
        if pid == 0 {
            // SAFETY: see above; nothing here allocates or takes a lock.
            unsafe {
                libc::close(go.as_raw_fd());
                let mut byte = 0u8;
                let n = libc::read(wait.as_raw_fd(), (&raw mut byte).cast(), 1);
                if n != 1 {
                    libc::_exit(NOT_RUN);
                }
                libc::execv(path.as_ptr(), ptrs.as_ptr());
                let msg = b"hypemanctl: cannot execute the command\n";
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(CANNOT_EXEC);
            }
        }
        drop(wait);
        Ok(Waiting { pid, go: Some(go) })
    }

    /// Lets the child exec the command.
    fn go(&mut self) {
        if let Some(go) = self.go.take() {
            // SAFETY: writes one byte from a live buffer to an open fd.
            unsafe { libc::write(go.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        }
    }

    /// Waits for the child; its exit code, or 128 + the signal that ended it.
    async fn wait(mut self) -> Result<u8, Error> {
        // Without the word the child exits at once.
        self.go.take();
        let pid = self.pid;
        let status = tokio::task::spawn_blocking(move || loop {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a live int.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                return Ok(status);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        })
        .await
        .map_err(|e| Error::Failed(e.to_string()))?
        .map_err(|e| Error::Failed(format!("cannot wait for the command: {e}")))?;
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        Ok(u8::try_from(code).unwrap_or(u8::MAX))
    }
}

/// Attaches `id_or_name` to `instance` under a lease on `command`, runs it,
/// waits for hypemand to release the device, and answers the command's
/// exit status.
pub async fn attach_while(
    client: &Client,
    id_or_name: &str,
    instance: &str,
    mut options: Options,
    command: &[OsString],
) -> Result<u8, Error> {
    let mut child = Waiting::fork(command)?;
    let pid = u32::try_from(child.pid).unwrap_or_default();
    let attached = async {
        let pidfd = pidfd_open(pid)
            .map_err(|e| Error::Failed(format!("cannot open a pidfd of the command: {e}")))?;
        options.holder_pidfd = Some(Arc::new(pidfd));
        let record = client.attach_with(id_or_name, instance, options).await?;
        // Watching before the command can end: its release is not missed.
        let path = hypeman_api::device_path(&record.id)
            .ok_or_else(|| Error::Failed(format!("{} is not a device id", record.id)))?;
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(hypeman_api::BUS_NAME)
            .path(path)
            .interface("org.freedesktop.DBus.Properties")
            .build()
            .map_err(|e| Error::Bus(e.to_string()))?;
        let stream = MessageStream::for_match_rule(rule, client.connection(), None).await?;
        Ok::<_, Error>((record, stream))
    };
    let (record, mut stream) = match attached.await {
        Ok(a) => a,
        Err(e) => {
            let _ = child.wait().await;
            return Err(e);
        }
    };
    eprintln!(
        "hypemanctl: {} is attached to {instance} while process {pid} runs",
        record.name
    );
    child.go();
    let code = child.wait().await?;
    // The daemon releases the device when it sees the command's end; answer
    // after that, so the next command finds it free.
    loop {
        match client.get(&record.id).await {
            Ok(now) if now.holder_pid != Some(i64::from(pid)) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!(
                    "hypemanctl: cannot tell whether {} was released: {e}",
                    record.name
                );
                break;
            }
        }
        if stream.next().await.is_none() {
            break;
        }
    }
    Ok(code)
}

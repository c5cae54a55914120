//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): `READY=1` once every listener is
//! bound, `STOPPING=1` when the drain starts. Without it systemd (and `systemctl start`, and units
//! ordered `After=outrigger.service`) would count the agent as started as soon as the process
//! exists, before a port is open or a configuration error has stopped it.
//!
//! The protocol is one datagram per state change to the `AF_UNIX` socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for Linux's abstract namespace); see sd_notify(3),
//! "Notes". No library: that is the whole of it. Outside systemd (`NOTIFY_SOCKET` unset) and on
//! other systems it does nothing. A failure to notify is logged, never fatal: the agent serves
//! either way, and systemd's start timeout says the rest.

/// Tells the service manager the agent is serving.
pub fn ready() {
    notify("READY=1\nSTATUS=serving");
}

/// Tells the service manager the agent is draining before it exits.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=draining");
}

#[cfg(target_os = "linux")]
fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(
            notify_socket = %socket.to_string_lossy(),
            state = state.lines().next().unwrap_or_default(),
            "cannot notify systemd: {e}"
        );
    }
}

#[cfg(target_os = "linux")]
fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let bytes = socket.as_bytes();
    let addr = match bytes.split_first() {
        // "@name": the abstract namespace (sd_notify(3)).
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn notify(_state: &str) {}

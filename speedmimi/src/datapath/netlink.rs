//! rtnetlink requests, the few the daemon makes (addresses on its announce interface, bringing
//! it up, neighbour entries for XDP's backends): a socket, one request at a time, each waiting
//! for the kernel's acknowledgement (at most a second).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Mutex,
    time::Duration,
};

/// An rtnetlink socket and the last sequence number used; requests through it are serialised.
pub struct Rtnetlink(Mutex<(OwnedFd, u32)>);

impl Rtnetlink {
    pub fn open() -> io::Result<Rtnetlink> {
        // SAFETY: socket takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        socket2::SockRef::from(&socket).set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Rtnetlink(Mutex::new((socket, 0))))
    }

    /// One request (`kind`, `flags` besides REQUEST and ACK, `body` after the header) and its
    /// acknowledgement: Ok, or the error the kernel answered.
    pub fn request(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        const HEADER: usize = 16;
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (socket, last) = &mut *guard;
        // Each request its own number: the answer to one that timed out, arriving late, is not
        // taken for the next one's.
        *last = last.wrapping_add(1);
        let seq = *last;
        let len = HEADER + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
        msg.extend_from_slice(body);
        // SAFETY: a zeroed sockaddr_nl is valid; the family makes it the kernel's address.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and to are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = [0u8; 1024];
        loop {
            // SAFETY: answer is valid for writes of its length.
            let n = unsafe { libc::recv(socket.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let answer = &answer[..n as usize];
            if answer.len() < HEADER + 4 {
                return Err(io::Error::other("short rtnetlink answer"));
            }
            let kind = u16::from_ne_bytes([answer[4], answer[5]]);
            if kind != libc::NLMSG_ERROR as u16
                || u32::from_ne_bytes([answer[8], answer[9], answer[10], answer[11]]) != seq
            {
                continue;
            }
            return match i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]) {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
    }
}

/// Appends a netlink attribute of `kind` holding `value` (whose length is a multiple of 4).
pub fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
}

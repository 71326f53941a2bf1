//! A failed netlink request as the kernel reported it: the errno, its symbolic name, and the
//! extended-ack message when the kernel sent one.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errno {
    pub code: i32,
    /// The kernel's extended-ack text (`NLMSGERR_ATTR_MSG`), or what went wrong locally.
    pub message: Option<String>,
}

impl Errno {
    pub fn new(code: i32) -> Errno {
        Errno {
            code,
            message: None,
        }
    }

    pub fn with_message(code: i32, message: impl Into<String>) -> Errno {
        Errno {
            code,
            message: Some(message.into()),
        }
    }

    /// A socket-level failure (creating, sending, receiving).
    pub fn from_io(err: &std::io::Error) -> Errno {
        match err.raw_os_error() {
            Some(code) => Errno::new(code),
            None => Errno::with_message(libc::EIO, err.to_string()),
        }
    }
}

impl fmt::Display for Errno {
    /// `Network is unreachable (ENETUNREACH, os error 101; kernel: <extack>)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let described = std::io::Error::from_raw_os_error(self.code).to_string();
        let suffix = format!(" (os error {})", self.code);
        let text = described.strip_suffix(&suffix).unwrap_or(&described);
        write!(f, "{text} (")?;
        if let Some(name) = name(self.code) {
            write!(f, "{name}, ")?;
        }
        write!(f, "os error {}", self.code)?;
        if let Some(message) = &self.message {
            write!(f, "; kernel: {message}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for Errno {}

/// The symbolic name of the errnos interface, address and route requests return.
fn name(code: i32) -> Option<&'static str> {
    Some(match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ERANGE => "ERANGE",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENOBUFS => "ENOBUFS",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_description_name_code_and_the_kernel_s_message() {
        assert_eq!(
            Errno::new(libc::ENETUNREACH).to_string(),
            "Network is unreachable (ENETUNREACH, os error 101)"
        );
        assert_eq!(
            Errno::with_message(libc::EINVAL, "Nexthop has invalid gateway").to_string(),
            "Invalid argument (EINVAL, os error 22; kernel: Nexthop has invalid gateway)"
        );
        // An errno without a name in the table still shows its number.
        assert!(
            Errno::new(libc::ETIMEDOUT)
                .to_string()
                .ends_with("(os error 110)")
        );
    }

    #[test]
    fn socket_errors_keep_their_errno() {
        let err = std::io::Error::from_raw_os_error(libc::EPROTONOSUPPORT);
        assert_eq!(Errno::from_io(&err), Errno::new(libc::EPROTONOSUPPORT));
        let other = std::io::Error::other("short read");
        assert_eq!(
            Errno::from_io(&other),
            Errno::with_message(libc::EIO, "short read")
        );
    }
}

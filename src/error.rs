//! One error type for the whole crate.
//!
//! User mistakes (a missing file, a corrupt image, a wrongly shaped weight) become an `Error` whose
//! `Display` is one line naming the file and the problem; the binary prints it and exits non-zero.
//! Panics are reserved for bugs (broken internal invariants), never for bad input.

use std::fmt;
use std::path::Path;

#[derive(Debug)]
pub enum Error {
    /// An I/O failure on a named file.
    Io { path: String, source: std::io::Error },
    /// A file that exists but whose contents are wrong (corrupt, truncated, malformed).
    Format { path: String, msg: String },
    /// Shapes that do not fit together.
    Shape(String),
    /// Anything else a user can cause (bad argument, unsupported option).
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().display().to_string(), msg: msg.into() }
    }
    pub fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Format { path, msg } => write!(f, "{path}: {msg}"),
            Error::Shape(msg) => write!(f, "shape mismatch: {msg}"),
            Error::Msg(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// `bail!("...")` returns early with `Error::Msg(format!(...))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}

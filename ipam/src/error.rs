//! Errors of the IPAM crate.

use std::io;
use std::path::PathBuf;

use crate::pool::PoolError;

/// Everything that can go wrong in the IPAM store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store's directory could not be created or synced.
    #[error("IPAM store directory {path}: {action} failed")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store file could not be opened or is not an SQLite database.
    #[error("IPAM store {path} cannot be opened or read (not a database, damaged, or no permission)")]
    Unreadable {
        /// The store file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is an SQLite database of some other program.
    #[error(
        "{path} is an SQLite database but not a netd IPAM store (application_id {found:#x}); refusing to touch it"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its application_id.
        found: i64,
    },
    /// Written by a newer netd.
    #[error("IPAM store {path} has format version {found}; this netd reads versions up to {supported}")]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: i64,
        /// The newest version this build reads.
        supported: i64,
    },
    /// A query or transaction failed.
    #[error("IPAM store {path}: {action} failed")]
    Sql {
        /// The file.
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// What SQLite reported.
        #[source]
        source: rusqlite::Error,
    },
    /// A row holds a value this crate never writes (hand-edited or damaged store).
    #[error("IPAM store {path}: row {row:?} is invalid: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The row's key.
        row: String,
        /// What is wrong.
        why: String,
    },
    /// A row holds a VTEP MAC that does not parse.
    #[error("IPAM store {path}: row {row:?} is invalid: {source}")]
    CorruptMac {
        /// The file.
        path: PathBuf,
        /// The row's key.
        row: String,
        /// Why the MAC does not parse.
        #[source]
        source: netd_model::MacParseError,
    },
    /// No free address is left.
    #[error(
        "no free address in {range_set}: all {capacity} are taken ({attached} attached, {released} held by \
         released pins that only an authoritative reconcile or an explicit forget frees)"
    )]
    Exhausted {
        /// The range set.
        range_set: String,
        /// Its allocatable addresses.
        capacity: u128,
        /// Addresses attached to running containers.
        attached: usize,
        /// Addresses pinned to pods whose containers are gone.
        released: usize,
    },
    /// Two range sets of one address family in one request.
    #[error("two range sets of the same IP family ({0}); a pod interface gets one IPv4 and/or one IPv6 address")]
    DuplicateFamily(String),
    /// A pool definition was refused.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// No MAC could be found that avoids every known peer's.
    #[error("could not derive a VTEP MAC for node {node:?} that avoids all {peers} known peer MACs")]
    MacSpaceExhausted {
        /// The node.
        node: String,
        /// How many peers were given.
        peers: usize,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Maps an SQLite error of `action` on the store at `path`.
pub(crate) fn sql_err(path: &std::path::Path, action: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Sql { path: path.clone(), action, source }
}

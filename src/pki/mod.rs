//! Salt's PKI as salt-steward manages it: key pairs in Salt's text forms
//! (`keys`), key files created with safe modes (`files`), and the master's
//! own keys and pre-made key signature (`master`); issuing minion keys for
//! servers (`issuer`) and their bundles (`bundle`).
pub mod bundle;
pub mod files;
pub mod issuer;
pub mod keys;
pub mod master;

pub use issuer::{Claim, IssueError, Issued, KeyIssuer};
pub use keys::{clean_key, encrypt_oaep_sha256, fingerprint, KeyError, KeyPair};
pub use master::{Covers, PkiError};

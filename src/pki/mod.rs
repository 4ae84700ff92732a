//! Salt's PKI as salt-steward manages it: key pairs in Salt's text forms
//! (`keys`) and key files created with safe modes (`files`).
pub mod files;
pub mod keys;

pub use keys::{clean_key, fingerprint, KeyError, KeyPair};

//! Salt's PKI as salt-steward manages it: key pairs in Salt's text forms
//! (`keys`) and key files created with safe modes (`files`).
pub mod bundle;
pub mod files;
pub mod issuer;
pub mod keys;

pub use issuer::{Issued, KeyIssuer};
pub use keys::{clean_key, fingerprint, KeyError, KeyPair};

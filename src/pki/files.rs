//! Writing key files: private keys are created with mode 0600 (never
//! chmod-ed after, so there is no moment they are readable by others) and
//! never replace an existing file by accident.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Creates `path` (which must not exist) with `mode` and writes `text`.
/// The error names the file.
pub fn create_new(path: &Path, text: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| named(path, e))?;
    f.write_all(text)
        .and_then(|()| f.sync_all())
        .map_err(|e| named(path, e))
}

/// Creates a private key file, mode 0600.
pub fn create_private(path: &Path, pem: &str) -> std::io::Result<()> {
    create_new(path, pem.as_bytes(), 0o600)
}

/// Creates a public key (or signature) file, mode 0644.
pub fn create_public(path: &Path, text: &str) -> std::io::Result<()> {
    create_new(path, text.as_bytes(), 0o644)
}

/// Creates directory `dir` (and parents) with mode 0700 if missing.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| named(dir, e))
}

fn named(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_files_are_0600_from_the_start_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        create_private(&p, "secret").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = create_private(&p, "other").unwrap_err();
        assert!(err.to_string().contains("k.pem"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "secret");
    }
}

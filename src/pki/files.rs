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

/// Replaces (or creates) `path` with `text`, mode `mode`, atomically: the
/// text goes to a temporary file in the same directory, which is then renamed
/// over `path`, so a reader sees the old file or the new one, never half.
pub fn replace_atomic(path: &Path, text: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().map_or_else(
        || std::ffi::OsString::from("file"),
        std::ffi::OsStr::to_os_string,
    );
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover of a crashed run of this very process id.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(&tmp, e)),
    }
    create_new(&tmp, text, mode)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        named(path, e)
    })
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

    #[test]
    fn replace_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sig");
        replace_atomic(&p, b"one", 0o644).unwrap();
        replace_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

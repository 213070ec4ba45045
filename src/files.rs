//! Files named by a user, in and out. Inputs are opened only when they are regular files: a FIFO,
//! socket, device or directory is refused with one clear error, never opened in a way that can
//! block (a FIFO's `open` waits for a writer forever) or read forever (`/dev/zero`). Reads of a
//! whole file are bounded by a stated limit. Outputs of several files (an analysis, an export)
//! are staged in a hidden folder beside the destination and moved into place only when every
//! file is written, so a failing command leaves nothing behind.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// What a non-regular file is, for the error.
fn kind_of(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

fn not_regular(meta: &fs::Metadata) -> io::Error {
    let kind = if meta.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    io::Error::new(
        kind,
        format!("is not a regular file (it is {})", kind_of(meta)),
    )
}

/// Checks that `path` (after symbolic links) is a regular file, without opening it.
pub fn check_regular(path: &Path) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(not_regular(&meta))
    }
}

/// Opens `path` for reading when it is a regular file. The type is checked before the open and
/// again on the opened handle (the path may have been swapped in between); the open itself is
/// non-blocking, so even a FIFO swapped in at that moment cannot hang it.
pub fn open_regular(path: &Path) -> io::Result<File> {
    check_regular(path)?;
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // Back to blocking reads (O_NONBLOCK means nothing for a regular file, but a handle
        // given to other code should be an ordinary one).
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// The whole of the regular file `path`, refused when larger than `limit` bytes (checked from
/// its size before anything is read, and again while reading, should it grow).
pub fn read_regular(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > limit {
        return Err(too_large(len, limit));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_string(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, limit)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8 text ({e})")))
}

fn too_large(len: u64, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{len} bytes is beyond the limit of {limit} bytes for this file"),
    )
}

/// An output folder written whole or not at all: files go into a hidden staging folder beside
/// `dest` (`.NAME.tmp-PID`), and [`StagedDir::commit`] moves each into `dest` (created then)
/// with a rename. Dropped uncommitted (an error, a panic), the staging folder is removed and
/// `dest` is as it was.
#[derive(Debug)]
pub struct StagedDir {
    staging: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Stages an output for `dest`, which must be a folder or not exist yet. Staging folders a
    /// killed run left beside it are removed.
    pub fn new(dest: &Path) -> io::Result<Self> {
        if dest.exists() && !dest.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a folder",
            ));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)?;
        remove_stale(&parent, &name);
        let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir(&staging)?;
        Ok(Self {
            staging,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Where the files are written until the commit.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The destination folder.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Where `staged` (a path under [`StagedDir::path`]) will be once committed.
    pub fn final_path(&self, staged: &Path) -> PathBuf {
        match staged.strip_prefix(&self.staging) {
            Ok(rel) => self.dest.join(rel),
            Err(_) => staged.to_path_buf(),
        }
    }

    /// Moves every staged entry into the destination (replacing files of the same name) and
    /// returns their final paths, sorted.
    pub fn commit(mut self) -> io::Result<Vec<PathBuf>> {
        fs::create_dir_all(&self.dest)?;
        let mut moved = Vec::new();
        for entry in fs::read_dir(&self.staging)? {
            let entry = entry?;
            let to = self.dest.join(entry.file_name());
            if entry.file_type()?.is_dir() && to.is_dir() {
                fs::remove_dir_all(&to)?;
            }
            fs::rename(entry.path(), &to)?;
            moved.push(to);
        }
        self.committed = true;
        let _ = fs::remove_dir_all(&self.staging);
        moved.sort();
        Ok(moved)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// Removes `.NAME.tmp-PID` folders in `parent` whose process is gone.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !crate::tensor_io::process_alive(pid) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn fifos_devices_and_folders_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a fresh path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = open_regular(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::IsADirectory);
        assert!(e.to_string().contains("a directory"), "{e}");
        // A link to a device is judged by what it points to.
        let link = dir.path().join("zero.safetensors");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(open_regular(&link).is_err());
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, [7u8; 100]).unwrap();
        assert_eq!(read_regular(&p, 100).unwrap().len(), 100);
        let e = read_regular(&p, 99).unwrap_err();
        assert!(
            e.to_string()
                .contains("100 bytes is beyond the limit of 99"),
            "{e}"
        );
    }

    #[test]
    fn a_staged_folder_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        {
            let staged = StagedDir::new(&dest).unwrap();
            fs::write(staged.path().join("a.json"), "{}").unwrap();
            // Dropped without a commit: nothing appears.
        }
        assert!(!dest.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no staging left"
        );
        let staged = StagedDir::new(&dest).unwrap();
        fs::write(staged.path().join("a.json"), "{}").unwrap();
        fs::create_dir(staged.path().join("sub")).unwrap();
        let files = staged.commit().unwrap();
        assert_eq!(files, vec![dest.join("a.json"), dest.join("sub")]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A file in the way is an error before anything is written.
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(StagedDir::new(&file).is_err());
    }
}

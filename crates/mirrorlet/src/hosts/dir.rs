//! A registry directory opened once (never through a symbolic link) and worked in by
//! names relative to that handle: once it is checked, swapping the directory for a link
//! cannot send a read or a write anywhere else.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::{HostsError, MAX_FILE, io_err};

/// An open registry directory.
#[derive(Debug)]
pub(super) struct RegistryDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl RegistryDir {
    /// Opens `path`, which must be a directory itself (not a link to one); `None` if
    /// nothing is there.
    pub(super) fn open(path: &Path) -> Result<Option<Self>, HostsError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(Self {
                fd,
                path: path.to_owned(),
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            // Linux answers a link here with ENOTDIR or ELOOP: say which it is.
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
                Err(HostsError::Refused {
                    path: path.to_owned(),
                    why: if link {
                        "a symbolic link"
                    } else {
                        "not a directory"
                    },
                })
            }
            Err(e) => Err(io_err("opening", path)(e.into())),
        }
    }

    fn at(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads `name` if it exists: a regular file (or a link to one) of at most
    /// [`MAX_FILE`] bytes. Opened without blocking, so a FIFO or device planted there
    /// cannot hang us.
    pub(super) fn read_optional(&self, name: &str) -> Result<Option<String>, HostsError> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let mut f = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err("reading", &self.at(name))(e.into())),
        };
        let meta = f.metadata().map_err(io_err("reading", &self.at(name)))?;
        if !meta.is_file() {
            return Err(HostsError::Refused {
                path: self.at(name),
                why: "not a regular file",
            });
        }
        let mut text = String::new();
        (&mut f)
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io_err("reading", &self.at(name)))?;
        if text.len() as u64 > MAX_FILE {
            return Err(HostsError::Refused {
                path: self.at(name),
                why: "larger than 1 MiB",
            });
        }
        Ok(Some(text))
    }

    /// The permission bits of `name` (following a link), if it exists.
    pub(super) fn mode(&self, name: &str) -> Option<u32> {
        rustix::fs::statat(&self.fd, name, AtFlags::empty())
            .ok()
            .map(|st| st.st_mode & 0o777)
    }

    /// Gives the entry `from` (a file, or a link itself: not followed) the second name
    /// `to`, replacing whatever `to` was.
    pub(super) fn link(&self, from: &str, to: &str) -> Result<(), HostsError> {
        self.remove_if_present(to)?;
        rustix::fs::linkat(&self.fd, from, &self.fd, to, AtFlags::empty())
            .map_err(|e| io_err("keeping the original as", &self.at(to))(e.into()))
    }

    /// Renames `from` over `to`; `action` names it in an error.
    pub(super) fn rename(
        &self,
        from: &str,
        to: &str,
        action: &'static str,
    ) -> Result<(), HostsError> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)
            .map_err(|e| io_err(action, &self.at(from))(e.into()))
    }

    /// Removes the directory if it is empty and still the one opened (not one put in its
    /// place since, nor a link); quietly keeps it otherwise.
    pub(super) fn remove_if_empty(self) {
        let (Ok(opened), Ok(there)) = (
            rustix::fs::fstat(&self.fd),
            rustix::fs::statat(rustix::fs::CWD, &self.path, AtFlags::SYMLINK_NOFOLLOW),
        ) else {
            return;
        };
        if (opened.st_dev, opened.st_ino) == (there.st_dev, there.st_ino) {
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    /// Removes the entry `name` (a link itself, never what it points to), if any.
    pub(super) fn remove_if_present(&self, name: &str) -> Result<(), HostsError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err("removing", &self.at(name))(e.into())),
        }
    }

    /// Replaces `name` with `text` at once: written to the temporary `temp`, created
    /// exclusively (never through a link planted at its name) with `mode`, synced, then
    /// renamed over `name`.
    pub(super) fn write_atomic(
        &self,
        temp: &str,
        name: &str,
        text: &str,
        mode: u32,
    ) -> Result<(), HostsError> {
        self.remove_if_present(temp)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, temp, flags, Mode::from_raw_mode(mode))
            .map_err(|e| io_err("creating", &self.at(temp))(e.into()))?;
        let mut f = File::from(fd);
        // The mode asked for, whatever the umask took away.
        let written = rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))
            .map_err(io::Error::from)
            .and_then(|()| f.write_all(text.as_bytes()))
            .and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = self.remove_if_present(temp);
            return Err(io_err("writing", &self.at(temp))(e));
        }
        self.rename(temp, name, "renaming into place")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_swapped_for_a_link_after_it_was_opened_takes_nothing_elsewhere() {
        let root = tempfile::tempdir().expect("tempdir");
        let (dir, moved, elsewhere) = (
            root.path().join("docker.io"),
            root.path().join("moved"),
            root.path().join("elsewhere"),
        );
        std::fs::create_dir(&dir).expect("dir");
        std::fs::create_dir(&elsewhere).expect("elsewhere");
        std::fs::write(dir.join("hosts.toml"), "original").expect("file");
        let opened = RegistryDir::open(&dir).expect("open").expect("exists");
        // Swapped between the check and the writes.
        std::fs::rename(&dir, &moved).expect("move");
        std::os::unix::fs::symlink(&elsewhere, &dir).expect("link");

        opened.link("hosts.toml", "backup").expect("link");
        opened
            .write_atomic("tmp", "hosts.toml", "ours", 0o600)
            .expect("write");
        assert_eq!(
            std::fs::read_dir(&elsewhere).expect("list").count(),
            0,
            "nothing went through the link"
        );
        assert_eq!(
            std::fs::read_to_string(moved.join("hosts.toml")).expect("read"),
            "ours"
        );
        assert_eq!(
            std::fs::read_to_string(moved.join("backup")).expect("read"),
            "original"
        );
        assert_eq!(opened.mode("hosts.toml"), Some(0o600));
        assert_eq!(
            opened.read_optional("hosts.toml").expect("read").as_deref(),
            Some("ours")
        );

        // Opened anew, the link is refused.
        assert!(matches!(
            RegistryDir::open(&dir),
            Err(HostsError::Refused {
                why: "a symbolic link",
                ..
            })
        ));
        assert!(
            RegistryDir::open(&root.path().join("none"))
                .expect("absent")
                .is_none()
        );
    }
}

//! What a disk is pinned to at open: one typed validator per kind of
//! provider answer, each with its strength, so that a weak pin is told
//! apart in one place and never passes for a strong one.

use std::fmt;

/// The identity of one version of a disk's bytes. Every ranged read carries
/// it as a precondition and every answer is checked against it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Version {
    /// A strong entity tag, as the server quoted it (HTTP, S3, Azure).
    ETag(String),
    /// An object generation (GCS): every write makes a new one.
    Generation(i64),
    /// The bytes under a provider snapshot held for the export (vSphere
    /// `snapshot=on`), which do not change while it is held; the file's own
    /// validator is still sent and checked.
    Snapshot { id: String, file: Box<Version> },
    /// An immutable provider snapshot (an EBS snapshot): its id names the
    /// same bytes for as long as it exists.
    Frozen(String),
    /// A local file's identity and times (dir://, hyperv://).
    File(Box<FileIdentity>),
    /// An HTTP Last-Modified date, as the server wrote it.
    Modified(String),
    /// Nothing but the size.
    Size(u64),
    /// A synthetic disk whose bytes never change (demo://).
    Immutable,
    /// The provider gave no validator at all (an S3 or Azure answer without
    /// an ETag): reads can not be pinned.
    Unpinned,
}

/// How much of a change a version can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strength {
    /// Every change of the bytes makes another version.
    Strong,
    /// Changes within the same second go unseen (Last-Modified).
    Seconds,
    /// A rewrite of the same length goes unseen.
    SizeOnly,
    /// No change is seen.
    None,
}

/// A file's identity and times at open: device and inode say which file,
/// size, mtime and ctime which state of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Version {
    /// An ETag as a server sent it: weak ones (`W/"…"`) can not pin bytes
    /// and empty ones are no ETag.
    pub fn from_etag(etag: Option<&str>) -> Option<Version> {
        let etag = etag?.trim();
        (!etag.is_empty() && !etag.starts_with("W/")).then(|| Version::ETag(etag.to_string()))
    }

    pub fn strength(&self) -> Strength {
        match self {
            Version::ETag(_)
            | Version::Generation(_)
            | Version::Snapshot { .. }
            | Version::Frozen(_)
            | Version::File(_)
            | Version::Immutable => Strength::Strong,
            Version::Modified(_) => Strength::Seconds,
            Version::Size(_) => Strength::SizeOnly,
            Version::Unpinned => Strength::None,
        }
    }

    /// Why this version can not tell every change of the bytes apart, or
    /// `None` for a strong pin.
    pub fn weakness(&self) -> Option<&'static str> {
        match self.strength() {
            Strength::Strong => None,
            Strength::Seconds => Some(
                "pinned by Last-Modified only (no strong ETag): a change within the same second goes unseen",
            ),
            Strength::SizeOnly => Some(
                "pinned by size only (no ETag, no Last-Modified): a rewrite of the same size goes unseen",
            ),
            Strength::None => Some("the provider gave no ETag: reads cannot be pinned"),
        }
    }

    /// The validator an HTTP-style answer is checked against and sent as a
    /// precondition (a snapshot's is its file's).
    pub fn etag(&self) -> Option<&str> {
        match self {
            Version::ETag(etag) => Some(etag),
            Version::Snapshot { file, .. } => file.etag(),
            _ => None,
        }
    }

    pub fn modified(&self) -> Option<&str> {
        match self {
            Version::Modified(date) => Some(date),
            Version::Snapshot { file, .. } => file.modified(),
            _ => None,
        }
    }

    pub fn generation(&self) -> Option<i64> {
        match self {
            Version::Generation(generation) => Some(*generation),
            _ => None,
        }
    }

    /// The provider snapshot the bytes are read from, if any.
    pub fn snapshot_id(&self) -> Option<&str> {
        match self {
            Version::Snapshot { id, .. } | Version::Frozen(id) => Some(id),
            _ => None,
        }
    }

    pub fn file(&self) -> Option<&FileIdentity> {
        match self {
            Version::File(identity) => Some(identity.as_ref()),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::ETag(etag) => write!(f, "etag {etag}"),
            Version::Generation(generation) => write!(f, "generation {generation}"),
            Version::Snapshot { id, file } => write!(f, "snapshot {id} ({file})"),
            Version::Frozen(id) => write!(f, "snapshot {id} (immutable)"),
            Version::File(id) => write!(
                f,
                "file dev {} inode {} size {} mtime {}.{:09} ctime {}.{:09}",
                id.dev, id.ino, id.size, id.mtime.0, id.mtime.1, id.ctime.0, id.ctime.1
            ),
            Version::Modified(date) => write!(f, "last-modified {date}"),
            Version::Size(size) => write!(f, "size {size}"),
            Version::Immutable => f.write_str("immutable"),
            Version::Unpinned => f.write_str("unpinned"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_strength() {
        let file = Version::File(Box::new(FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 0),
            ctime: (5, 0),
        }));
        let snapshot = Version::Snapshot {
            id: "snapshot-7".into(),
            file: Box::new(Version::Modified("Tue, 01 Dec 2026 10:00:00 GMT".into())),
        };
        for strong in [
            Version::ETag("\"abc\"".into()),
            Version::Generation(17),
            snapshot.clone(),
            Version::Frozen("snap-0123456789abcdef0".into()),
            file,
            Version::Immutable,
        ] {
            assert_eq!(strong.strength(), Strength::Strong, "{strong}");
            assert_eq!(strong.weakness(), None, "{strong}");
        }
        for (weak, strength) in [
            (
                Version::Modified("Tue, 01 Dec 2026 10:00:00 GMT".into()),
                Strength::Seconds,
            ),
            (Version::Size(1024), Strength::SizeOnly),
            (Version::Unpinned, Strength::None),
        ] {
            assert_eq!(weak.strength(), strength, "{weak}");
            assert!(weak.weakness().is_some(), "{weak}");
        }
        // A snapshot still sends and checks its file's validator.
        assert_eq!(snapshot.modified(), Some("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert_eq!(snapshot.etag(), None);
        assert_eq!(snapshot.snapshot_id(), Some("snapshot-7"));
        assert_eq!(
            Version::Frozen("snap-1".into()).snapshot_id(),
            Some("snap-1")
        );
        assert_eq!(Version::Immutable.snapshot_id(), None);
    }

    #[test]
    fn weak_and_empty_etags_are_no_pin() {
        assert_eq!(
            Version::from_etag(Some("\"0x8D\"")),
            Some(Version::ETag("\"0x8D\"".into()))
        );
        assert_eq!(Version::from_etag(Some("W/\"abc\"")), None);
        assert_eq!(Version::from_etag(Some("  ")), None);
        assert_eq!(Version::from_etag(None), None);
    }

    #[test]
    fn versions_differ_in_display_when_they_differ() {
        let a = Version::ETag("\"a\"".into());
        let b = Version::Generation(1);
        assert_ne!(a.to_string(), b.to_string());
        assert_eq!(b.to_string(), "generation 1");
    }
}

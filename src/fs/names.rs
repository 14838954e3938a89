//! Provider names → valid, unique, stable file names.
//!
//! A name is valid when it is not empty, not `.` or `..`, holds no `/` or
//! NUL, and fits in 255 bytes. Invalid characters are percent-escaped (`/` →
//! `%2F`), the dot names and the empty name are escaped whole, and a name
//! too long is cut at a character boundary and given a hash of the whole
//! name, so two long names that share a prefix stay apart. The result
//! depends on the name alone: the same inventory mounts the same way every
//! time. Clashes among siblings are settled by [`unique_name`].

use std::borrow::Cow;
use std::collections::BTreeMap;

pub const NAME_MAX: usize = 255;

pub fn valid_name(raw: &str) -> Cow<'_, str> {
    let mut name: Cow<'_, str> = match raw {
        "" => Cow::Borrowed("%00"),
        "." => Cow::Borrowed("%2E"),
        ".." => Cow::Borrowed("%2E%2E"),
        _ if raw.contains(['/', '\0']) => Cow::Owned(raw.replace('/', "%2F").replace('\0', "%00")),
        _ => Cow::Borrowed(raw),
    };
    if name.len() > NAME_MAX {
        let hash = format!("~{:016x}", fnv1a(raw.as_bytes()));
        let mut cut = NAME_MAX - hash.len();
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name = Cow::Owned(format!("{}{hash}", &name[..cut]));
    }
    name
}

/// `candidate`, or `candidate~N` for the smallest N ≥ 2 not yet taken.
pub fn unique_name<V>(taken: &BTreeMap<String, V>, candidate: &str) -> String {
    if !taken.contains_key(candidate) {
        return candidate.to_string();
    }
    (2u32..)
        .map(|n| {
            let suffix = format!("~{n}");
            let mut cut = candidate.len().min(NAME_MAX - suffix.len());
            while !candidate.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}{suffix}", &candidate[..cut])
        })
        .find(|name| !taken.contains_key(name))
        .expect("some suffix is free")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && name.len() <= NAME_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_become_valid() {
        for raw in ["", ".", "..", "a/b", "../../etc/passwd", "nul\0byte", "/"] {
            let name = valid_name(raw);
            assert!(is_valid(&name), "{raw:?} → {name:?}");
        }
        assert_eq!(valid_name("a/b"), "a%2Fb");
        assert_eq!(valid_name(".."), "%2E%2E");
        assert_eq!(valid_name("disk 0 (copy).vmdk"), "disk 0 (copy).vmdk");
    }

    #[test]
    fn long_names_are_cut_with_a_distinguishing_hash() {
        let a = format!("{}a", "x".repeat(300));
        let b = format!("{}b", "x".repeat(300));
        let (na, nb) = (valid_name(&a), valid_name(&b));
        assert!(na.len() <= NAME_MAX && nb.len() <= NAME_MAX);
        assert_ne!(na, nb);
        assert_eq!(valid_name(&a), na, "stable");
        let unicode = "é".repeat(200); // 400 bytes
        let cut = valid_name(&unicode);
        assert!(cut.len() <= NAME_MAX && is_valid(&cut));
    }

    #[test]
    fn clashes_get_numbered() {
        let mut taken = BTreeMap::new();
        taken.insert("a".to_string(), ());
        taken.insert("a~2".to_string(), ());
        assert_eq!(unique_name(&taken, "a"), "a~3");
        assert_eq!(unique_name(&taken, "b"), "b");
        let long = "y".repeat(NAME_MAX);
        taken.insert(long.clone(), ());
        let next = unique_name(&taken, &long);
        assert!(next.len() <= NAME_MAX && next.ends_with("~2"));
    }
}

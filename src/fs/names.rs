//! Provider names → valid, unique, stable file names.
//!
//! A name is valid when it is not empty, not `.` or `..`, holds no `/` or
//! NUL, and fits in 255 bytes. The mapping is one-to-one, so that two
//! provider names never land on one file name:
//!
//! - `%`, `/` and NUL are percent-escaped (`%25`, `%2F`, `%00`), and so are
//!   bytes that are not UTF-8 ([`valid_name_bytes`], `%80`…`%FF`);
//! - `.` and `..` become `%2E` and `%2E%2E`, the empty name `%`;
//! - a name too long is cut at a character boundary and ends in `%~` and a
//!   hash of the whole raw name.
//!
//! After escaping, every `%` is followed by two hex digits, so `%` alone and
//! `%~` can come from nothing else. The result depends on the name alone:
//! the same inventory mounts the same way every time. The rare clashes left
//! (a file and a directory of one name, a provider listing one name twice)
//! are settled by [`unique_name`], again by a hash rather than by order.

use std::borrow::Cow;
use std::fmt::Write;

pub const NAME_MAX: usize = 255;

/// Marks a name cut short or told apart by a hash; escaping never makes it.
const HASH_MARK: &str = "%~";
/// The empty name: a `%` that no escape can leave alone.
const EMPTY: &str = "%";

pub fn valid_name(raw: &str) -> Cow<'_, str> {
    match raw {
        "" => return Cow::Borrowed(EMPTY),
        "." => return Cow::Borrowed("%2E"),
        ".." => return Cow::Borrowed("%2E%2E"),
        _ => {}
    }
    let name = if raw.contains(['%', '/', '\0']) {
        let mut name = String::with_capacity(raw.len() + 8);
        escape_into(&mut name, raw);
        Cow::Owned(name)
    } else {
        Cow::Borrowed(raw)
    };
    shorten(name, raw.as_bytes())
}

/// [`valid_name`] for names that are bytes (local trees): each byte that
/// is not part of valid UTF-8 becomes `%XX`. For a UTF-8 name the result is
/// `valid_name`'s, so both kinds of name share one one-to-one mapping.
pub fn valid_name_bytes(raw: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(raw) {
        return valid_name(text);
    }
    let mut name = String::with_capacity(raw.len() * 3);
    for chunk in raw.utf8_chunks() {
        escape_into(&mut name, chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(name, "%{byte:02X}");
        }
    }
    shorten(Cow::Owned(name), raw)
}

fn escape_into(name: &mut String, raw: &str) {
    for c in raw.chars() {
        match c {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            '\0' => name.push_str("%00"),
            c => name.push(c),
        }
    }
}

/// `name`, or if it is too long, its start and a hash of all of `raw`,
/// so that two long names sharing a prefix stay apart.
fn shorten<'a>(name: Cow<'a, str>, raw: &[u8]) -> Cow<'a, str> {
    if name.len() <= NAME_MAX {
        return name;
    }
    Cow::Owned(with_hash(&name, &format!("{:016x}", fnv1a(raw))))
}

/// `name` cut so that `%~HASH` fits after it within [`NAME_MAX`].
fn with_hash(name: &str, hash: &str) -> String {
    let mut cut = name.len().min(NAME_MAX - HASH_MARK.len() - hash.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{HASH_MARK}{hash}", &name[..cut])
}

/// `candidate` if no sibling has it; else `candidate` marked with a hash of
/// `key`, which the caller makes from what tells this entry apart (its
/// kind, raw name, locator). The suffix depends on the entry alone, not on
/// how many siblings came before it, so a path stays the same whatever
/// else the directory holds; a second hash round only follows a collision
/// of the first.
pub fn unique_name(taken: impl Fn(&str) -> bool, candidate: &str, key: &[u8]) -> String {
    candidate_names(candidate, key)
        .find(|name| !taken(name))
        .expect("the candidates never end")
}

/// The names [`unique_name`] tries, in order: `candidate`, then it marked
/// with successive hash rounds of `key`. An entry already placed is found
/// again by walking the same names until one is its own or free.
pub fn candidate_names<'a>(candidate: &'a str, key: &'a [u8]) -> impl Iterator<Item = String> + 'a {
    let first = std::iter::once(candidate.to_string());
    let marked = (0u32..).map(move |round| {
        let hash = fnv1a_from(fnv1a(key), &round.to_le_bytes());
        // 32 bits are plenty to tell a few same-named siblings apart.
        with_hash(candidate, &format!("{:08x}", (hash ^ (hash >> 32)) as u32))
    });
    first.chain(marked)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: fixed for good, so names are the same with every build.
fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(FNV_OFFSET, bytes)
}

fn fnv1a_from(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &byte| {
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
    use proptest::prelude::*;

    /// Undoes the escaping of a name that was not cut short: the raw
    /// bytes. That it exists for every such name is what makes the
    /// mapping one-to-one.
    fn decode(name: &str) -> Option<Vec<u8>> {
        match name {
            EMPTY => return Some(Vec::new()),
            "%2E" => return Some(b".".to_vec()),
            "%2E%2E" => return Some(b"..".to_vec()),
            _ => {}
        }
        let bytes = name.as_bytes();
        let mut raw = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                // Only these are ever escaped; anything else is no escape of ours.
                if !(matches!(byte, b'%' | b'/' | 0) || byte >= 0x80)
                    || hex != hex.to_ascii_uppercase()
                {
                    return None;
                }
                raw.push(byte);
                i += 3;
            } else {
                raw.push(bytes[i]);
                i += 1;
            }
        }
        Some(raw)
    }

    fn is_shortened(name: &str) -> bool {
        name.contains(HASH_MARK)
    }

    #[test]
    fn invalid_names_become_valid() {
        for raw in [
            "",
            ".",
            "..",
            "a/b",
            "../../etc/passwd",
            "nul\0byte",
            "/",
            "%",
        ] {
            let name = valid_name(raw);
            assert!(is_valid(&name), "{raw:?} → {name:?}");
        }
        assert_eq!(valid_name("a/b"), "a%2Fb");
        assert_eq!(valid_name(".."), "%2E%2E");
        assert_eq!(valid_name(""), "%");
        assert_eq!(valid_name("\0"), "%00");
        assert_eq!(valid_name("disk 0 (copy).vmdk"), "disk 0 (copy).vmdk");
    }

    #[test]
    fn percent_is_escaped_so_escapes_and_their_text_stay_apart() {
        // Before, both were a%2Fb.
        assert_eq!(valid_name("a%2Fb"), "a%252Fb");
        assert_ne!(valid_name("a/b"), valid_name("a%2Fb"));
        assert_ne!(valid_name("\0"), valid_name("%00"));
        assert_ne!(valid_name(""), valid_name("%"));
        assert_ne!(valid_name(".."), valid_name("%2E%2E"));
        assert_eq!(valid_name("a+b%20c#?&=.raw"), "a+b%2520c#?&=.raw");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_escaped() {
        assert_eq!(valid_name_bytes(b"disk\xff.raw"), "disk%FF.raw");
        assert_eq!(valid_name_bytes(b"caf\xc3\xa9"), "café");
        assert_eq!(valid_name_bytes(b"a/\xc3(%"), "a%2F%C3(%25");
        assert_eq!(valid_name_bytes(b".."), "%2E%2E");
        // The escape of a byte and the text of that escape stay apart.
        assert_ne!(valid_name_bytes(b"\xff"), valid_name_bytes(b"%FF"));
    }

    #[test]
    fn long_names_are_cut_with_a_distinguishing_hash() {
        let a = format!("{}a", "x".repeat(300));
        let b = format!("{}b", "x".repeat(300));
        let (na, nb) = (valid_name(&a), valid_name(&b));
        assert!(na.len() <= NAME_MAX && nb.len() <= NAME_MAX);
        assert_ne!(na, nb);
        assert!(na.starts_with("xxx") && is_shortened(&na), "{na}");
        assert_eq!(valid_name(&a), na, "stable");
        let unicode = "é".repeat(200); // 400 bytes
        let cut = valid_name(&unicode);
        assert!(cut.len() <= NAME_MAX && is_valid(&cut));
        // Exactly 255 bytes is not cut.
        let full = "y".repeat(NAME_MAX);
        assert_eq!(valid_name(&full), full);
    }

    #[test]
    fn clash_suffixes_come_from_the_key_not_from_the_siblings() {
        let mut taken = std::collections::BTreeMap::new();
        taken.insert("a".to_string(), ());
        let first = unique_name(|name| taken.contains_key(name), "a", b"file\0a\0one");
        assert!(
            first.starts_with("a%~") && first.len() == "a%~".len() + 8,
            "{first}"
        );
        assert_eq!(
            unique_name(|name| taken.contains_key(name), "b", b"whatever"),
            "b"
        );
        // More siblings do not change it; another key gets another name.
        taken.insert("a~2".to_string(), ());
        taken.insert("a~3".to_string(), ());
        assert_eq!(
            unique_name(|name| taken.contains_key(name), "a", b"file\0a\0one"),
            first
        );
        assert_ne!(
            unique_name(|name| taken.contains_key(name), "a", b"file\0a\0two"),
            first
        );
        // A taken suffix (a hash collision) moves on to the next round.
        taken.insert(first.clone(), ());
        let second = unique_name(|name| taken.contains_key(name), "a", b"file\0a\0one");
        assert!(second != first && second.starts_with("a%~"), "{second}");
        // A name already at the limit is cut to make room.
        let long = "y".repeat(NAME_MAX);
        taken.insert(long.clone(), ());
        let next = unique_name(|name| taken.contains_key(name), &long, b"k");
        assert!(next.len() <= NAME_MAX && is_valid(&next), "{next}");
    }

    /// Strings rich in the characters that matter: escapes, their text,
    /// dots, multi-byte characters; long enough to be cut.
    fn tricky() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(
                prop_oneof![
                    Just('%'),
                    Just('/'),
                    Just('\0'),
                    Just('.'),
                    Just('~'),
                    Just('2'),
                    Just('5'),
                    Just('F'),
                    Just('0'),
                    Just('E'),
                    Just('é'),
                    Just('x'),
                ],
                0..12
            )
            .prop_map(|chars| chars.into_iter().collect()),
            ".{0,300}",
            "[x%/]{240,300}",
        ]
    }

    proptest! {
        #[test]
        fn every_name_maps_to_a_valid_stable_name(raw in tricky()) {
            let name = valid_name(&raw);
            prop_assert!(is_valid(&name), "{:?} → {:?}", raw, name);
            let again = raw.clone();
            prop_assert_eq!(&valid_name(&again), &name);
            prop_assert_eq!(&valid_name_bytes(raw.as_bytes()), &name);
        }

        #[test]
        fn the_mapping_is_one_to_one(raw in tricky()) {
            let name = valid_name(&raw);
            if is_shortened(&name) {
                // Only names too long to keep are cut (then a hash tells them apart).
                let escapes = raw.chars().filter(|c| matches!(c, '%' | '/' | '\0')).count();
                prop_assert!(raw.len() + 2 * escapes > NAME_MAX, "{:?} → {:?}", raw, name);
            } else {
                prop_assert_eq!(decode(&name), Some(raw.as_bytes().to_vec()));
            }
        }

        #[test]
        fn distinct_names_never_meet(a in tricky(), b in tricky()) {
            prop_assume!(a != b);
            prop_assert_ne!(valid_name(&a), valid_name(&b));
            // An escape and the text of it: the pair most likely to meet.
            let spelled = a.replace('%', "%25").replace('/', "%2F").replace('\0', "%00");
            if spelled != a {
                prop_assert_ne!(valid_name(&a), valid_name(&spelled));
            }
        }

        #[test]
        fn byte_names_map_to_valid_one_to_one_names(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let name = valid_name_bytes(&raw);
            prop_assert!(is_valid(&name), "{:?} → {:?}", raw, name);
            prop_assert_eq!(&valid_name_bytes(&raw), &name);
            if !is_shortened(&name) {
                prop_assert_eq!(decode(&name), Some(raw.clone()));
            }
        }
    }
}

//! `priority=PATTERN:WEIGHT,...`: the weight a reader gets in the fair
//! queue, chosen by the path of the file it opened.
//!
//! Paths are as seen in the mount, without the leading `/`
//! (`web-01/disk0.vmdk`). A pattern with a `/` is matched against the whole
//! path, `*` staying inside one component and `**` crossing them; a
//! pattern without one is matched against each component, so `db-*` picks
//! every disk of every VM whose name starts with `db-`. The first pattern
//! that matches wins; a file no pattern matches weighs 1.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

use super::MAX_WEIGHT;

#[derive(Debug, Clone)]
struct Rule {
    pattern: String,
    weight: u32,
    matcher: GlobMatcher,
    whole_path: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Priorities {
    rules: Vec<Rule>,
}

impl PartialEq for Priorities {
    fn eq(&self, other: &Self) -> bool {
        self.rules.len() == other.rules.len()
            && self
                .rules
                .iter()
                .zip(&other.rules)
                .all(|(a, b)| a.pattern == b.pattern && a.weight == b.weight)
    }
}

impl Eq for Priorities {}

impl Priorities {
    /// Adds `PATTERN:WEIGHT` rules separated by `,` or `;`.
    pub fn add_list(&mut self, text: &str) -> Result<(), String> {
        for item in text.split([',', ';']).map(str::trim) {
            if item.is_empty() {
                continue;
            }
            let (pattern, weight) = item
                .rsplit_once(':')
                .ok_or_else(|| format!("'{item}' is not PATTERN:WEIGHT"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .ok_or_else(|| {
                    format!("'{item}': the weight must be a whole number from 1 to {MAX_WEIGHT}")
                })?;
            let pattern = pattern.trim().trim_start_matches('/');
            if pattern.is_empty() {
                return Err(format!("'{item}': the pattern is empty"));
            }
            let matcher = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|err| format!("'{item}': {err}"))?
                .compile_matcher();
            self.rules.push(Rule {
                pattern: pattern.to_string(),
                weight,
                matcher,
                whole_path: pattern.contains('/'),
            });
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The weight of a reader of `path` (a path inside the mount).
    pub fn weight_for(&self, path: &str) -> u32 {
        let path = path.trim_start_matches('/');
        self.rules
            .iter()
            .find(|rule| {
                if rule.whole_path {
                    rule.matcher.is_match(path)
                } else {
                    path.split('/').any(|part| rule.matcher.is_match(part))
                }
            })
            .map_or(1, |rule| rule.weight)
    }
}

impl fmt::Display for Priorities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}", rule.pattern, rule.weight)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_and_unmatched_weigh_one() {
        let mut priorities = Priorities::default();
        priorities
            .add_list("db-*:4, web-01/*.vmdk:2; **/*-flat.vmdk:3")
            .unwrap();
        assert_eq!(priorities.weight_for("/db-02/disk0.vmdk"), 4);
        assert_eq!(priorities.weight_for("web-01/disk0.vmdk"), 2);
        assert_eq!(priorities.weight_for("web-02/disk0-flat.vmdk"), 3);
        assert_eq!(priorities.weight_for("web-02/disk0.vmdk"), 1);
        // `*` stays inside a component.
        assert_eq!(priorities.weight_for("web-01/sub/disk0.vmdk"), 1);
        assert_eq!(
            priorities.to_string(),
            "db-*:4,web-01/*.vmdk:2,**/*-flat.vmdk:3"
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, expected) in [
            ("db-*", "not PATTERN:WEIGHT"),
            ("db-*:0", "from 1 to 1000"),
            ("db-*:heavy", "from 1 to 1000"),
            (":3", "pattern is empty"),
            ("db-[:3", "db-[:3"),
        ] {
            let err = Priorities::default().add_list(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}

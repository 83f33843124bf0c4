//! File-name patterns and subject templates of `[[files.watch]]`, parsed once when the
//! configuration is validated and matched for every file (pure).

use std::path::Path;

/// A file-name pattern with `*` (any run of characters) and `?` (one character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(Vec<char>);

impl Glob {
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("an empty pattern matches nothing; remove it".into());
        }
        if pattern.contains('/') {
            return Err(format!(
                "{pattern:?}: patterns match file names, not paths (no '/')"
            ));
        }
        Ok(Self(pattern.chars().collect()))
    }

    pub(crate) fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        // Iterative wildcard matching with one backtracking point for the last `*`.
        let (p, n) = (&self.0, &name);
        let (mut pi, mut ni) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
                pi += 1;
                ni += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ni));
                pi += 1;
            } else if let Some((sp, sn)) = star {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// The parts of a subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Top,
    Dir,
    Path,
    Name,
    Watch,
}

/// A parsed `subject` setting, e.g. `"{top}"` or `"site-4/{top}/{name}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectTemplate(Vec<Part>);

impl SubjectTemplate {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{s:?}: a '{{' without its '}}'"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "top" => Part::Top,
                "dir" => Part::Dir,
                "path" => Part::Path,
                "name" => Part::Name,
                "watch" => Part::Watch,
                other => {
                    return Err(format!(
                        "{s:?}: unknown placeholder {{{other}}}; use {{top}}, {{dir}}, {{path}}, {{name}} or {{watch}}"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("is empty".into());
        }
        Ok(Self(parts))
    }

    /// The subject of the file at `rel` (relative to the watch's directory).
    pub(crate) fn render(&self, watch: &str, rel: &Path) -> String {
        let path = lossy(rel);
        let name = rel.file_name().map(lossy_os).unwrap_or_default();
        let dir = rel
            .parent()
            .map(lossy)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| watch.to_owned());
        let top = if rel.components().count() > 1 {
            rel.components()
                .next()
                .map(|c| lossy_os(c.as_os_str()))
                .unwrap_or_default()
        } else {
            watch.to_owned()
        };
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Top => out.push_str(&top),
                Part::Dir => out.push_str(&dir),
                Part::Path => out.push_str(&path),
                Part::Name => out.push_str(&name),
                Part::Watch => out.push_str(watch),
            }
        }
        out
    }
}

/// A path as text; bytes that are not UTF-8 become U+FFFD.
pub(crate) fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub(crate) fn lossy_os(s: &std::ffi::OsStr) -> String {
    s.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(g(".*").matches(".pureftpd-upload.5f3c1a2b.15.1b2a.3c4d"));
        assert!(!g(".*").matches("snap.jpg"));
        assert!(g("*.part").matches("clip.mp4.part"));
        assert!(!g("*.part").matches("clip.part.mp4"));
        assert!(g("snap_??.jpg").matches("snap_01.jpg"));
        assert!(!g("snap_??.jpg").matches("snap_1.jpg"));
        assert!(g("*a*b*").matches("xaxxbx"));
        assert!(!g("*a*b").matches("xaxxbx"));
        assert!(g("*").matches(""));
        assert!(g("ü*").matches("ünïcode"));
        assert!(Glob::new("").is_err());
        assert!(Glob::new("a/*").is_err());
    }

    #[test]
    fn subjects() {
        let t = |s: &str, rel: &str| {
            SubjectTemplate::parse(s)
                .unwrap()
                .render("cameras", Path::new(rel))
        };
        assert_eq!(t("{top}", "cam-3/2026-12-01/snap.jpg"), "cam-3");
        assert_eq!(t("{top}", "snap.jpg"), "cameras", "no folder: the watch");
        assert_eq!(t("{dir}", "cam-3/2026-12-01/snap.jpg"), "cam-3/2026-12-01");
        assert_eq!(t("{dir}", "snap.jpg"), "cameras");
        assert_eq!(t("site/{top}/{name}", "cam 1/ü.jpg"), "site/cam 1/ü.jpg");
        assert_eq!(t("{path}", "a/b.jpg"), "a/b.jpg");
        assert_eq!(t("{watch}", "a/b.jpg"), "cameras");
        assert!(SubjectTemplate::parse("{camera}").is_err());
        assert!(SubjectTemplate::parse("{top").is_err());
        assert!(SubjectTemplate::parse("").is_err());
    }
}

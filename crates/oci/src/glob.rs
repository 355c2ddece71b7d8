//! Glob patterns over image names (`*` matches any run of characters), for tag rules such
//! as "never resolve `*:latest` through peers".

/// A parsed glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A pattern; `*` is the only special character.
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        let parts: Vec<&str> = self.0.split('*').collect();
        if parts.len() == 1 {
            return self.0 == text;
        }
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if !text.starts_with(first)
            || !text[first.len()..].ends_with(last)
            || text.len() < first.len() + last.len()
        {
            return false;
        }
        let mut rest = &text[first.len()..text.len() - last.len()];
        for mid in &parts[1..parts.len() - 1] {
            match rest.find(mid) {
                Some(at) => rest = &rest[at + mid.len()..],
                None => return false,
            }
        }
        true
    }
}

/// Whether any of `globs` matches `text`.
pub fn any_match(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let latest = Glob::new("*:latest");
        assert!(latest.matches("docker.io/library/nginx:latest"));
        assert!(!latest.matches("docker.io/library/nginx:1.25"));
        assert!(!latest.matches("docker.io/library/latest:1"));
        assert!(Glob::new("ghcr.io/*/dev-*:*").matches("ghcr.io/org/dev-app:x"));
        assert!(!Glob::new("ghcr.io/*/dev-*:*").matches("quay.io/org/dev-app:x"));
        assert!(Glob::new("exact:1").matches("exact:1"));
        assert!(!Glob::new("exact:1").matches("exact:12"));
        assert!(Glob::new("*").matches(""));
        assert!(!Glob::new("a*a").matches("a"));
        assert!(any_match(&[Glob::new("x"), Glob::new("*:v*")], "r/a:v2"));
    }
}

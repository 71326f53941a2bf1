//! `--mirror FROM=TO`: URL prefix rewrites, for hosts that reach the internet through a copy.

use std::str::FromStr;

/// One `FROM=TO` URL prefix rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub from: String,
    pub to: String,
}

impl FromStr for Mirror {
    type Err = String;
    fn from_str(text: &str) -> Result<Mirror, String> {
        let (from, to) = text.split_once('=').ok_or_else(|| {
            format!(
                "mirror `{text}`: expected FROM=TO, e.g. \
                 `https://github.com/=https://mirror.example/github/`"
            )
        })?;
        let (from, to) = (from.trim(), to.trim());
        if from.is_empty() || to.is_empty() {
            return Err(format!(
                "mirror `{text}`: both FROM and TO must be non-empty URL prefixes"
            ));
        }
        if !(to.starts_with("http://") || to.starts_with("https://")) {
            return Err(format!(
                "mirror `{text}`: TO `{to}` is not an http(s) URL prefix"
            ));
        }
        Ok(Mirror {
            from: from.to_owned(),
            to: to.to_owned(),
        })
    }
}

/// URL prefix rewrites; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct Mirrors(pub Vec<Mirror>);

impl Mirrors {
    /// Where to fetch `url` from, when a mirror covers it.
    pub fn rewrite(&self, url: &str) -> Option<String> {
        self.0
            .iter()
            .filter(|m| url.starts_with(&m.from))
            .max_by_key(|m| m.from.len())
            .map(|m| format!("{}{}", m.to, &url[m.from.len()..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_rewrite_the_longest_prefix() {
        let mirrors = Mirrors(vec![
            "https://github.com/=http://m/gh/".parse().unwrap(),
            "https://github.com/cloud-hypervisor/=http://m/ch/"
                .parse()
                .unwrap(),
        ]);
        assert_eq!(
            mirrors.rewrite("https://github.com/cloud-hypervisor/linux/x"),
            Some("http://m/ch/linux/x".into())
        );
        assert_eq!(
            mirrors.rewrite("https://github.com/other/y"),
            Some("http://m/gh/other/y".into())
        );
        assert_eq!(mirrors.rewrite("https://example.org/z"), None);
        assert!("no-equals-sign".parse::<Mirror>().is_err());
        assert!("a=ftp://x".parse::<Mirror>().is_err());
    }
}

//! `user` from the config, resolved against the image's /etc/passwd and /etc/group the way
//! container runtimes do: `name`, `uid`, `name:group`, `uid:gid` (and the mixes).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: every group in /etc/group listing the user by name.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {name:?} (from `user` {spec:?}) is not in the image's {passwd}")]
    UnknownUser {
        spec: String,
        name: String,
        passwd: PathBuf,
    },
    #[error("group {name:?} (from `user` {spec:?}) is not in the image's {group}")]
    UnknownGroup {
        spec: String,
        name: String,
        group: PathBuf,
    },
    #[error("`user` {spec:?} is invalid: expected name, uid, name:group or uid:gid")]
    Invalid { spec: String },
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: fields[0],
            gid: fields[2].parse().ok()?,
            members: fields[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolve `spec` with the text of /etc/passwd and /etc/group (empty when the image has none).
pub fn resolve(
    spec: Option<&str>,
    passwd: &str,
    group: &str,
    files: (&Path, &Path),
) -> Result<Credentials, UserError> {
    let spec = spec.unwrap_or("").trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user_part.is_empty() && (group_part.is_some() || !spec.is_empty()) {
        return Err(UserError::Invalid {
            spec: spec.to_owned(),
        });
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = passwd_entries(passwd).find(|e| match user_part.parse::<u32>() {
        Ok(uid) => e.uid == uid,
        Err(_) => e.name == user_part,
    });
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home.to_owned()),
        // A numeric uid needs no passwd entry (runc: gid 0, home /).
        (None, Ok(uid)) => (uid, 0, None, "/".to_owned()),
        (None, Err(_)) => {
            return Err(UserError::UnknownUser {
                spec: spec.to_owned(),
                name: user_part.to_owned(),
                passwd: files.0.to_owned(),
            });
        }
    };

    if let Some(group_part) = group_part {
        if group_part.is_empty() {
            return Err(UserError::Invalid {
                spec: spec.to_owned(),
            });
        }
        gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|g| g.name == group_part)
                .map(|g| g.gid)
                .ok_or_else(|| UserError::UnknownGroup {
                    spec: spec.to_owned(),
                    name: group_part.to_owned(),
                    group: files.1.to_owned(),
                })?,
        };
    }

    let mut groups = vec![gid];
    if let Some(name) = name {
        for g in group_entries(group) {
            if g.members.contains(&name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                          # comment\n\
                          www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
                          app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
                         daemon:x:1:\n\
                         www-data:x:33:\n\
                         audio:x:29:app,www-data\n\
                         video:x:44:app\n\
                         app:x:1000:\n";

    fn files() -> (&'static Path, &'static Path) {
        (Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    fn resolve_ok(spec: Option<&str>) -> Credentials {
        resolve(spec, PASSWD, GROUP, files()).unwrap()
    }

    #[test]
    fn default_is_root() {
        let creds = resolve_ok(None);
        assert_eq!((creds.uid, creds.gid), (0, 0));
        assert_eq!(creds.home, "/root");
        assert_eq!(resolve_ok(Some("")), creds);
    }

    #[test]
    fn by_name_with_supplementary_groups() {
        let creds = resolve_ok(Some("app"));
        assert_eq!((creds.uid, creds.gid), (1000, 1000));
        assert_eq!(creds.groups, [1000, 29, 44]);
        assert_eq!(creds.home, "/home/app");
    }

    #[test]
    fn by_uid_known_and_unknown() {
        let creds = resolve_ok(Some("33"));
        assert_eq!((creds.uid, creds.gid), (33, 33));
        assert_eq!(creds.groups, [33, 29]);
        let creds = resolve_ok(Some("4242"));
        assert_eq!((creds.uid, creds.gid), (4242, 0));
        assert_eq!(creds.home, "/");
        assert_eq!(creds.groups, [0]);
    }

    #[test]
    fn with_group_by_name_or_gid() {
        let creds = resolve_ok(Some("app:video"));
        assert_eq!((creds.uid, creds.gid), (1000, 44));
        assert_eq!(creds.groups, [44, 29]);
        let creds = resolve_ok(Some("1000:5"));
        assert_eq!((creds.uid, creds.gid), (1000, 5));
        let creds = resolve_ok(Some("4242:4343"));
        assert_eq!((creds.uid, creds.gid), (4242, 4343));
    }

    #[test]
    fn errors_name_the_user_group_and_file() {
        let err = resolve(Some("nobody"), PASSWD, GROUP, files()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "user \"nobody\" (from `user` \"nobody\") is not in the image's /etc/passwd"
        );
        let err = resolve(Some("app:wheel"), PASSWD, GROUP, files()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "group \"wheel\" (from `user` \"app:wheel\") is not in the image's /etc/group"
        );
        assert!(matches!(
            resolve(Some(":1"), PASSWD, GROUP, files()),
            Err(UserError::Invalid { .. })
        ));
        assert!(matches!(
            resolve(Some("app:"), PASSWD, GROUP, files()),
            Err(UserError::Invalid { .. })
        ));
    }

    #[test]
    fn image_without_passwd() {
        let creds = resolve(Some("1000"), "", "", files()).unwrap();
        assert_eq!((creds.uid, creds.gid), (1000, 0));
        assert!(resolve(Some("app"), "", "", files()).is_err());
    }
}

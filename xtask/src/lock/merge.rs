//! Three-way merge of two edits of one lock: what lets two commands that read the same lock
//! both land their changes, and refuses (naming the entry) when they changed the same value.

use serde_json::{Map, Value};

/// Both sides changed the same value differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The JSON path, e.g. `kernels."ch-1".x86_64.sha256`.
    pub path: String,
    /// This side's value (`None`: removed).
    pub ours: Option<Value>,
    /// The other side's value (`None`: removed).
    pub theirs: Option<Value>,
}

/// Applies the edit `base → ours` to `theirs` (another edit of `base`). Objects merge key by
/// key; any other value (a string, a number, an array such as a module list) is replaced whole,
/// so a value both sides changed differently is a [`Conflict`], as is a key one side removed
/// and the other changed.
pub fn merge(base: &Value, ours: &Value, theirs: &Value) -> Result<Value, Conflict> {
    merge_at(&mut Vec::new(), Some(base), Some(ours), Some(theirs))
        .map(|merged| merged.expect("the document itself is never removed"))
}

fn merge_at(
    path: &mut Vec<String>,
    base: Option<&Value>,
    ours: Option<&Value>,
    theirs: Option<&Value>,
) -> Result<Option<Value>, Conflict> {
    if ours == theirs || ours == base {
        return Ok(theirs.cloned());
    }
    if theirs == base {
        return Ok(ours.cloned());
    }
    // Both changed it, differently: only objects can still combine, key by key.
    let empty = Map::new();
    let base = match base {
        None => Some(&empty),
        Some(Value::Object(map)) => Some(map),
        Some(_) => None,
    };
    let (Some(b), Some(Value::Object(o)), Some(Value::Object(t))) = (base, ours, theirs) else {
        return Err(Conflict {
            path: render(path),
            ours: ours.cloned(),
            theirs: theirs.cloned(),
        });
    };
    let mut keys: Vec<&String> = b.keys().chain(o.keys()).chain(t.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut merged = Map::new();
    for key in keys {
        path.push(key.clone());
        let value = merge_at(path, b.get(key), o.get(key), t.get(key))?;
        path.pop();
        if let Some(value) = value {
            merged.insert(key.clone(), value);
        }
    }
    Ok(Some(Value::Object(merged)))
}

/// `a.b."c-1".d`: keys that are not plain identifiers are quoted, as the lock's parse errors
/// name them.
fn render(path: &[String]) -> String {
    if path.is_empty() {
        return "(document)".to_owned();
    }
    path.iter()
        .map(|key| {
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                key.clone()
            } else {
                format!("{key:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn disjoint_edits_both_land() {
        let base = json!({"kernels": {"a": {"x86_64": {"sha256": "1"}}}, "defaults": "a"});
        // Ours records a size; theirs adds a version and makes it the default.
        let ours =
            json!({"kernels": {"a": {"x86_64": {"sha256": "1", "size": 5}}}, "defaults": "a"});
        let theirs = json!({
            "kernels": {"a": {"x86_64": {"sha256": "1"}}, "b": {"aarch64": {"sha256": "2"}}},
            "defaults": "b"
        });
        assert_eq!(
            merge(&base, &ours, &theirs).unwrap(),
            json!({
                "kernels": {
                    "a": {"x86_64": {"sha256": "1", "size": 5}},
                    "b": {"aarch64": {"sha256": "2"}}
                },
                "defaults": "b"
            })
        );
    }

    #[test]
    fn the_same_change_on_both_sides_is_no_conflict() {
        let base = json!({"k": {"v": 1}});
        let both = json!({"k": {"v": 2}, "new": {"x": 1}});
        assert_eq!(merge(&base, &both, &both).unwrap(), both);
        // Both adding the same new entry in different edits of other keys.
        let ours = json!({"k": {"v": 1}, "n": {"a": 1}, "o": 1});
        let theirs = json!({"k": {"v": 1}, "n": {"a": 1}, "t": 1});
        assert_eq!(
            merge(&base, &ours, &theirs).unwrap(),
            json!({"k": {"v": 1}, "n": {"a": 1}, "o": 1, "t": 1})
        );
    }

    #[test]
    fn a_value_changed_differently_on_both_sides_is_named() {
        let base = json!({"kernels": {"ch-1": {"x86_64": {"sha256": "1"}}}});
        let ours = json!({"kernels": {"ch-1": {"x86_64": {"sha256": "2"}}}});
        let theirs = json!({"kernels": {"ch-1": {"x86_64": {"sha256": "3"}}}});
        let conflict = merge(&base, &ours, &theirs).unwrap_err();
        assert_eq!(conflict.path, "kernels.\"ch-1\".x86_64.sha256");
        assert_eq!(conflict.ours, Some(json!("2")));
        assert_eq!(conflict.theirs, Some(json!("3")));
    }

    #[test]
    fn a_removal_against_a_change_is_a_conflict_and_lists_replace_whole() {
        let base = json!({"i": {"modules": ["a"]}, "gone": {"x": 1}});
        let ours = json!({"i": {"modules": ["a", "b"]}, "gone": {"x": 2}});
        let theirs = json!({"i": {"modules": ["a"]}});
        let conflict = merge(&base, &ours, &theirs).unwrap_err();
        assert_eq!((conflict.path.as_str(), conflict.theirs), ("gone", None));

        let theirs = json!({"i": {"modules": ["c"]}, "gone": {"x": 1}});
        let conflict = merge(&base, &ours, &theirs).unwrap_err();
        assert_eq!(
            conflict.path, "i.modules",
            "arrays are not merged element-wise"
        );

        // A removal nobody else touched goes through.
        let ours = json!({"i": {"modules": ["a"]}});
        let theirs = json!({"i": {"modules": ["z"]}, "gone": {"x": 1}});
        assert_eq!(
            merge(&base, &ours, &theirs).unwrap(),
            json!({"i": {"modules": ["z"]}})
        );
    }
}

//! The contract's rules for what a caller may name: device names, instance
//! ids and tags (Hypeman's own limits). The daemon applies them to every
//! request and to what its store loads; a client can check before it asks.

use std::collections::BTreeMap;

/// Why a name or instance id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A device name.
    #[error("invalid name {0:?}: use 2-63 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit")]
    Name(String),
    /// An instance id.
    #[error("invalid instance id {0:?}: use 1-128 characters from A-Z a-z 0-9 _ . : -, or k8s:<namespace>/<pod>")]
    InstanceId(String),
    /// Tags or a tag filter.
    #[error("invalid tags: {0}")]
    Tags(String),
}

/// A refused name or instance id is `InvalidName` or `InvalidArgument`.
impl From<ValidationError> for crate::Error {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Name(_) => crate::Error::InvalidName(e.to_string()),
            ValidationError::InstanceId(_) | ValidationError::Tags(_) => {
                crate::Error::InvalidArgument(e.to_string())
            }
        }
    }
}

/// Hypeman's limits on tags (its `lib/tags`): at most 50, keys of 1-128
/// characters, values of 0-256, both from `A-Z a-z 0-9`, space and `_ . : / = + @ -`.
pub const MAX_TAGS: usize = 50;
/// The longest tag key, in bytes.
pub const MAX_TAG_KEY: usize = 128;
/// The longest tag value, in bytes.
pub const MAX_TAG_VALUE: usize = 256;

fn tag_chars_ok(s: &str) -> bool {
    s.bytes().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b' ' | b'_' | b'.' | b':' | b'/' | b'=' | b'+' | b'@' | b'-'
            )
    })
}

/// Checks tags against Hypeman's rules.
pub fn validate_tags<'a>(
    tags: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), ValidationError> {
    let mut n = 0;
    for (k, v) in tags {
        n += 1;
        if n > MAX_TAGS {
            return Err(ValidationError::Tags(format!("more than {MAX_TAGS} tags")));
        }
        if k.is_empty() || k.len() > MAX_TAG_KEY || !tag_chars_ok(k) {
            return Err(ValidationError::Tags(format!(
                "key {:?}: use 1-{MAX_TAG_KEY} characters from A-Z a-z 0-9, space and _ . : / = + @ -",
                shorten(k)
            )));
        }
        if v.len() > MAX_TAG_VALUE || !tag_chars_ok(v) {
            return Err(ValidationError::Tags(format!(
                "value of {:?}: use 0-{MAX_TAG_VALUE} characters from A-Z a-z 0-9, space and _ . : / = + @ -",
                shorten(k)
            )));
        }
    }
    Ok(())
}

/// A tag filter within Hypeman's tag limits: at most [`MAX_TAGS`] pairs, keys
/// of at most [`MAX_TAG_KEY`] and values of at most [`MAX_TAG_VALUE`] bytes.
/// Larger filters could never match a stored device, so they are refused as
/// the mistakes (or the attacks) they are rather than searched for.
pub fn validate_filter(filter: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if filter.len() > MAX_TAGS {
        return Err(ValidationError::Tags(format!(
            "a tag filter has at most {MAX_TAGS} pairs, not {}",
            filter.len()
        )));
    }
    for (k, v) in filter {
        if k.len() > MAX_TAG_KEY || v.len() > MAX_TAG_VALUE {
            return Err(ValidationError::Tags(format!(
                "filter on {:?}: keys have at most {MAX_TAG_KEY} bytes and values at most {MAX_TAG_VALUE}",
                shorten(k)
            )));
        }
    }
    Ok(())
}

/// Keeps hostile input short in messages and logs.
pub fn shorten(s: &str) -> String {
    if s.chars().count() <= 64 {
        return s.to_string();
    }
    let mut out: String = s.chars().take(64).collect();
    out.push('…');
    out
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,62}$`
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let b = name.as_bytes();
    let ok = (2..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Name(shorten(name)))
    }
}

/// 1-128 of `[A-Za-z0-9_.:-]`.
pub fn validate_instance_id(id: &str) -> Result<(), ValidationError> {
    let ok = (1..=128).contains(&id.len())
        && id.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, b'_' | b'.' | b':' | b'-')
                || (c == b'/' && pod_form(id))
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::InstanceId(shorten(id)))
    }
}

/// The device plugin's instance ids, `k8s:<namespace>/<pod>`: the one form
/// that may hold a `/`, exactly one, between two non-empty parts, and never
/// next to `..`, so no instance id reads as a path.
fn pod_form(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("k8s:") else {
        return false;
    };
    let Some((ns, pod)) = rest.split_once('/') else {
        return false;
    };
    !ns.is_empty() && !pod.is_empty() && !pod.contains('/') && !id.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_table() {
        let good = [
            "l4-gpu",
            "ab",
            "GPU_0",
            "pci-0000-a2-00-0",
            "a.b-c_d",
            "0gpu",
            &"a".repeat(63),
        ];
        for n in good {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
        let long = "a".repeat(64);
        let bad = [
            "", "a", "-gpu", ".gpu", "_gpu", "gpu name", "gpu/0", "../x", "gpu\n", "gpü", &long,
            "a\0b", "x;y",
        ];
        for n in bad {
            assert!(validate_name(n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn instance_ids() {
        for ok in [
            "vm-1",
            "a",
            "inst:01.x_y",
            "k8s:default/vm-pod",
            &"z".repeat(128),
        ] {
            assert!(validate_instance_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "vm 1",
            "vm/1",
            "../../",
            "k8s:a/b/c",
            "k8s:/pod",
            "k8s:ns/",
            "k8s:../x",
            &"z".repeat(129),
            "vm\n",
        ] {
            assert!(validate_instance_id(bad).is_err(), "{bad:?}");
        }
    }

    /// *(issue 24)* A filter within the tag limits is searched, one past
    /// them is refused.
    #[test]
    fn filters_are_bounded_by_the_tag_limits() {
        let filter = |n: usize, key: usize, value: usize| -> BTreeMap<String, String> {
            (0..n)
                .map(|i| (format!("{i:0key$}"), "v".repeat(value)))
                .collect()
        };
        assert!(validate_filter(&filter(50, 128, 256)).is_ok());
        assert!(validate_filter(&filter(0, 1, 0)).is_ok());
        for bad in [filter(51, 3, 1), filter(1, 129, 1), filter(1, 3, 257)] {
            let e = validate_filter(&bad).unwrap_err().to_string();
            assert!(e.contains("at most"), "{e}");
        }
    }
}

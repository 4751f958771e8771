//! Allocation-free wildcard matching (`*` any run, `?` one character) of probe names and
//! symbol names.

/// Matches `provider:name` against `glob` without allocating.
pub fn glob_match(glob: &str, provider: &str, name: &str) -> bool {
    let (p, n) = (provider.as_bytes(), name.as_bytes());
    let at = |i: usize| match i.cmp(&p.len()) {
        core::cmp::Ordering::Less => p[i],
        core::cmp::Ordering::Equal => b':',
        core::cmp::Ordering::Greater => n[i - p.len() - 1],
    };
    wildcard(glob.as_bytes(), p.len() + 1 + n.len(), at)
}

/// Matches `text` against `glob` (`*` any run, `?` one byte).
pub fn glob_match_str(glob: &str, text: &str) -> bool {
    let t = text.as_bytes();
    wildcard(glob.as_bytes(), t.len(), |i| t[i])
}

/// Iterative wildcard matching with single-star backtracking: linear in practice, no
/// recursion, no allocation.
fn wildcard(g: &[u8], text_len: usize, at: impl Fn(usize) -> u8) -> bool {
    let (mut gi, mut ti) = (0usize, 0usize);
    let (mut star, mut mark) = (usize::MAX, 0usize);
    while ti < text_len {
        if gi < g.len() && (g[gi] == b'?' || g[gi] == at(ti)) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == b'*' {
            star = gi;
            mark = ti;
            gi += 1;
        } else if star != usize::MAX {
            gi = star + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == b'*' {
        gi += 1;
    }
    gi == g.len()
}

#[cfg(test)]
mod tests {
    use super::{glob_match, glob_match_str};

    #[test]
    fn globs() {
        assert!(glob_match("net:*", "net", "rx"));
        assert!(glob_match("*:rx", "net", "rx"));
        assert!(glob_match("n?t:r*", "net", "rx"));
        assert!(glob_match("*", "a", "b"));
        assert!(glob_match("net:rx", "net", "rx"));
        assert!(!glob_match("net:tx", "net", "rx"));
        assert!(!glob_match("net", "net", "rx"));
        assert!(!glob_match("disk:*", "net", "rx"));
        assert!(glob_match("*x", "net", "rx"));
        assert!(glob_match_str("__indirect_thunk_*", "__indirect_thunk_r11"));
        assert!(glob_match_str("__fentry__", "__fentry__"));
        assert!(!glob_match_str("__fentry__", "__fentry"));
    }
}

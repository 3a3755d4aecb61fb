//! Bounds on a config's size and nesting, checked before the YAML parser sees the text: libyaml
//! spends time quadratic in nesting depth (a 200 KB file of `[[[[…` took over 20 s), so a hostile
//! or broken file must be refused before parsing, not after.

/// Largest config accepted. The example config is 3 KB; a thousand backends fit in about 300 KB.
pub const MAX_BYTES: usize = 1 << 20;

/// Deepest nesting accepted (block indentation levels, `- ` items on one line and flow `[`/`{`
/// brackets all count). The deepest path in a real config (`backends.U[i].health_check.path`)
/// is 5; serde_yaml itself gives up at 128, but only after parsing everything.
pub const MAX_DEPTH: usize = 64;

/// Why text was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the config is {bytes} bytes; at most {MAX_BYTES} are accepted")]
    TooLarge { bytes: usize },
    #[error("line {line}: nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { line: usize },
}

/// Refuses text larger than `MAX_BYTES` or nested deeper than `MAX_DEPTH`, in one linear pass.
///
/// The depth is an upper bound of what the parser will see: quoted scalars and comments are
/// skipped, everything else that can open a level counts, so a valid config is never refused
/// for depth when its real nesting is below the limit.
pub fn check(text: &str) -> Result<(), LimitError> {
    if text.len() > MAX_BYTES {
        return Err(LimitError::TooLarge { bytes: text.len() });
    }
    // Indentation columns of the open block levels.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let too_deep = Err(LimitError::TooDeep { line: n + 1 });
        let body = line.trim_start_matches([' ', '\t']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if flow == 0 {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        // `- - - x` and `? ` open one level each on the same line.
        let mut rest = body;
        let mut inline = 0;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
            inline += 1;
            rest = r.trim_start_matches([' ', '\t']);
        }
        let (after, peak) = scan_flow(rest, flow);
        flow = after;
        if indents.len() + inline + peak > MAX_DEPTH {
            return too_deep;
        }
    }
    Ok(())
}

/// Flow depth after `line` starting at `depth`, and the deepest level reached within it (a
/// line's peak can exceed where it ends: `[[[[1]]]]`); quoted scalars and comments do not count.
fn scan_flow(line: &str, depth: usize) -> (usize, usize) {
    let (mut d, mut peak) = (depth, depth);
    walk(line, |c| match c {
        b'[' | b'{' => {
            d += 1;
            peak = peak.max(d);
        }
        b']' | b'}' => d = d.saturating_sub(1),
        _ => {}
    });
    (d, peak)
}

/// Calls `f` with each byte of `line` outside quoted scalars and comments.
fn walk(line: &str, mut f: impl FnMut(u8)) {
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(b'"') if c == b'\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if c == b'#' && (i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t') => return,
            None => f(c),
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_nesting_passes() {
        let text = "a:\n  b:\n    - c: [1, {d: [2]}]\n      e: \"[[[[\" # [[[[\n";
        assert_eq!(check(text), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_on_its_line() {
        let text = format!("a: 1\nb: {}1{}\n", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(check(&text), Err(LimitError::TooDeep { line: 2 }));
        let ok = format!("b: {}1{}\n", "[".repeat(MAX_DEPTH - 2), "]".repeat(MAX_DEPTH - 2));
        assert_eq!(check(&ok), Ok(()));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut text = String::new();
        for i in 0..=MAX_DEPTH {
            text.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(matches!(check(&text), Err(LimitError::TooDeep { .. })));
        let dashes = format!("{}x\n", "- ".repeat(MAX_DEPTH + 1));
        assert_eq!(check(&dashes), Err(LimitError::TooDeep { line: 1 }));
    }

    #[test]
    fn size_is_capped() {
        let text = "#".repeat(MAX_BYTES + 1);
        assert_eq!(check(&text), Err(LimitError::TooLarge { bytes: MAX_BYTES + 1 }));
    }
}

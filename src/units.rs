//! Human-readable units for reports. The library computes in base units; only reports
//! format, and they all format here.

/// FLOPs in the largest decimal unit that keeps at least one integer digit, with four
/// significant digits (`26.93 GFLOP`, `813 FLOP`).
pub fn flops(value: u64) -> String {
    scaled(
        value,
        1000.0,
        &["FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"],
    )
}

/// Bytes in binary units with four significant digits (`50.20 MiB`, `512 B`).
pub fn bytes(value: u64) -> String {
    scaled(
        value,
        1024.0,
        &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"],
    )
}

fn scaled(value: u64, base: f64, units: &[&str]) -> String {
    if value < base as u64 {
        return format!("{value} {}", units[0]);
    }
    let mut v = value as f64;
    let mut unit = 0;
    while v >= base && unit + 1 < units.len() {
        v /= base;
        unit += 1;
    }
    // Four significant digits, chosen for the value as it will print: rounding can carry
    // it into the next decade (99.996 → 100.0) or the next unit (1023.96 KiB → 1.000 MiB).
    let digits_for = |v: f64| match v {
        v if v >= 1000.0 => 0,
        v if v >= 100.0 => 1,
        v if v >= 10.0 => 2,
        _ => 3,
    };
    let rounded = |v: f64, digits: i32| (v * 10f64.powi(digits)).round() / 10f64.powi(digits);
    let mut digits = digits_for(rounded(v, digits_for(v)));
    if rounded(v, digits) >= base && unit + 1 < units.len() {
        v /= base;
        unit += 1;
        digits = digits_for(v);
    }
    format!("{v:.prec$} {}", units[unit], prec = digits as usize)
}

/// A relative difference as a percentage with enough digits to show small ones.
pub fn percent(rel: f64) -> String {
    if rel == 0.0 {
        "0%".into()
    } else if rel.is_infinite() {
        "inf".into()
    } else if rel >= 0.01 {
        let pct = rel * 100.0;
        // Below 100 % never reads as 100 % (a tolerance of 0.99999 is not one of 1): as
        // many more digits as it takes to read below it.
        (2..=17)
            .map(|digits| format!("{pct:.digits$}"))
            .find(|shown| rel >= 1.0 || shown.parse::<f64>().is_ok_and(|v| v < 100.0))
            .unwrap_or_else(|| format!("{pct}"))
            + "%"
    } else {
        format!("{:.2e}%", rel * 100.0)
    }
}

/// Text columns two spaces apart: `rows` of cells, the first row a header underlined
/// with dashes; column `c` is right-aligned when `right_aligned[c]`, else left-aligned.
pub fn table(rows: &[Vec<String>], right_aligned: &[bool]) -> String {
    let width = column_widths(rows);
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        push_row(&mut out, row, &width, right_aligned, i == 0);
    }
    out
}

/// The width of each column of a [`table`] of `rows`: its widest cell, in characters.
/// (A table too long to hold, such as a large sweep's, is measured row by row with this
/// and written row by row with [`push_row`].)
pub fn column_widths<R: AsRef<[String]>>(rows: impl IntoIterator<Item = R>) -> Vec<usize> {
    let mut width: Vec<usize> = Vec::new();
    for row in rows {
        for (c, cell) in row.as_ref().iter().enumerate() {
            let n = cell.chars().count();
            match width.get_mut(c) {
                Some(w) => *w = (*w).max(n),
                None => width.push(n),
            }
        }
    }
    width
}

/// Appends one line of a [`table`] whose columns are `width` wide (no padding at its
/// end), and after the header (`header`) the dashes under it.
pub fn push_row(
    out: &mut String,
    row: &[String],
    width: &[usize],
    right_aligned: &[bool],
    header: bool,
) {
    let start = out.len();
    for (c, cell) in row.iter().enumerate() {
        if c > 0 {
            out.push_str("  ");
        }
        let pad = width
            .get(c)
            .map_or(0, |w| w.saturating_sub(cell.chars().count()));
        if right_aligned.get(c).copied().unwrap_or(false) {
            out.extend(std::iter::repeat(' ').take(pad));
            out.push_str(cell);
        } else {
            out.push_str(cell);
            out.extend(std::iter::repeat(' ').take(pad));
        }
    }
    let kept = out[start..].trim_end().len();
    out.truncate(start + kept);
    out.push('\n');
    if header {
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&rule.join("  "));
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_readably() {
        assert_eq!(flops(999), "999 FLOP");
        assert_eq!(flops(26_927_431_680), "26.93 GFLOP");
        assert_eq!(flops(1_342_177_280), "1.342 GFLOP");
        assert_eq!(bytes(2560), "2.500 KiB");
        assert_eq!(bytes(52_592_640), "50.16 MiB");
        assert_eq!(bytes(u64::MAX), "16.00 EiB");
        // Four significant digits after rounding, never five.
        assert_eq!(bytes(104_857_599), "100.0 MiB");
        assert_eq!(bytes(1_048_575), "1.000 MiB");
        assert_eq!(bytes(1_023_000), "999.0 KiB");
        assert_eq!(bytes(1_040_000), "1016 KiB");
        assert_eq!(flops(999_960), "1.000 MFLOP");
        assert_eq!(flops(9_999_600), "10.00 MFLOP");
        assert_eq!(percent(0.0), "0%");
        assert_eq!(percent(0.05), "5.00%");
        assert_eq!(percent(0.000521), "5.21e-2%");
        // The boundaries of each prefix, and ratios that are not finite.
        assert_eq!(flops(1000), "1.000 kFLOP");
        assert_eq!(bytes(1024), "1.000 KiB");
        assert_eq!(bytes(1_024_000), "1000 KiB");
        assert_eq!(percent(0.01), "1.00%");
        // Just below 100 %: enough digits to read below it.
        assert_eq!(percent(0.99995), "99.995%");
        assert_eq!(percent(0.9999999999999999), "99.99999999999999%");
        assert_eq!(percent(0.9999), "99.99%");
        assert_eq!(percent(1.0), "100.00%");
        assert_eq!(percent(f64::INFINITY), "inf");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &[
                vec!["a".into(), "bb".into()],
                vec!["ccc".into(), "d".into()],
            ],
            &[false, true],
        );
        assert_eq!(t, "a    bb\n---  --\nccc   d\n");
        // Columns the alignment list does not reach are left-aligned, and no line ends
        // in padding.
        let rows = [
            vec!["ab".into(), "c".into()],
            vec!["d".into(), "eee".into()],
        ];
        for right in [&[false, false][..], &[]] {
            assert_eq!(table(&rows, right), "ab  c\n--  ---\nd   eee\n");
        }
    }
}

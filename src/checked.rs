//! Checked integer arithmetic: an overflow is an [`Error::Overflow`], never a wrapped number.

use crate::error::{Error, Result};

/// The product of `factors`, or an overflow error naming `what`.
pub fn product(what: &str, factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| Error::overflow(what))
}

/// The sum of `terms`, or an overflow error naming `what`.
pub fn sum(what: &str, terms: &[u64]) -> Result<u64> {
    terms
        .iter()
        .try_fold(0u64, |acc, &t| acc.checked_add(t))
        .ok_or_else(|| Error::overflow(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_and_sums_are_exact_or_errors() {
        assert_eq!(product("x", &[2, 3, 7]).unwrap(), 42);
        assert_eq!(product("x", &[]).unwrap(), 1);
        assert_eq!(sum("x", &[2, 3, 7]).unwrap(), 12);
        let err = product("attention core", &[u64::MAX, 2]).unwrap_err();
        assert!(err.to_string().contains("attention core"));
        assert!(sum("x", &[u64::MAX, 1]).is_err());
    }
}

//! Majority arithmetic, kept pure so it is trivially testable and reusable
//! (commit index, read confirmation, CheckQuorum).

/// Smallest number of members that forms a majority of `members`.
pub fn majority(members: usize) -> usize {
    members / 2 + 1
}

/// The largest value that at least a majority of `values` (one per member)
/// reach: the committed index when `values` are match indexes.
pub fn majority_value(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[majority(values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_sizes() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn majority_value_is_the_median_from_the_top() {
        assert_eq!(majority_value(&mut [5]), 5);
        assert_eq!(majority_value(&mut [5, 1, 3]), 3);
        assert_eq!(majority_value(&mut [5, 1]), 1);
        assert_eq!(majority_value(&mut [9, 2, 7, 7, 1]), 7);
        assert_eq!(majority_value(&mut []), 0);
    }
}

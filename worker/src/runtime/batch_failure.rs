//! Which failure of a pipelined batch to act on.
//!
//! The intake and the correlator issue a whole batch's statements at once in one transaction.
//! When one statement fails, every statement queued behind it fails too, with 25P02 ("current
//! transaction is aborted"), and which of them a caller sees first depends on polling order.
//! So both await every statement and keep the failure that says most: a refusal of one row's
//! data (the caller then isolates that row and dead-letters it), else any real failure, and a
//! 25P02 only when nothing else was seen.

use tokio_postgres::error::SqlState;

/// A failure of one statement of a pipelined batch.
pub trait BatchFailure {
    /// True when the database refused this row's data: retrying it can never succeed.
    fn is_row_refusal(&self) -> bool;

    /// True when the statement failed only because an earlier one of its transaction did
    /// (25P02): it says nothing about its own row.
    fn is_aborted_transaction(&self) -> bool;
}

/// True for 25P02 "current transaction is aborted".
pub fn is_aborted_transaction(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// Of two failures of one batch, the one that says most (see the module doc); on a tie the
/// one seen first.
pub fn most_telling<E: BatchFailure>(seen: Option<E>, new: E) -> E {
    let Some(seen) = seen else { return new };
    let rank = |e: &E| {
        if e.is_row_refusal() {
            2
        } else if e.is_aborted_transaction() {
            0
        } else {
            1
        }
    };
    if rank(&new) > rank(&seen) { new } else { seen }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Fake {
        Refused,
        Aborted,
        Lost,
    }

    impl BatchFailure for Fake {
        fn is_row_refusal(&self) -> bool {
            *self == Fake::Refused
        }
        fn is_aborted_transaction(&self) -> bool {
            *self == Fake::Aborted
        }
    }

    fn pick(seen: Vec<Fake>) -> Fake {
        seen.into_iter()
            .fold(None, |kept, e| Some(most_telling(kept, e)))
            .expect("at least one failure")
    }

    #[test]
    fn a_refusal_wins_whatever_came_before_it() {
        assert_eq!(
            pick(vec![Fake::Aborted, Fake::Lost, Fake::Refused]),
            Fake::Refused
        );
    }

    #[test]
    fn a_real_failure_wins_over_the_aborted_statements_behind_it() {
        assert_eq!(
            pick(vec![Fake::Aborted, Fake::Lost, Fake::Aborted]),
            Fake::Lost
        );
    }

    #[test]
    fn only_aborted_statements_give_an_aborted_statement() {
        assert_eq!(pick(vec![Fake::Aborted, Fake::Aborted]), Fake::Aborted);
    }
}

//! The one order in which every writer takes its locks on people's rows.
//!
//! Several kinds of transaction write many people's rows at once: the intake's batches, the
//! dispatcher's call-start marks, endings and requeues, the correlator's batches of replies,
//! each pipelined on one connection and run by several loops and replicas at the same time.
//! Two of them that lock the same two rows in opposite orders deadlock, and PostgreSQL only
//! breaks that after `deadlock_timeout` (1 s by default), failing one of them: a one-second
//! stall of a whole group, then its retry. The process benchmark showed it at the design
//! load (a reply linked while its send's ending was committed). So every one of them issues
//! its statements person by person in this order: by `login_id`, then page (the call-start
//! marks' advisory locks are per `login_id`, so the `login_id` comes first).

use std::cmp::Ordering;

/// Compares two people as (`login_id`, `page_id`): the lock order.
pub fn cmp_people(a: (&str, &str), b: (&str, &str)) -> Ordering {
    a.cmp(&b)
}

/// The positions of `items` in lock order; `person` gives an item's (`login_id`, `page_id`).
/// Stable: items of one person keep their order (a redelivery after its original).
pub fn positions<T>(items: &[T], person: impl Fn(&T) -> (&str, &str)) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| cmp_people(person(&items[a]), person(&items[b])));
    order
}

/// Puts results computed in `order` (as from [`positions`]) back in the items' own order.
pub fn scatter<R: Default + Clone>(order: &[usize], results: Vec<R>) -> Vec<R> {
    let mut out = vec![R::default(); order.len()];
    for (&position, r) in order.iter().zip(results) {
        out[position] = r;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_login_id_then_page_and_keeps_one_persons_items_in_order() {
        let items = [
            ("L2", "P1", 0),
            ("L1", "P2", 1),
            ("L1", "P1", 2),
            ("L2", "P1", 3),
        ];
        let order = positions(&items, |i| (i.0, i.1));
        assert_eq!(order, [2, 1, 0, 3]);
        let results: Vec<usize> = order.iter().map(|&p| items[p].2 * 10).collect();
        assert_eq!(scatter(&order, results), [0, 10, 20, 30]);
    }
}

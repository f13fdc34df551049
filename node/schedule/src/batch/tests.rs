use super::*;

fn decode(id: u64, pos: u32) -> Work {
    Work {
        seq: SeqRows {
            request_id: id,
            position: pos,
            rows: 1,
            sample: true,
            draft: 0,
        },
        rows: Rows::Tokens(vec![id as u32]),
        proposals: Vec::new(),
    }
}

fn prompt(id: u64, n: u32) -> Work {
    Work {
        seq: SeqRows {
            request_id: id,
            position: 0,
            rows: n,
            sample: true,
            draft: 0,
        },
        rows: Rows::Tokens((0..n).collect()),
        proposals: Vec::new(),
    }
}

fn ids(batch: &[Work]) -> Vec<(u64, u32, u32, bool)> {
    batch
        .iter()
        .map(|w| (w.seq.request_id, w.seq.position, w.seq.rows, w.seq.sample))
        .collect()
}

#[test]
fn decode_steps_run_together_before_prompts() {
    let now = Instant::now();
    let mut b = Batcher::default();
    b.push(prompt(1, 40), now);
    b.push(decode(2, 7), now);
    b.push(decode(3, 9), now);
    assert_eq!(b.next(now), Next::Run);
    let batch = b.next_batch(64, false, now);
    assert_eq!(
        ids(&batch),
        vec![(1, 0, 40, true), (2, 7, 1, true), (3, 9, 1, true)],
        "queue order kept inside the batch"
    );
    assert!(b.is_empty());
    assert_eq!(b.next(now), Next::Idle);
}

#[test]
fn one_chunk_per_sequence_per_pass() {
    let now = Instant::now();
    let mut b = Batcher::default();
    b.push(prompt(1, 10), now);
    let mut second = prompt(1, 5);
    second.seq.position = 10;
    b.push(second, now);
    assert_eq!(ids(&b.next_batch(64, false, now)), vec![(1, 0, 10, true)]);
    assert_eq!(ids(&b.next_batch(64, false, now)), vec![(1, 10, 5, true)]);
}

#[test]
fn long_prompts_are_cut_without_changing_their_kernel() {
    let now = Instant::now();
    let mut b = Batcher::default();
    b.push(prompt(1, 512), now);
    b.push(decode(2, 3), now);
    let first = b.next_batch(64, false, now);
    // One decode row, then 255 rows of the prompt; the rest waits.
    assert_eq!(ids(&first), vec![(1, 0, 255, false), (2, 3, 1, true)]);
    let Rows::Tokens(t) = &first[0].rows else {
        panic!()
    };
    assert_eq!(t, &(0..255).collect::<Vec<u32>>());
    let second = b.next_batch(64, false, now);
    // 257 left: a 256-row piece would leave one row for the short kernel.
    assert_eq!(ids(&second), vec![(1, 255, 193, false)]);
    assert_eq!(ids(&b.next_batch(64, false, now)), vec![(1, 448, 64, true)]);
    // Every piece of a ≥64-row chunk is ≥64 rows, short chunks split freely.
    for rows in [1usize, 10, 63, 64, 65, 127, 128, 200, 300, 1000] {
        for room in [1usize, 10, 63, 64, 100, 256] {
            match piece(rows, room) {
                Some(p) => {
                    assert!(p <= room && p <= rows);
                    if rows >= TILED_ROWS_MIN && p < rows {
                        assert!(p >= TILED_ROWS_MIN && rows - p >= TILED_ROWS_MIN);
                    }
                }
                None => assert!(rows > room),
            }
        }
    }
}

#[test]
fn hidden_rows_are_cut_with_their_values() {
    let now = Instant::now();
    let mut b = Batcher::default();
    let dim = 3;
    let w = Work {
        seq: SeqRows {
            request_id: 9,
            position: 4,
            rows: 300,
            sample: true,
            draft: 0,
        },
        rows: Rows::Hidden((0..300 * dim).map(|v| v as f32).collect()),
        proposals: Vec::new(),
    };
    b.push(w, now);
    let first = b.next_batch(64, false, now);
    assert_eq!(ids(&first), vec![(9, 4, 236, false)]);
    let Rows::Hidden(h) = &first[0].rows else {
        panic!()
    };
    assert_eq!(h.len(), 236 * dim);
    let rest = b.next_batch(64, false, now);
    assert_eq!(ids(&rest), vec![(9, 240, 64, true)]);
    let Rows::Hidden(h) = &rest[0].rows else {
        panic!()
    };
    assert_eq!(h[0], (236 * dim) as f32);
}

#[test]
fn micro_batches_cap_the_sequences_per_pass() {
    let now = Instant::now();
    let mut b = Batcher::default();
    for id in 1..=4 {
        b.push(decode(id, 5), now);
    }
    assert_eq!(b.next_batch(2, false, now).len(), 2);
    assert_eq!(b.next_batch(2, false, now).len(), 2);
    assert!(b.is_empty());
}

#[test]
fn a_group_waits_briefly_for_its_stragglers() {
    let t0 = Instant::now();
    let mut b = Batcher::default();
    for id in 1..=3 {
        b.push(decode(id, 5), t0);
    }
    assert_eq!(b.next_batch(64, true, t0).len(), 3);
    // Request 1's next token is back; 2 and 3 are on their way.
    let t1 = t0 + Duration::from_millis(10);
    b.push(decode(1, 6), t1);
    assert_eq!(b.next(t1), Next::WaitUntil(t1 + REGROUP_WAIT));
    assert!(b.next_batch(64, true, t1).is_empty());
    b.push(decode(2, 6), t1);
    assert_eq!(b.next(t1), Next::WaitUntil(t1 + REGROUP_WAIT));
    // 3 finished (its origin cancels it): the group is whole.
    b.cancel(3);
    assert_eq!(b.next(t1), Next::Run);
    assert_eq!(ids(&b.next_batch(64, true, t1)).len(), 2);
    // A straggler that never comes is not waited for past the deadline.
    b.push(decode(1, 7), t1);
    let late = t1 + REGROUP_WAIT;
    assert_eq!(b.next(late), Next::Run);
    assert_eq!(ids(&b.next_batch(64, true, late)), vec![(1, 7, 1, true)]);
}

#[test]
fn a_new_request_is_not_held_by_other_groups() {
    let t0 = Instant::now();
    let mut b = Batcher::default();
    b.push(decode(1, 5), t0);
    b.push(decode(2, 5), t0);
    b.next_batch(64, true, t0);
    b.push(decode(1, 6), t0);
    b.push(prompt(7, 20), t0);
    assert_eq!(b.next(t0), Next::Run);
    assert_eq!(ids(&b.next_batch(64, true, t0)), vec![(7, 0, 20, true)]);
}

#[test]
fn tokens_and_hidden_rows_never_share_a_pass() {
    let now = Instant::now();
    let mut b = Batcher::default();
    b.push(decode(1, 5), now);
    b.push(
        Work {
            seq: SeqRows {
                request_id: 2,
                position: 0,
                rows: 1,
                sample: true,
                draft: 0,
            },
            rows: Rows::Hidden(vec![0.0; 4]),
            proposals: Vec::new(),
        },
        now,
    );
    assert_eq!(b.next_batch(64, false, now).len(), 1);
    assert_eq!(b.next_batch(64, false, now).len(), 1);
}

#[test]
fn a_lone_request_waits_to_merge_with_a_group_on_its_way() {
    let t0 = Instant::now();
    let mut b = Batcher::default();
    // Request 1 started alone; 2, 3 and 4 came after: they wait for 1 a
    // moment, then run as a group.
    b.push(decode(1, 5), t0);
    assert_eq!(b.next_batch(64, true, t0).len(), 1);
    for id in 2..=4 {
        b.push(decode(id, 5), t0);
    }
    assert_eq!(b.next(t0), Next::WaitUntil(t0 + REGROUP_WAIT));
    assert_eq!(b.next(t0 + REGROUP_WAIT), Next::Run);
    assert_eq!(b.next_batch(64, true, t0 + REGROUP_WAIT).len(), 3);
    // 1's next token came back while the stage ran 2-4; the pass ends.
    let t1 = t0 + Duration::from_millis(10);
    b.push(decode(1, 6), t0 + Duration::from_millis(5));
    b.finished(t1);
    assert_eq!(b.next(t1), Next::WaitUntil(t1 + REGROUP_WAIT));
    for id in 2..=4 {
        b.push(decode(id, 6), t1);
    }
    assert_eq!(b.next(t1), Next::Run);
    assert_eq!(b.next_batch(64, true, t1).len(), 4, "merged");
    let t2 = t1 + Duration::from_millis(10);
    b.push(decode(1, 7), t2);
    b.push(decode(2, 7), t2);
    b.finished(t2);
    assert_eq!(
        b.next(t2),
        Next::WaitUntil(t2 + REGROUP_WAIT),
        "1, 2 wait for 3, 4"
    );
    // With a micro-batch cap that has no room for both, no wait.
    let mut c = Batcher::default();
    c.push(decode(1, 5), t0);
    c.push(decode(2, 5), t0);
    c.next_batch(1, true, t0);
    c.push(decode(1, 6), t1);
    c.finished(t1);
    assert_eq!(c.next(t1), Next::Run, "cap 1: 1 and 2 never share a pass");
}

#[test]
fn a_pass_that_runs_anyway_takes_merging_decode_steps() {
    let t0 = Instant::now();
    let mut b = Batcher::default();
    b.push(decode(1, 5), t0);
    b.push(decode(2, 5), t0);
    b.next_batch(64, true, t0);
    // 3 decodes alone while 1 and 2 are on their way; a prompt arrives.
    b.push(decode(3, 9), t0);
    assert_eq!(b.next(t0), Next::WaitUntil(t0 + REGROUP_WAIT));
    b.push(prompt(4, 30), t0);
    assert_eq!(b.next(t0), Next::Run);
    assert_eq!(
        ids(&b.next_batch(64, true, t0)),
        vec![(3, 9, 1, true), (4, 0, 30, true)]
    );
    // A group that never comes back stops taxing others after GROUP_STALE.
    let late = t0 + GROUP_STALE;
    b.cancel(4);
    b.push(decode(3, 10), late);
    b.finished(late);
    assert_eq!(b.next(late), Next::Run);
}

#[test]
fn a_replayed_sequence_runs_its_chunks_in_order() {
    // A replay queues the prompt, then the tokens generated before it:
    // the one-row chunk must not jump ahead of its own prompt.
    let now = Instant::now();
    let mut b = Batcher::default();
    b.push(prompt(1, 13), now);
    b.push(decode(1, 13), now);
    b.push(decode(2, 5), now);
    let first = b.next_batch(64, false, now);
    assert_eq!(ids(&first), vec![(1, 0, 13, true), (2, 5, 1, true)]);
    b.finished(now);
    let second = b.next_batch(64, false, now);
    assert_eq!(ids(&second), vec![(1, 13, 1, true)]);
}

-- Version 2: integer ids for terminals, a row per terminal incarnation (sources) with its kept
-- summary, gaps kept, batches and records keyed by source, kept day totals and counter forks.
-- The version-1 rows are carried over: sources from the (terminal, incarnation) pairs, gaps by
-- one window query, day totals from the records, forks by version 1's counter_forks query;
-- actions and meta (the receiver's signing key) are kept as they are. Times stay ISO 8601 text
-- in UTC ("2026-11-22T16:00:00Z"); a record time written with another offset is rewritten so.
ALTER TABLE terminals RENAME TO terminals_v1;
ALTER TABLE batches RENAME TO batches_v1;
ALTER TABLE records RENAME TO records_v1;
DROP INDEX records_card;
CREATE TABLE terminals (
    id INTEGER PRIMARY KEY,
    terminal_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    enrolled_utc TEXT NOT NULL);
INSERT INTO terminals (terminal_id, public_key, enrolled_utc)
    SELECT terminal_id, public_key, enrolled_utc FROM terminals_v1
    ORDER BY enrolled_utc, terminal_id;
CREATE TABLE sources (
    id INTEGER PRIMARY KEY,
    terminal INTEGER NOT NULL REFERENCES terminals (id),
    incarnation TEXT NOT NULL,
    last_batch INTEGER NOT NULL DEFAULT 0,
    last_hash TEXT NOT NULL,
    records INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    UNIQUE (terminal, incarnation));
-- a pair whose terminal is not enrolled has no terminal id: NOT NULL stops the migration
INSERT INTO sources (terminal, incarnation, last_batch, last_hash, records, last_seq, duplicates)
    SELECT (SELECT t.id FROM terminals t WHERE t.terminal_id = p.terminal_id), p.incarnation,
        coalesce((SELECT max(b.number) FROM batches_v1 b
                  WHERE b.terminal_id = p.terminal_id AND b.incarnation = p.incarnation), 0),
        coalesce((SELECT b.hash FROM batches_v1 b
                  WHERE b.terminal_id = p.terminal_id AND b.incarnation = p.incarnation
                  ORDER BY b.number DESC LIMIT 1),
                 '0000000000000000000000000000000000000000000000000000000000000000'),
        (SELECT count(DISTINCT r.seq) FROM records_v1 r
         WHERE r.terminal_id = p.terminal_id AND r.incarnation = p.incarnation),
        coalesce((SELECT max(r.seq) FROM records_v1 r
                  WHERE r.terminal_id = p.terminal_id AND r.incarnation = p.incarnation), 0),
        coalesce((SELECT sum(b.duplicates) FROM batches_v1 b
                  WHERE b.terminal_id = p.terminal_id AND b.incarnation = p.incarnation), 0)
    FROM (SELECT terminal_id, incarnation FROM batches_v1
          UNION SELECT terminal_id, incarnation FROM records_v1) p
    ORDER BY p.terminal_id, p.incarnation;
CREATE TABLE gaps (
    source INTEGER NOT NULL REFERENCES sources (id),
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (source, first_seq));
CREATE TABLE batches (
    source INTEGER NOT NULL REFERENCES sources (id),
    number INTEGER NOT NULL,
    hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    items INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    received_utc TEXT NOT NULL,
    PRIMARY KEY (source, number));
INSERT INTO batches (source, number, hash, prev_hash, items, duplicates, received_utc)
    SELECT s.id, b.number, b.hash, b.prev_hash, b.items, b.duplicates, b.received_utc
    FROM batches_v1 b JOIN terminals t ON t.terminal_id = b.terminal_id
    JOIN sources s ON s.terminal = t.id AND s.incarnation = b.incarnation;
CREATE TABLE records (
    source INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    batch_number INTEGER NOT NULL,
    card_number INTEGER NOT NULL,
    counter_before INTEGER NOT NULL,
    counter_after INTEGER NOT NULL,
    type TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    balance_before_cents INTEGER NOT NULL,
    balance_after_cents INTEGER NOT NULL,
    at_utc TEXT NOT NULL,
    hash TEXT NOT NULL,
    observed INTEGER NOT NULL DEFAULT 0,
    reconciled INTEGER NOT NULL DEFAULT 0,
    not_shown INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, seq, state, at_utc));
INSERT INTO records (source, seq, state, batch_number, card_number, counter_before,
                     counter_after, type, amount_cents, balance_before_cents,
                     balance_after_cents, at_utc, hash, observed, reconciled, not_shown)
    SELECT s.id, r.seq, r.state, r.batch_number, r.card_number, r.counter_before,
        r.counter_after, r.type, r.amount_cents, r.balance_before_cents,
        r.balance_after_cents,
        CASE WHEN r.at_utc GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
                  OR r.at_utc GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'
             THEN r.at_utc
             ELSE coalesce(strftime('%Y-%m-%dT%H:%M:%S', r.at_utc)
                           || CASE WHEN substr(strftime('%f', r.at_utc), 4) = '000' THEN ''
                                   ELSE '.' || substr(strftime('%f', r.at_utc), 4) || '000' END
                           || 'Z', r.at_utc) END,
        r.hash, r.observed, r.reconciled, r.not_shown
    FROM records_v1 r JOIN terminals t ON t.terminal_id = r.terminal_id
    JOIN sources s ON s.terminal = t.id AND s.incarnation = r.incarnation;
-- the card's history by counter, outside the day partitions: one row per record that changed
-- a card (not a derived row; not a terminal's clock record, card 0), so the receiver's
-- same-change, reconcile and fork checks are one index probe per (card, counter) pair
CREATE TABLE card_writes (
    card_number INTEGER NOT NULL,
    counter_before INTEGER NOT NULL,
    source INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at_utc TEXT NOT NULL,
    PRIMARY KEY (card_number, counter_before, source, seq));
INSERT INTO card_writes (card_number, counter_before, source, seq, at_utc)
    SELECT DISTINCT card_number, counter_before, source, seq, at_utc FROM records
    WHERE type != 'clock_reset' AND reconciled != 2;
CREATE INDEX card_writes_at ON card_writes (at_utc);
CREATE INDEX records_open ON records (source, seq) WHERE state IN ('unresolved', 'in_doubt');
-- the runs of sequence numbers missing below each source's highest, counted from 1
INSERT INTO gaps (source, first_seq, last_seq)
    SELECT source, previous + 1, seq - 1 FROM (
        SELECT source, seq, coalesce(lag(seq) OVER (PARTITION BY source ORDER BY seq), 0)
            AS previous
        FROM (SELECT DISTINCT source, seq FROM records) distinct_seqs) stepped
    WHERE seq > previous + 1;
CREATE TABLE day_totals (
    day TEXT NOT NULL,
    source INTEGER NOT NULL,
    state TEXT NOT NULL,
    type TEXT NOT NULL,
    count INTEGER NOT NULL,
    amount_cents INTEGER NOT NULL,
    PRIMARY KEY (day, source, state, type));
INSERT INTO day_totals (day, source, state, type, count, amount_cents)
    SELECT coalesce(date(at_utc), substr(at_utc, 1, 10)), source, state, type, count(*),
        sum(amount_cents)
    FROM records GROUP BY 1, source, state, type;
CREATE TABLE forks (
    card_number INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    writes INTEGER NOT NULL,
    found_utc TEXT NOT NULL,
    PRIMARY KEY (card_number, counter));
-- version 1's counter_forks: writes (one source, one time) that spent the same card counter,
-- committed or sent in doubt with a result that may have been shown; found when the second of
-- them was received
INSERT INTO forks (card_number, counter, writes, found_utc)
    SELECT card_number, counter_before, count(*),
        coalesce(max(CASE WHEN nth = 2 THEN seen END), max(seen),
                 strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    FROM (SELECT card_number, counter_before, seen,
              row_number() OVER (PARTITION BY card_number, counter_before
                                 ORDER BY seen, source, at_utc) AS nth
          FROM (SELECT r.card_number, r.counter_before, r.source, r.at_utc,
                    min(b.received_utc) AS seen
                FROM records r LEFT JOIN batches b
                    ON b.source = r.source AND b.number = r.batch_number
                WHERE (r.state = 'committed' OR (r.state = 'in_doubt' AND r.not_shown = 0))
                    AND r.type != 'clock_reset'
                GROUP BY r.card_number, r.counter_before, r.source, r.at_utc) writes) ranked
    GROUP BY card_number, counter_before HAVING count(*) > 1;
DROP TABLE records_v1;
DROP TABLE batches_v1;
DROP TABLE terminals_v1;

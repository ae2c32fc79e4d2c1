-- Version 4 (the web console at /console): operator accounts (Argon2id password hashes, a role:
-- admin changes the action list, viewer only reads), the audit of every change made through the
-- console (sign-ins refused and accepted, list entries added and removed, with the operator and
-- the reason), an index on a batch's records (the console's batch page reads them by key, never
-- by scanning the records) and one on the batches' receipt times (its list, newest first). The
-- session cookies' signing secret is a row of meta.
CREATE TABLE operators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_utc TEXT NOT NULL);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_utc TEXT NOT NULL,
    operator TEXT NOT NULL,
    action TEXT NOT NULL,
    card_number INTEGER,
    detail TEXT NOT NULL);
CREATE INDEX audit_card ON audit (card_number, id);
CREATE INDEX audit_operator ON audit (operator, action, at_utc);
CREATE INDEX records_batch ON records (source, batch_number);
CREATE INDEX batches_received ON batches (received_utc);

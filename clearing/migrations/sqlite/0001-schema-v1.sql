-- Version 1: the schema farebox created before migrations (clearing/store.py's SCHEMA, with the
-- not_shown column it added at open). A database made by that code, without this tool's
-- bookkeeping, is recognised as at this version (farebox.clearing.migrate).
CREATE TABLE IF NOT EXISTS terminals (
    terminal_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    enrolled_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    terminal_id TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    number BIGINT NOT NULL,
    hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    items BIGINT NOT NULL,
    duplicates BIGINT NOT NULL,
    received_utc TEXT NOT NULL,
    PRIMARY KEY (terminal_id, incarnation, number));
CREATE TABLE IF NOT EXISTS records (
    terminal_id TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    seq BIGINT NOT NULL,
    state TEXT NOT NULL,
    batch_number BIGINT NOT NULL,
    card_number BIGINT NOT NULL,
    counter_before BIGINT NOT NULL,
    counter_after BIGINT NOT NULL,
    type TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    balance_before_cents BIGINT NOT NULL,
    balance_after_cents BIGINT NOT NULL,
    at_utc TEXT NOT NULL,
    hash TEXT NOT NULL,
    observed BIGINT NOT NULL,
    reconciled BIGINT NOT NULL DEFAULT 0,
    not_shown BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (terminal_id, incarnation, seq, state));
CREATE INDEX IF NOT EXISTS records_card ON records (card_number, counter_before);
CREATE TABLE IF NOT EXISTS actions (
    card_number BIGINT PRIMARY KEY,
    reason TEXT NOT NULL,
    at_utc TEXT NOT NULL,
    added_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL);

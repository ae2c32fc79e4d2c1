-- Version 3: the back office (docs/clearing.md "Back office"). Service providers and the
-- terminals enrolled under them (the daily provider statement), lost-card reports and their
-- central refunds (002 §12, §18(c)-(d); 004 §31-32), AAVS debits and dishonours (004 §15-21).
-- Nothing of version 2 changes. Times are ISO 8601 text in UTC, days YYYY-MM-DD, as in version 2.
CREATE TABLE providers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    added_utc TEXT NOT NULL);
-- a terminal's provider, fixed when it is enrolled (a terminal enrolled without one has no row)
CREATE TABLE terminal_providers (
    terminal INTEGER PRIMARY KEY REFERENCES terminals (id),
    provider INTEGER NOT NULL REFERENCES providers (id));
CREATE INDEX terminal_providers_provider ON terminal_providers (provider);
-- a card reported lost: blocked from reported_utc + the Notification Period (3 h, 002 §12);
-- the refund columns stay NULL until the central refund is made (once)
CREATE TABLE lost_cards (
    card_number INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,                     -- on_loan, sold, mobile
    reported_utc TEXT NOT NULL,
    blocked_utc TEXT NOT NULL,
    refunded_utc TEXT,
    value_cents INTEGER,                    -- remaining value as of the block
    deposit_cents INTEGER,
    fee_cents INTEGER,                      -- Lost Octopus Service Fee
    negative_offset_cents INTEGER,          -- a negative value set against the deposit
    refund_cents INTEGER,                   -- paid to the holder
    owed_cents INTEGER,                     -- left to charge the holder / AAVS account
    last_counter INTEGER);                  -- the card counter the value was read at
-- AAVS (004 §15-21): a card's linked account at its financial institution; each settled AAVS
-- reload (and AAVS fee charged to the account) becomes a debit instruction in the institution's
-- daily debit file, once (reference: terminal:incarnation:seq); a returned (dishonoured) debit
-- is added to the card's outstanding amount
CREATE TABLE aavs_links (
    card_number INTEGER PRIMARY KEY,
    institution TEXT NOT NULL,
    account TEXT NOT NULL,
    linked_utc TEXT NOT NULL);
CREATE TABLE aavs_debits (
    reference TEXT PRIMARY KEY,
    day TEXT NOT NULL,                       -- the Hong Kong business day of the record
    institution TEXT NOT NULL,
    account TEXT NOT NULL,
    card_number INTEGER NOT NULL,
    kind TEXT NOT NULL,                     -- reload, fee
    amount_cents INTEGER NOT NULL,
    at_utc TEXT NOT NULL,
    dishonoured_utc TEXT);
CREATE INDEX aavs_debits_day ON aavs_debits (day, institution);
CREATE TABLE aavs_outstanding (
    card_number INTEGER PRIMARY KEY,
    outstanding_cents INTEGER NOT NULL,
    dishonours INTEGER NOT NULL,
    last_utc TEXT NOT NULL,
    cancelled_utc TEXT,                       -- a further dishonour: cancelled (004 §21)
    value_applied_cents INTEGER NOT NULL DEFAULT 0,
    deposit_forfeited_cents INTEGER NOT NULL DEFAULT 0);

-- Version 5: AAVS suspensions a service terminal can release (docs/clearing.md "Dishonoured
-- debits"). An action list entry the clearing house makes from a dishonoured debit carries the
-- amount outstanding and the card's suspension number; the card keeps the number of the
-- suspension it was reactivated from, so a list that still holds the entry spares it. An entry
-- put on the list by hand carries neither. Nothing else changes.
ALTER TABLE actions ADD COLUMN outstanding_cents BIGINT;
ALTER TABLE actions ADD COLUMN suspension INTEGER;
ALTER TABLE aavs_outstanding ADD COLUMN suspensions INTEGER NOT NULL DEFAULT 0;
-- what service terminals collected of it (settled aavs_outstanding_paid records, kept by the
-- receiver as it takes them in: the records themselves leave with their day)
ALTER TABLE aavs_outstanding ADD COLUMN paid_cents BIGINT NOT NULL DEFAULT 0;
-- a card suspended by a dishonour before version 5 (listed aavs_suspended, owing, not
-- cancelled) becomes suspension number 1 with what it owes, so a service terminal can collect
-- it and release the card; a suspension put on by hand for a card owing nothing stays one
UPDATE aavs_outstanding SET suspensions = 1
    WHERE cancelled_utc IS NULL AND outstanding_cents > 0
    AND card_number IN (SELECT card_number FROM actions WHERE reason = 'aavs_suspended');
UPDATE actions SET suspension = 1, outstanding_cents = (
        SELECT o.outstanding_cents FROM aavs_outstanding o
        WHERE o.card_number = actions.card_number)
    WHERE reason = 'aavs_suspended' AND card_number IN (
        SELECT card_number FROM aavs_outstanding WHERE suspensions = 1);

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

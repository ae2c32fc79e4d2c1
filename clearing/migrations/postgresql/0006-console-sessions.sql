-- Version 6: an operator's session epoch. A console session is bound to the account's password
-- hash and this number at sign-in; signing out moves the number, so every session the account
-- had (a copied cookie too) ends at its next request. Nothing else changes.
ALTER TABLE operators ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;

-- The minion public key issued for a server (issue #5), clean_key'd SPKI PEM
-- as the master stores it: compared as text with what a minion presents.
ALTER TABLE servers ADD COLUMN public_key TEXT;

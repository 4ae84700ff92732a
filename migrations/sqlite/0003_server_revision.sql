-- Optimistic concurrency (issue #10): every write of a server row increments
-- its revision; a patch names the revision it was made from and is refused
-- (`conflict`) when the row moved on. Existing rows start at 1.
ALTER TABLE servers ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;

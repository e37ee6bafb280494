-- How many of a notification's attempts the relay refused for now (4xx): what
-- `mail.max_attempts` limits. Tries that never reached the relay (refused connection,
-- no answer) are counted in `attempts` only, so an outage of the relay never fails
-- mail: it stays PENDING until the relay returns.
ALTER TABLE notifications ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;

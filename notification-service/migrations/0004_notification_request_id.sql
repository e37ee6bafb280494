-- The id of the request that placed the order a notification is about (its
-- `x-request-id`), so the mailer's lines for it name that request.
ALTER TABLE notifications ADD COLUMN request_id TEXT;
